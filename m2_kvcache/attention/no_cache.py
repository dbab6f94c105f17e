"""Attention without a cache: every sequence is computed from scratch in one prefill step (what m1
does on every step). The baseline that the cached path must reproduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m2_kvcache.attention.metadata import AttentionMetadata


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata, scale: float):
    """Causal attention within each sequence of a flattened batch of whole sequences.

    q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim) -> like q."""
    out = torch.empty_like(q)
    # Memory linear in len: PyTorch's fused CUDA kernels (flash, memory-efficient) want 4-D (batch,
    # heads, len, head_dim) inputs. Given 3-D views, SDPA takes its math kernel, which builds the
    # (heads, len, len) float32 scores: 16 GiB for one 16,384-token sequence of Qwen3-0.6B, the very
    # pass m3's sizing runs. The kv heads are repeated (memory linear in len) so that no kernel needs
    # GQA support either.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # one kv head per q head
    cu = md.cu_seqlens_q.tolist()
    for start, end in zip(cu[:-1], cu[1:]):  # one SDPA per sequence keeps this path obviously right
        out[start:end] = F.scaled_dot_product_attention(
            q[None, start:end].transpose(1, 2),  # (1, num_heads, len, head_dim)
            k[None, start:end].transpose(1, 2),
            v[None, start:end].transpose(1, 2),
            is_causal=True,
            scale=scale,
        )[0].transpose(0, 1)
    return out


class NoCacheBackend:
    """Full-sequence prefill only: every sequence's query_len must equal its seq_len."""

    def forward(self, layer, q, k, v, attn_metadata: AttentionMetadata) -> torch.Tensor:
        if not torch.equal(attn_metadata.query_lens, attn_metadata.seq_lens):
            raise ValueError("NoCacheBackend computes whole sequences only (query_lens must equal seq_lens)")
        return prefill_attention(q, k, v, attn_metadata, layer.scale).reshape(q.shape[0], -1)
