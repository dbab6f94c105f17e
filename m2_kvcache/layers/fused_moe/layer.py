"""`FusedMoE`: the experts of one MoE layer, their weights stacked, routing included.

    gate_up_proj  (num_experts, 2 * intermediate_size, hidden_size)   per expert rows [gate | up]
    down_proj     (num_experts, hidden_size, intermediate_size)

Checkpoints come in two layouts, and both load into these parameters:

- per expert, as the Hub's Qwen3-MoE checkpoints (and transformers' save_pretrained) store them:
  `mlp.experts.{e}.gate_proj.weight` (intermediate, hidden), `up_proj`, `down_proj`; the loader
  maps each to its stacked parameter with shard id (e, 0) for gate, (e, 1) for up, (e, None) for down
  (`make_expert_params_mapping`);
- already stacked, as transformers >= 5 holds them in memory: `mlp.experts.gate_up_proj` and
  `mlp.experts.down_proj`, loaded whole (shard id None).

The forward runs the Triton grouped matmuls on CUDA and the torch reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from m2_kvcache.layers.fused_moe.moe_ref import fused_experts_ref
from m2_kvcache.layers.fused_moe.router import select_experts
from m2_kvcache.layers.linear import check_shape, default_weight_loader

# Checkpoint projection name -> (stacked parameter, shard within an expert's rows).
_EXPERT_PROJS = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
}


def make_expert_params_mapping(num_experts: int) -> dict[str, tuple[str, tuple[int, int | None]]]:
    """Per-expert checkpoint name (below the MoE block) -> (stacked parameter name, shard id):
    "experts.3.up_proj.weight" -> ("experts.gate_up_proj", (3, 1))."""
    return {
        f"experts.{e}.{proj}.weight": (f"experts.{param}", (e, shard))
        for e in range(num_experts)
        for proj, (param, shard) in _EXPERT_PROJS.items()
    }


def fused_experts_for(device: torch.device):
    """The experts' implementation for a device: the Triton kernels on CUDA (imported on first use,
    so a machine without Triton never imports it), the torch reference elsewhere."""
    if device.type == "cuda":
        from m2_kvcache.layers.fused_moe.ops import fused_experts

        return fused_experts
    return fused_experts_ref


class FusedMoE(nn.Module):
    """forward(hidden_states (num_tokens, hidden_size), router_logits (num_tokens, num_experts))
    -> (num_tokens, hidden_size): top_k experts per token, their outputs summed with the router's
    weights (renormalised to sum to 1 when `renormalize`)."""

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False
        )

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        experts = fused_experts_for(hidden_states.device)
        return experts(hidden_states, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """shard_id None: the whole stacked tensor. (e, s): expert e's gate (s=0) or up (s=1) rows of
        gate_up_proj, or all of expert e's down_proj (s=None)."""
        if shard_id is None:
            return default_weight_loader(param, loaded_weight)
        expert, shard = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} is out of range: this layer has {self.num_experts} experts")
        target = param.data[expert]  # (2 * intermediate, hidden) or (hidden, intermediate)
        if shard is not None:
            target = target.narrow(0, shard * self.intermediate_size, self.intermediate_size)
        check_shape(target, loaded_weight)
        target.copy_(loaded_weight)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, renormalize={self.renormalize}"
        )
