"""RMSNorm, with the residual add fused in (vLLM's `fused_add_rms_norm` semantics)."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dimension.

    The statistics are taken in float32 and the result is cast back before the weight multiplies it,
    exactly as HF transformers does, so that half-precision runs round the same way."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension (any leading shape, so it also serves as
    Qwen3's per-head q/k norm on (num_tokens, num_heads, head_dim))."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: residual = x + residual, then (norm(residual), residual).

        Fusing the add into the norm is how a pre-norm decoder layer carries its residual stream:
        the sum is needed twice (normalized for the next sublayer, raw for the next skip connection)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        residual = x + residual
        return rms_norm(residual, self.weight, self.eps), residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
