"""The gated activation of the Llama/Qwen MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """(..., 2 * d) -> (..., d): silu(x[..., :d]) * x[..., d:].

    The input is the fused gate/up projection, gate first (see `MergedColumnLinear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
