"""The fixed input buffers a decode graph reads, and filling them for one step.

A captured graph reads from the same memory on every replay, so each step copies its inputs into
these buffers. They are sized for the largest bucket, and the block tables are as wide as a
sequence of `max_model_len` tokens can need: prompt + output never exceeds max_model_len (the
stop checker caps it), so a table never outgrows the captured width.

Padding rows (batch_size .. bucket-1) write their K/V nowhere (slot -1) and attend to one dummy
key (seq_len 1, block 0), which keeps their softmax finite; their outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeBuffers:
    input_ids: torch.Tensor  # (max_bs,) int64
    positions: torch.Tensor  # (max_bs,) int64
    slot_mapping: torch.Tensor  # (max_bs,) int64
    seq_lens: torch.Tensor  # (max_bs,) int32
    block_tables: torch.Tensor  # (max_bs, max_blocks_per_seq) int32
    cu_seqlens_q: torch.Tensor  # (max_bs + 1,) int32: 0, 1, 2, ... (one query token per row)
    token_seq_ids: torch.Tensor  # (max_bs,) int64: 0, 1, 2, ...

    @classmethod
    def allocate(cls, max_bs: int, max_model_len: int, block_size: int, device) -> DecodeBuffers:
        max_blocks = -(-max_model_len // block_size)
        return cls(
            input_ids=torch.zeros(max_bs, dtype=torch.long, device=device),
            positions=torch.zeros(max_bs, dtype=torch.long, device=device),
            slot_mapping=torch.full((max_bs,), -1, dtype=torch.long, device=device),
            seq_lens=torch.ones(max_bs, dtype=torch.int32, device=device),
            block_tables=torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=device),
            cu_seqlens_q=torch.arange(max_bs + 1, dtype=torch.int32, device=device),
            token_seq_ids=torch.arange(max_bs, dtype=torch.long, device=device),
        )

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]


def host_decode_inputs(seqs, bucket: int, block_size: int, max_blocks: int) -> dict[str, torch.Tensor]:
    """CPU tensors of one decode step padded to `bucket` rows: the sequences' last tokens, their
    positions, the slot each new token goes to, context lengths, and block tables only as wide as
    this batch needs (columns past a row's length are never read, so stale values there are fine).
    Built from flat Python lists with one tensor per field: this runs every decode step."""
    bs = len(seqs)
    if bs > bucket:
        raise ValueError(f"{bs} sequences do not fit a bucket of {bucket}")
    tables = [seq.block_table for seq in seqs]
    width = max(len(t) for t in tables)
    if width > max_blocks:
        worst = max(seqs, key=lambda s: len(s.block_table))
        raise ValueError(f"seq {worst.seq_id} has {width} blocks; graphs hold {max_blocks}")
    pad = bucket - bs
    positions = [seq.get_len() - 1 for seq in seqs]  # decode feeds the last token, not cached yet
    slots = [t[p // block_size] * block_size + p % block_size for t, p in zip(tables, positions)]
    flat_tables = [b for t in tables for b in (*t, *[0] * (width - len(t)))] + [0] * (pad * width)
    return dict(
        input_ids=torch.tensor([seq.get_last_token_id() for seq in seqs] + [0] * pad),
        positions=torch.tensor(positions + [0] * pad),
        slot_mapping=torch.tensor(slots + [-1] * pad),  # padding rows write nowhere
        seq_lens=torch.tensor([p + 1 for p in positions] + [1] * pad, dtype=torch.int32),  # one dummy key
        block_tables=torch.tensor(flat_tables, dtype=torch.int32).view(bucket, width),
    )
