"""m3's Triton attention backend, with RoPE and the KV-cache write done by one kernel.

In m3 a layer's attention is three launches: the rotary layer rotates q and k (one kernel in m4, with
Qwen3's q/k norms), the backend writes k and v into the paged cache (`store_kvcache`), then attends.
The cache write only needs what the rotary kernel already holds in registers, so here that kernel
writes the rotated key and the value straight into the token's cache slot
(`m4_cudagraph/ops/rotary.py::rotary_embedding_and_cache`) and the backend only attends: one launch
fewer per layer and step, and k is read once instead of three times.

It plugs in through m2's `Attention.rope_and_attend`, which hands RoPE to any backend that defines
`rope_and_attend`; results are the same as m3's backend (the same kernels' arithmetic).
"""

from __future__ import annotations

import torch

from m3_paged.attention.backends import TritonPagedBackend
from m3_paged.attention.metadata import PagedAttentionMetadata
from m4_cudagraph.ops import rotary_embedding_and_cache


def qk_norm_args(q_norm=None, k_norm=None) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(q weight, k weight, eps) of Qwen3's per-head norms for the rotary kernels; None without."""
    if q_norm is None:
        return None
    assert q_norm.eps == k_norm.eps, (q_norm.eps, k_norm.eps)
    return q_norm.weight, k_norm.weight, q_norm.eps


class RopeCacheTritonBackend(TritonPagedBackend):
    def rope_and_attend(
        self, layer, rotary_emb, positions, q, k, v, attn_metadata: PagedAttentionMetadata, norms=()
    ) -> torch.Tensor:
        """q, k before RoPE (num_tokens, heads, head_dim) -> (num_tokens, num_heads * head_dim)."""
        md = attn_metadata
        rotary_embedding_and_cache(
            positions, q, k, v, rotary_emb.cos_cache, rotary_emb.sin_cache,
            layer.k_cache, layer.v_cache, md.slot_mapping, qk_norm_args(*norms),
        )  # fmt: skip
        return self.attend(layer, q, md)
