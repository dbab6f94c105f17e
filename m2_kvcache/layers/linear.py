"""Linear layers that know how to load their own weights.

Every layer owns `weight` (output_size, input_size) and maybe `bias` (output_size,) and has a
`weight_loader(param, loaded_weight, shard_id=None)` that copies one checkpoint tensor into `param`.
The fused layers take several checkpoint tensors each: `QKVLinear` gets q_proj/k_proj/v_proj (shard_id
"q"/"k"/"v") and `MergedColumnLinear` gets gate_proj/up_proj (shard_id 0/1), each copied into its
rows of the fused weight. One big matmul instead of three (or two) small ones is the point.

These are the dense (single-device) layers. Tensor parallelism (m5_tp) subclasses them with the same
constructor signatures: the column layers keep a slice of the output rows, the row layer a slice of
the input columns (and all-reduces), and each weight_loader cuts its slice out of the full tensor.
Their role names (column / row) are vLLM's and say how m5 will split them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_shape(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """ValueError naming both shapes when a checkpoint tensor does not fit its destination."""
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(
            f"checkpoint shape {tuple(loaded.shape)} does not match the model's {tuple(target.shape)}"
        )


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Copy a whole tensor into a parameter of the same shape (dtype and device are converted)."""
    if shard_id is not None:
        raise ValueError(f"this parameter is not fused, but shard {shard_id!r} was given")
    check_shape(param, loaded_weight)
    param.data.copy_(loaded_weight)


class LinearBase(nn.Module):
    """y = x W^T (+ b). Parameters are created uninitialized: the loader fills every one of them."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        bias_param = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        self.register_parameter("bias", bias_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class ReplicatedLinear(LinearBase):
    """A plain linear layer, whole on every device (also under tensor parallelism)."""


class ColumnLinear(LinearBase):
    """A linear layer whose output features m5 splits across ranks."""


class MergedColumnLinear(ColumnLinear):
    """Several column linears with the same input, fused along the output: gate_proj and up_proj of
    the MLP (output_sizes = [intermediate, intermediate]); shard_id i fills rows of output i."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            return default_weight_loader(param, loaded_weight)
        if not (isinstance(shard_id, int) and 0 <= shard_id < len(self.output_sizes)):
            raise ValueError(f"shard_id must be an int in 0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        offset = sum(self.output_sizes[:shard_id])
        target = param.data.narrow(0, offset, self.output_sizes[shard_id])
        check_shape(target, loaded_weight)
        target.copy_(loaded_weight)


class QKVLinear(ColumnLinear):
    """The q, k and v projections fused: output rows [q (num_heads * head_size) | k | v (each
    num_kv_heads * head_size)]. `num_heads` / `num_kv_heads` are the heads this layer computes, which
    the attention reads instead of the config (under m5 they are this rank's share)."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
    ) -> None:
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.num_heads, self.num_kv_heads = self.total_num_heads, self.total_num_kv_heads
        super().__init__(hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_size, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def shard_offset_size(self, shard_id: str) -> tuple[int, int]:
        """Rows of the fused output that the q, k or v checkpoint tensor fills."""
        layout = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size)}
        layout["v"] = (self.q_size + self.kv_size, self.kv_size)
        if shard_id not in layout:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        return layout[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            return default_weight_loader(param, loaded_weight)
        offset, size = self.shard_offset_size(shard_id)
        target = param.data.narrow(0, offset, size)
        check_shape(target, loaded_weight)
        target.copy_(loaded_weight)


class RowLinear(LinearBase):
    """A linear layer whose input features m5 splits across ranks (o_proj, down_proj)."""
