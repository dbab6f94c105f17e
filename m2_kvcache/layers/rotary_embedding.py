"""Rotary position embedding (RoPE) in the rotate-half (GPT-NeoX) layout, with the scaling types the
supported checkpoints use.

Each head vector x of size head_dim is split into halves x1 = x[:d/2], x2 = x[d/2:]; pair i turns by
the angle position * inv_freq[i]:

    out = [x1 * cos - x2 * sin,  x2 * cos + x1 * sin],   inv_freq[i] = theta ** (-2i / head_dim)

This is the layout of HF Llama/Qwen checkpoints (not the interleaved GPT-J layout). Scaling changes
only inv_freq: "linear" divides every frequency by `factor` (Llama 2 long-context fine-tunes),
"llama3" divides the low frequencies by `factor`, keeps the high ones and blends in between
(Llama 3.1/3.2). Any other type (yarn, dynamic, longrope, ...) is rejected: ignoring it would
silently produce a different model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_config(hf_config: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a transformers config, wherever this version keeps them.

    transformers >= 5 folds both into `rope_parameters` ({"rope_type": ..., "rope_theta": ..., ...});
    older versions have `rope_theta` and `rope_scaling` (whose type key is "rope_type" or, older
    still, "type"). rope_scaling is None for plain RoPE."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        theta, scaling = params.get("rope_theta"), dict(params)
    else:
        theta, scaling = getattr(hf_config, "rope_theta", None), getattr(hf_config, "rope_scaling", None)
        scaling = dict(scaling) if scaling else None
    theta = 10000.0 if theta is None else float(theta)  # the transformers default for these models
    if scaling is not None:
        scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """The (head_dim // 2,) float32 rotation frequencies, scaled as `rope_scaling` says."""
    rope_type = "default" if rope_scaling is None else rope_scaling["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported types: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)} (default means no scaling)"
        )
    if rope_scaling is not None and rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    # The same operations, in the same order, as transformers, so float32 results match bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than original_len / low_freq_factor are stretched by
    `factor`, those shorter than original_len / high_freq_factor are kept, and the band between is a
    linear blend of the two (smooth = 0 at the low edge, 1 at the high edge)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (num_tokens, num_heads, head_dim); cos, sin: (num_tokens, 1, head_dim // 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE with cos/sin precomputed for every position below `max_position` (float32 buffers that
    are not saved in checkpoints). One instance is shared by all layers of a model."""

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(
            t, inv_freq.to(device=t.device, dtype=torch.float32)
        )  # (max_position, head_dim // 2)
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (num_tokens,); q: (num_tokens, num_heads, head_dim); k: (num_tokens, num_kv_heads,
        head_dim). cos/sin are cast to q's dtype first, as transformers does.

        q_norm, k_norm (Qwen3): RMSNorms applied to every q / k head before the rotation. They are
        passed here, not applied by the caller, so that a fused implementation (m4) can normalize
        and rotate in one kernel."""
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)  # (num_tokens, 1, head_dim // 2)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}"


def get_rope(
    head_dim: int,
    max_position: int,
    rope_theta: float,
    rope_scaling: dict | None = None,
    rotary_cls: type[RotaryEmbedding] = RotaryEmbedding,
) -> RotaryEmbedding:
    """A RotaryEmbedding (or the subclass `rotary_cls`, e.g. m4's fused one) for these parameters;
    ValueError for an unsupported scaling type."""
    return rotary_cls(head_dim, max_position, compute_inv_freq(head_dim, rope_theta, rope_scaling))
