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

import numpy as np
import torch

from m3_paged.attention.metadata import PagedAttentionMetadata
from m3_paged.model_runner import HostPagedInputs
from m4_cudagraph.packed_inputs import PackedBuffers, upload_corner

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


# The mixed-step inputs that one packed copy refreshes each step (block tables have their own copy).
STEP_FIELDS = (
    "input_ids", "positions", "slot_mapping", "token_seq_ids", "cu_seqlens_q", "seq_lens", "last_token_indices"
)  # fmt: skip


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
    packed: PackedBuffers  # holds the STEP_FIELDS above (views into one allocation)

    @classmethod
    def allocate(cls, max_tokens: int, max_seqs: int, max_blocks: int, device) -> MixedBuffers:
        int64, int32 = torch.long, torch.int32
        packed = PackedBuffers(
            dict(input_ids=(max_tokens, int64), positions=(max_tokens, int64), slot_mapping=(max_tokens, int64),
                 token_seq_ids=(max_tokens, int64), cu_seqlens_q=(max_seqs + 1, int32),
                 seq_lens=(max_seqs, int32), last_token_indices=(max_seqs, int64)),
            device,
        )  # fmt: skip
        packed.view("slot_mapping").fill_(-1)  # until the first step, every token writes nowhere
        return cls(
            **{name: packed.view(name) for name in STEP_FIELDS},
            seq_ids=torch.arange(max_seqs, device=device),
            block_tables=torch.zeros(max_seqs, max_blocks, dtype=torch.int32, device=device),
            packed=packed,
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

    def fill(self, host: HostPagedInputs, num_tokens: int, num_seqs: int) -> None:
        """Copy one step's inputs (m3's `HostPagedInputs`) in, padded to a graph of num_tokens x
        num_seqs: one packed copy of the per-token and per-sequence values, one of the block tables.
        Padding tokens write nowhere (slot -1) and belong to sequence 0 (any real one: a graph of one
        sequence slot must not see a larger, earlier step's ids); padding sequences have no tokens
        (cu_seqlens_q repeats the total) and no keys."""
        n, s = len(host.input_ids), len(host.seq_lens)
        slot_mapping = np.full(num_tokens, -1, dtype=np.int64)
        slot_mapping[:n] = host.slot_mapping
        cu_seqlens_q = np.full(num_seqs + 1, n, dtype=np.int32)
        cu_seqlens_q[: s + 1] = host.cu_seqlens_q
        self.packed.upload(
            dict(
                input_ids=host.input_ids, positions=host.positions, slot_mapping=slot_mapping,
                token_seq_ids=host.token_seq_ids, cu_seqlens_q=cu_seqlens_q, seq_lens=host.seq_lens,
                # (num_seqs,): each sequence's last row; a padding sequence's is row n - 1, its logits dropped
                last_token_indices=cu_seqlens_q[1:] - 1,
            )
        )  # fmt: skip
        upload_corner(self.block_tables, torch.from_numpy(host.block_tables))  # (s, width)
