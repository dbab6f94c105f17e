"""Tensor-parallel experts: every rank holds every expert, each cut like a dense MLP.

With I = moe_intermediate_size and `tp` ranks, rank r keeps columns [r*I/tp, (r+1)*I/tp) of every
expert's intermediate dimension:

    gate_up_proj  (num_experts, 2 * I/tp, hidden)   [gate rows of rank r | up rows of rank r]
    down_proj     (num_experts, hidden, I/tp)       the same range, as columns

An expert is a gated MLP, down(silu(gate x) * up x), and silu-and-mul is elementwise over the
intermediate features, so each rank computes its slice of every chosen expert exactly (column
parallel), and its down projection gives a partial sum of the hidden output (row parallel). The
router is replicated (`Qwen3MoeSparseMoeBlock.gate` is a `ReplicatedLinear`), so every rank picks
the same experts with the same weights; the weighted sum over the top-k experts is linear, so

    y = sum_r sum_k w_k * down_r,e_k(silu(gate_r,e_k x) * up_r,e_k x) = all_reduce(m2's forward on the slices)

One all-reduce per MoE layer, as for a dense MLP; Qwen3-MoE's experts have no bias to add once.
This is tensor parallelism of the experts, not expert parallelism (whole experts per GPU,
all-to-all dispatch), which is not built.
"""

from __future__ import annotations

import torch
from torch import nn

from m2_kvcache.layers.fused_moe.layer import FusedMoE
from m5_tp.layers.linear import shard
from m5_tp.parallel_state import TensorParallelGroup
from m5_tp.partition import divide


class FusedMoEParallel(FusedMoE):
    """m2's `FusedMoE` on this rank's slice of each expert's intermediate dimension; forward returns
    the full (num_tokens, hidden_size) output on every rank (one all-reduce)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        *,
        tp_group: TensorParallelGroup,
    ) -> None:
        self.tp_group = tp_group
        local = divide(intermediate_size, tp_group.world_size, "moe_intermediate_size")
        super().__init__(num_experts, top_k, hidden_size, local, renormalize)  # self.intermediate_size: local
        self.total_intermediate_size = intermediate_size

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.tp_group.all_reduce(super().forward(hidden_states, router_logits))  # (num_tokens, hidden)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Cut this rank's slice out of the full checkpoint tensor, then m2's loader places it.

        shard_id None: a whole stacked tensor, gate_up_proj (E, 2I, H) or down_proj (E, H, I).
        (e, 0) / (e, 1): expert e's gate / up (I, H), rows sliced. (e, None): its down (H, I), columns."""
        n, full = self.intermediate_size, self.total_intermediate_size
        start = self.tp_group.rank * n
        down = param is self.down_proj
        if shard_id is None and not down:  # [gate | up] stacked: slice each half, then rejoin them
            gate, up = shard(loaded_weight, 1, 2 * full, 0, 2 * full).split(full, dim=1)
            part = torch.cat([gate.narrow(1, start, n), up.narrow(1, start, n)], dim=1)
        elif shard_id is None:
            part = shard(loaded_weight, 2, full, start, n)
        else:
            part = shard(loaded_weight, 1 if down else 0, full, start, n)
        super().weight_loader(param, part, shard_id)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()} (of {self.total_intermediate_size}, rank {self.tp_group.rank})"
