"""The attention layer: owns this layer's KV cache, delegates the maths to an attention backend.

The split keeps the model code fixed while the cache layout changes from milestone to milestone:
m2's backend uses a contiguous cache (one row of max_model_len tokens per sequence slot), m3's a
paged one. The backend is passed in (no global), together with an explicit metadata object per step.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class AttentionBackend(Protocol):
    """Writes this step's k/v into `layer.k_cache`/`layer.v_cache` (if it keeps a cache) and returns
    causal attention of every query over its sequence's keys so far.

    q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim), RoPE applied.
    Returns (num_tokens, num_heads * head_dim).

    A backend may also define `rope_and_attend(layer, rotary_emb, positions, q, k, v, attn_metadata,
    norms)`, taking q and k before RoPE: `Attention.rope_and_attend` then hands it both steps, so it
    can fuse the rotation with its cache write (m4 does)."""

    def forward(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata: Any
    ) -> torch.Tensor: ...


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (GQA: num_heads % num_kv_heads == 0) over a cache.

    `k_cache` / `v_cache` are plain tensor attributes (not parameters or buffers: they are neither
    loaded nor saved), empty until the model runner allocates the cache and assigns them; their shape
    is the backend's business."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        layer_idx: int,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self.backend = backend
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        """q (num_tokens, num_heads, head_dim), k/v (num_tokens, num_kv_heads, head_dim) ->
        (num_tokens, num_heads * head_dim)."""
        return self.backend.forward(self, q, k, v, attn_metadata)

    def rope_and_attend(
        self, rotary_emb: nn.Module, positions: torch.Tensor, q, k, v, attn_metadata: Any, norms=()
    ) -> torch.Tensor:
        """RoPE on q and k (after `norms`: Qwen3's per-head q and k RMSNorms), then `forward`. A backend
        with its own `rope_and_attend` does both itself (see AttentionBackend)."""
        fused = getattr(self.backend, "rope_and_attend", None)
        if fused is not None:
            return fused(self, rotary_emb, positions, q, k, v, attn_metadata, norms)
        q, k = rotary_emb(positions, q, k, *norms)
        return self.forward(q, k, v, attn_metadata)

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, backend={type(self.backend).__name__}"
        )
