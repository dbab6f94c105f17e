"""Attention over a contiguous KV cache: every sequence owns one cache slot of max_model_len tokens.

Per layer the cache is k_cache, v_cache: (num_slots, max_model_len, num_kv_heads, head_dim). A step
first writes its new keys/values at cache[slot, position], then each query attends to its slot's
prefix [0, seq_len) causally. The whole prefix was computed by earlier steps, so a decode step costs
one token of projections per sequence instead of the whole sequence. The price: a slot reserves
max_model_len tokens whether the sequence uses them or not (see kv_cache.kv_cache_usage); m3's paging
removes that waste.

Reads top-down: the reference (a loop over sequences with an explicit softmax), then the vectorized
version (one gather + one masked SDPA call for the whole batch), then the backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m2_kvcache.attention.metadata import AttentionMetadata


def contiguous_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference: write k/v into the cache, then per sequence softmax(q K^T * scale + causal) V in float32.

    q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim).
    Returns (num_tokens, num_heads, head_dim)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(md.num_seqs):
        start, end = int(md.cu_seqlens_q[b]), int(md.cu_seqlens_q[b + 1])
        slot, seq_len = int(md.slot_ids[b]), int(md.seq_lens[b])
        first = seq_len - (end - start)  # position of this step's first token
        k_cache[slot, first:seq_len] = k[start:end]
        v_cache[slot, first:seq_len] = v[start:end]
        keys = (
            k_cache[slot, :seq_len].float().repeat_interleave(group, dim=1)
        )  # (seq_len, num_heads, head_dim)
        values = v_cache[slot, :seq_len].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        q_pos = torch.arange(first, seq_len, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(seq_len, device=q.device)[None, :] > q_pos, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: AttentionMetadata
) -> None:
    """cache[slot of token, position of token] = k/v of token, for every new token at once."""
    slots = md.slot_ids[md.token_seq_ids]  # (num_tokens,)
    k_cache[slots, md.positions] = k
    v_cache[slots, md.positions] = v


def contiguous_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of the (already written) batch over the cache, vectorized over sequences.

    Queries are scattered into a padded (num_seqs, max_seqlen_q) grid, each sequence's cache row is
    gathered up to max_seqlen_k, and one masked SDPA call does the rest. Query i of sequence b sits at
    position p = seq_len - query_len + i and may see keys j <= p, all below seq_len. Padded query rows
    (i >= query_len) always see key 0 at least, so no softmax row is empty (no NaN); they are dropped.
    Keys beyond seq_len hold stale values of an earlier occupant of the slot, or zeros; they are masked,
    but must be finite (0 * NaN = NaN), which is why the cache is allocated with zeros.

    q: (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim)."""
    num_seqs, max_q, max_k = md.num_seqs, md.max_seqlen_q, md.max_seqlen_k
    num_tokens, num_heads, head_dim = q.shape
    device = q.device
    query_idx = torch.arange(num_tokens, device=device) - md.cu_seqlens_q[md.token_seq_ids]  # (num_tokens,)
    q_pad = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
    q_pad[md.token_seq_ids, query_idx] = q
    keys = k_cache[md.slot_ids, :max_k]  # (num_seqs, max_k, num_kv_heads, head_dim)
    values = v_cache[md.slot_ids, :max_k]
    q_pos = (md.seq_lens.long() - md.query_lens)[:, None] + torch.arange(
        max_q, device=device
    )  # (num_seqs, max_q)
    k_pos = torch.arange(max_k, device=device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # (num_seqs, max_q, max_k); implies k_pos < seq_len
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),  # (num_seqs, num_heads, max_q, head_dim)
        keys.transpose(1, 2),  # (num_seqs, num_kv_heads, max_k, head_dim)
        values.transpose(1, 2),
        attn_mask=mask[:, None],  # (num_seqs, 1, max_q, max_k), True = may attend
        scale=scale,
        enable_gqa=True,  # each kv head serves num_heads // num_kv_heads query heads
    )
    return out.transpose(1, 2)[md.token_seq_ids, query_idx]


def _check_cache(layer) -> None:
    if layer.k_cache.numel() == 0:
        raise RuntimeError(
            f"the KV cache of attention layer {layer.layer_idx} is not allocated; "
            "call m2_kvcache.attention.allocate_kv_cache(model, ...) first"
        )


class ContiguousCacheBackend:
    """The m2 attention backend (stateless: the cache lives on each Attention layer)."""

    def forward(self, layer, q, k, v, attn_metadata: AttentionMetadata) -> torch.Tensor:
        _check_cache(layer)
        write_kv_cache(k, v, layer.k_cache, layer.v_cache, attn_metadata)
        out = contiguous_attention(q, layer.k_cache, layer.v_cache, attn_metadata, layer.scale)
        return out.reshape(q.shape[0], -1)  # (num_tokens, num_heads * head_dim)


class ContiguousCacheRefBackend:
    """The same contract computed by `contiguous_attention_ref`, to check whole models against."""

    def forward(self, layer, q, k, v, attn_metadata: AttentionMetadata) -> torch.Tensor:
        _check_cache(layer)
        out = contiguous_attention_ref(q, k, v, layer.k_cache, layer.v_cache, attn_metadata, layer.scale)
        return out.reshape(q.shape[0], -1)
