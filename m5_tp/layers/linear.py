"""Tensor-parallel linear layers (Megatron-LM's column / row split), as subclasses of m2's dense ones.

For y = x W^T with W (out, in), and `tp` ranks:

- column parallel: rank r holds rows W[r*out/tp : (r+1)*out/tp] and computes its slice of y's
  features. No communication; y stays split (each rank has its own heads / its own slice of the
  MLP's hidden features).
- row parallel: rank r holds columns W[:, r*in/tp : (r+1)*in/tp] and multiplies them by its slice
  of x (which is exactly what the column-parallel layer before it produced). The partial products
  sum to y: one all-reduce. A bias is added after the sum, so it counts once, not `tp` times.

    x ─► [QKV: column] ─► attention (own heads) ─► [o_proj: row] ─► all-reduce ─► y
    x ─► [gate/up: column] ─► silu(gate) * up ─► [down_proj: row] ─► all-reduce ─► y

Two all-reduces per decoder layer, nothing else. Each layer keeps m2's constructor arguments (plus
the group, bound with functools.partial) and m2's `weight_loader`, after cutting its rank's slice
out of the full checkpoint tensor: the model and the loader are m2's, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m2_kvcache.layers.linear import (
    ColumnLinear,
    MergedColumnLinear,
    QKVLinear,
    RowLinear,
    default_weight_loader,
)
from m5_tp.parallel_state import TensorParallelGroup
from m5_tp.partition import divide, kv_head_start, kv_heads_per_rank


def shard(loaded: torch.Tensor, dim: int, full_size: int, start: int, size: int) -> torch.Tensor:
    """loaded[start : start + size] along `dim`, after checking that the checkpoint tensor has the
    full size there (a slice of a wrong tensor could otherwise fit by accident)."""
    if loaded.shape[dim] != full_size:
        raise ValueError(
            f"checkpoint shape {tuple(loaded.shape)} has {loaded.shape[dim]} along dim {dim}, "
            f"the full (unsharded) model has {full_size}"
        )
    return loaded.narrow(dim, start, size)


class ColumnParallelLinear(ColumnLinear):
    """Output features split: this rank computes y[:, rank*n : (rank+1)*n], n = output_size / tp."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, *, tp_group: TensorParallelGroup
    ) -> None:
        self.tp_group = tp_group
        self.output_size_per_partition = divide(output_size, tp_group.world_size, "output_size")
        super().__init__(input_size, self.output_size_per_partition, bias)
        self.output_size = output_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        n = self.output_size_per_partition
        part = shard(loaded_weight, 0, self.output_size, self.tp_group.rank * n, n)
        default_weight_loader(param, part, shard_id)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_per_rank={self.output_size_per_partition}"


class MergedColumnParallelLinear(MergedColumnLinear):
    """gate_proj and up_proj fused, each split by output: this rank's weight is
    [gate rows of this rank | up rows of this rank], so silu(gate) * up pairs up locally."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, *, tp_group: TensorParallelGroup
    ) -> None:
        self.tp_group = tp_group
        self.total_output_sizes = list(output_sizes)
        local = [divide(s, tp_group.world_size, "intermediate_size") for s in output_sizes]
        super().__init__(input_size, local, bias)  # self.output_sizes: this rank's sizes
        self.output_size = sum(output_sizes)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor: load it output by output
            for i, part in enumerate(loaded_weight.split(self.total_output_sizes)):
                self.weight_loader(param, part, i)
            return
        if not (isinstance(shard_id, int) and 0 <= shard_id < len(self.output_sizes)):
            raise ValueError(f"shard_id must be an int in 0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        n = self.output_sizes[shard_id]
        part = shard(loaded_weight, 0, self.total_output_sizes[shard_id], self.tp_group.rank * n, n)
        super().weight_loader(param, part, shard_id)  # into this rank's rows of output `shard_id`


class QKVParallelLinear(QKVLinear):
    """q, k, v fused and split by heads: this rank computes num_heads = total / tp query heads and
    the num_kv_heads KV heads they are grouped with (its own share, or a replica when there are
    fewer KV heads than ranks). `num_heads` / `num_kv_heads` are this rank's, which is what the
    attention reads, so each rank runs ordinary GQA over its own heads."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        *,
        tp_group: TensorParallelGroup,
    ) -> None:
        self.tp_group = tp_group
        tp = tp_group.world_size
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        num_heads = divide(total_num_heads, tp, "num_attention_heads")
        num_kv_heads, self.num_kv_head_replicas = kv_heads_per_rank(total_num_kv_heads, tp)
        super().__init__(hidden_size, head_size, num_heads, num_kv_heads, bias)
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        self.kv_head_start = kv_head_start(tp_group.rank, total_num_kv_heads, tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        hs = self.head_size
        if shard_id is None:  # an already fused checkpoint tensor: q, k, v in turn
            q, k = self.total_num_heads * hs, self.total_num_kv_heads * hs
            for sid, part in zip("qkv", loaded_weight.split([q, k, k])):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            start, size, full = self.tp_group.rank * self.num_heads, self.num_heads, self.total_num_heads
        elif shard_id in ("k", "v"):
            start, size, full = self.kv_head_start, self.num_kv_heads, self.total_num_kv_heads
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        part = shard(loaded_weight, 0, full * hs, start * hs, size * hs)
        super().weight_loader(param, part, shard_id)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, heads={self.num_heads}/{self.total_num_heads}, "
            f"kv_heads={self.num_kv_heads}/{self.total_num_kv_heads} (x{self.num_kv_head_replicas} replicas)"
        )


class RowParallelLinear(RowLinear):
    """Input features split: this rank multiplies its slice x_r (num_tokens, input_size / tp) by its
    columns W_r; y = all_reduce(sum_r x_r W_r^T) + b, the same y on every rank."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, *, tp_group: TensorParallelGroup
    ) -> None:
        self.tp_group = tp_group
        self.input_size_per_partition = divide(input_size, tp_group.world_size, "input_size")
        super().__init__(self.input_size_per_partition, output_size, bias)
        self.input_size = input_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param is self.bias:  # the bias is not split: every rank holds it, one adds it (after the sum)
            return default_weight_loader(param, loaded_weight, shard_id)
        n = self.input_size_per_partition
        part = shard(loaded_weight, 1, self.input_size, self.tp_group.rank * n, n)
        default_weight_loader(param, part, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp_group.all_reduce(F.linear(x, self.weight))  # (num_tokens, output_size), summed
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_per_rank={self.input_size_per_partition}"
