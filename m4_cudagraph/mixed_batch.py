"""Graphs for small steps that contain prefill work, keyed by their number of tokens.

A decode graph assumes one token per sequence. A step that prefills (a new prompt, a prompt chunk,
or the few uncached tokens of a prompt whose prefix is in the prefix cache) has ragged query
lengths, so it ran eagerly, and eagerly a step of a small model costs the CPU time of launching a
few hundred kernels (~15 ms on an H100 host), whatever its size. For the few-token prefill that a
prefix-cache hit leaves, that launch time is nearly all of the time to first token.

The attention kernel finds each token's sequence from `cu_seqlens_q` on the GPU, so nothing in it
depends on the batch's layout except the grid, which depends only on (num_tokens, num_seqs). A
graph captured for `num_tokens` padded tokens and `num_seqs` padded sequences therefore replays
any batch with at most that many of each:

- padding tokens (after the real ones) belong to no sequence: no attention row reads or writes
  them, their K/V go nowhere (slot -1), and their outputs are dropped;
- padding sequences have no tokens (cu_seqlens_q repeats the total), so their attention programs
  exit at once, and their logits row (last token index: the last real token's) is dropped.

This is what vLLM calls a full CUDA graph for mixed batches. Larger prefill steps stay eager: their
GPU time (compute-bound matmuls over thousands of tokens) dwarfs the launch time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m3_paged.attention.metadata import PagedAttentionMetadata

MIXED_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)


def mixed_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    return [t for t in MIXED_TOKEN_BUCKETS if t <= max_num_batched_tokens]


def mixed_num_splits(num_tokens: int) -> int:
    """KV splits for a mixed graph of `num_tokens` tokens. A few query tokens over a long cached
    prefix give the attention kernel only (tokens / tile) x kv_heads programs: splitting the keys
    gives the GPU more of them. Larger steps have programs enough, and splits cost a merge pass
    whose partial rows (tokens x splits) are kept near 512. (On an H100, 32 new tokens after a cached
    2,048-token prefix: 4 splits left the step's attention latency-bound, 1.9 ms per graph step.)"""
    return max(1, min(32, 512 // num_tokens))


@dataclass
class MixedBuffers:
    """Fixed-address inputs of the mixed graphs, sized for the largest one."""

    input_ids: torch.Tensor  # (max_tokens,) int64
    positions: torch.Tensor  # (max_tokens,) int64
    slot_mapping: torch.Tensor  # (max_tokens,) int64, -1 for padding tokens
    token_seq_ids: torch.Tensor  # (max_tokens,) int64 (read by the torch backend only, never captured)
    seq_ids: torch.Tensor  # (max_seqs,) int64: 0, 1, 2, ... (metadata's slot_ids)
    cu_seqlens_q: torch.Tensor  # (max_seqs + 1,) int32; padding sequences repeat the total
    seq_lens: torch.Tensor  # (max_seqs,) int32, 0 for padding sequences
    block_tables: torch.Tensor  # (max_seqs, max_blocks_per_seq) int32
    last_token_indices: torch.Tensor  # (max_seqs,) int64: cu_seqlens_q[1:] - 1 (padding: the last real row)

    @classmethod
    def allocate(cls, max_tokens: int, max_seqs: int, max_blocks: int, device) -> MixedBuffers:
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            input_ids=zeros(max_tokens),
            positions=zeros(max_tokens),
            slot_mapping=torch.full((max_tokens,), -1, dtype=torch.long, device=device),
            token_seq_ids=zeros(max_tokens),
            seq_ids=torch.arange(max_seqs, device=device),
            cu_seqlens_q=zeros(max_seqs + 1, dtype=torch.int32),
            seq_lens=zeros(max_seqs, dtype=torch.int32),
            block_tables=zeros(max_seqs, max_blocks, dtype=torch.int32),
            last_token_indices=zeros(max_seqs),
        )

    def metadata(self, num_tokens: int, num_seqs: int, max_model_len: int, block_size: int):
        """Metadata over views of these buffers, for a graph of num_tokens x num_seqs (padded)."""
        return PagedAttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            slot_ids=self.seq_ids[:num_seqs],
            max_seqlen_q=num_tokens,
            max_seqlen_k=max_model_len,  # the worst case: nothing may depend on this step's lengths
            token_seq_ids=self.token_seq_ids[:num_tokens],
            positions=self.positions[:num_tokens],
            block_tables=self.block_tables[:num_seqs],
            slot_mapping=self.slot_mapping[:num_tokens],
            block_size=block_size,
            num_splits=mixed_num_splits(num_tokens),
        )

    def fill(self, input_ids: torch.Tensor, md: PagedAttentionMetadata, num_tokens: int, num_seqs: int):
        """Copy one step's inputs (built by m3's prepare_inputs) in, padded to the graph's sizes.
        Every op is a kernel launch on a GPU, paid in host time by each step: padding that is
        empty is skipped, and the last-token rows come from the buffer just filled in one op."""
        n, s = md.num_tokens, md.num_seqs
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(md.positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.token_seq_ids[:n].copy_(md.token_seq_ids)
        if num_tokens > n:
            self.slot_mapping[n:num_tokens].fill_(-1)  # padding tokens write nowhere
            # and belong to sequence 0 for the torch backend (any real one; a graph of one sequence
            # slot must not see a larger, earlier step's ids)
            self.token_seq_ids[n:num_tokens].fill_(0)
        self.cu_seqlens_q[: s + 1].copy_(md.cu_seqlens_q)
        self.seq_lens[:s].copy_(md.seq_lens)
        if num_seqs > s:
            self.cu_seqlens_q[s + 1 : num_seqs + 1].fill_(n)  # padding sequences: no tokens
            self.seq_lens[s:num_seqs].fill_(0)
        self.block_tables[:s, : md.block_tables.shape[1]].copy_(md.block_tables)
        # (num_seqs,): each sequence's last row; a padding sequence's is row n - 1, its logits dropped
        torch.sub(self.cu_seqlens_q[1 : num_seqs + 1], 1, out=self.last_token_indices[:num_seqs])
