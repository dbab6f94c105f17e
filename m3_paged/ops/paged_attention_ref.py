"""Pure-torch reference for paged attention over a batch that mixes prefill chunks and decode rows.

The Triton kernel in `paged_attention.py` must reproduce `paged_attention_ref` (the tests compare them,
and compare this reference with a dense `F.scaled_dot_product_attention`). It is also the attention
of a CPU run, so it is written for clarity first and speed second: one loop over the sequences,
float32 maths.

Batch description (vLLM's varlen convention):

    q             (num_tokens, num_heads, head_dim)  the new tokens of every sequence, back to back
    cu_seqlens_q  (num_seqs + 1,) int32               sequence s owns q rows cu_seqlens_q[s]:cu_seqlens_q[s+1]
    seq_lens      (num_seqs,) int32                   context length: cached prefix + new tokens
    block_tables  (num_seqs, max_blocks_per_seq) int32; row s lists the cache blocks of sequence s in
                  order; entries past cdiv(seq_lens[s], block_size) are padding (-1 or 0, any value)
                  and are never read

With q_len = cu_seqlens_q[s+1] - cu_seqlens_q[s], query i of sequence s sits at absolute position
seq_lens[s] - q_len + i and attends to the keys at positions 0 .. that position (causal, offset by
the cached prefix). A decode row is the case q_len = 1; a full prefill is q_len = seq_len.
"""

from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's keys (or values) read back through its block table.

    cache (num_blocks, block_size, num_kv_heads, head_dim), block_table (max_blocks_per_seq,)
    -> (seq_len, num_kv_heads, head_dim), positions 0 .. seq_len - 1 in order.
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()  # padding entries past num_blocks are never touched
    return cache[blocks].flatten(0, 1)[:seq_len]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * Q K^T + causal mask) V per sequence, K/V read through the block table.

    Returns `out` (num_tokens, num_heads, head_dim) in q's dtype; rows of `out` past
    cu_seqlens_q[-1] (padding) are left as they were. GQA: q head h reads kv head
    h // (num_heads // num_kv_heads), as in Hugging Face's repeat_kv.
    """
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()  # host copies: this loop runs on the CPU anyway
    for s, seq_len in enumerate(lens):
        q_start, q_end = cu[s], cu[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        # (seq_len, num_heads, head_dim): each kv head serves `group` consecutive q heads.
        k = gather_kv(k_cache, block_tables[s], seq_len).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[s], seq_len).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * scale  # (H, q_len, seq_len)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # absolute positions
        k_pos = torch.arange(seq_len, device=q.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # (q_len, seq_len)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out
