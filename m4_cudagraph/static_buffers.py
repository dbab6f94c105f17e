"""The fixed input buffers a decode graph reads, and filling them for one step.

A captured graph reads from the same memory on every replay, so each step copies its inputs into
these buffers. They are sized for the largest bucket, and the block tables are as wide as a
sequence of `max_model_len` tokens can need: prompt + output never exceeds max_model_len (the
stop checker caps it), so a table never outgrows the captured width.

Padding rows (batch_size .. bucket-1) write their K/V nowhere (slot -1) and attend to one dummy
key (seq_len 1, block 0), which keeps their softmax finite; their outputs are dropped.

The five inputs that change every step share one allocation (`PackedBuffers`), so a step moves
them with one copy; the block tables get one more.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from m3_paged.attention.metadata import longest_first
from m4_cudagraph.packed_inputs import PackedBuffers, upload_corner

# The decode inputs that one packed copy refreshes each step (block tables have their own copy).
STEP_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "seq_order")


@dataclass
class DecodeBuffers:
    input_ids: torch.Tensor  # (max_bs,) int64
    positions: torch.Tensor  # (max_bs,) int64
    slot_mapping: torch.Tensor  # (max_bs,) int64
    seq_lens: torch.Tensor  # (max_bs,) int32
    block_tables: torch.Tensor  # (max_bs, max_blocks_per_seq) int32
    cu_seqlens_q: torch.Tensor  # (max_bs + 1,) int32: 0, 1, 2, ... (one query token per row)
    token_seq_ids: torch.Tensor  # (max_bs,) int64: 0, 1, 2, ...
    seq_order: torch.Tensor  # (max_bs,) int32: attention's launch order, longest context first
    packed: PackedBuffers  # holds the STEP_FIELDS above (views into one allocation)

    @classmethod
    def allocate(cls, max_bs: int, max_model_len: int, block_size: int, device) -> DecodeBuffers:
        max_blocks = -(-max_model_len // block_size)
        int64, int32 = torch.long, torch.int32
        packed = PackedBuffers(
            dict(input_ids=(max_bs, int64), positions=(max_bs, int64), slot_mapping=(max_bs, int64),
                 seq_lens=(max_bs, int32), seq_order=(max_bs, int32)),
            device,
        )  # fmt: skip
        # Until the first step: every row writes nowhere and sees one dummy key (a safe replay).
        packed.view("slot_mapping").fill_(-1)
        packed.view("seq_lens").fill_(1)
        packed.view("seq_order").copy_(torch.arange(max_bs))
        return cls(
            **{name: packed.view(name) for name in STEP_FIELDS},
            block_tables=torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=device),
            cu_seqlens_q=torch.arange(max_bs + 1, dtype=torch.int32, device=device),
            token_seq_ids=torch.arange(max_bs, dtype=torch.long, device=device),
            packed=packed,
        )

    def fill(self, host: dict[str, torch.Tensor]) -> None:
        """Copy one step's `host_decode_inputs` in: one packed copy, then the tables' used corner
        (columns past a row's length are never read, so stale values there are fine)."""
        self.packed.upload({name: host[name] for name in STEP_FIELDS})
        upload_corner(self.block_tables, host["block_tables"])  # (bucket, width)

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]


def host_decode_inputs(seqs, bucket: int, block_size: int, max_blocks: int) -> dict[str, torch.Tensor]:
    """CPU tensors of one decode step padded to `bucket` rows: the sequences' last tokens, their
    positions, the slot each new token goes to, context lengths, and block tables only as wide as
    this batch needs (columns past a row's length are never read, so stale values there are fine).

    This runs every decode step, so the Python work is one pass over the sequences plus one C-level
    conversion of all block ids (`np.fromiter`); padding and slots are numpy array operations. The
    block tables dominate (at 256 sequences of ~600 tokens, ~10k ids): a nested list turned into a
    tensor element by element costs several times more."""
    bs = len(seqs)
    if bs > bucket:
        raise ValueError(f"{bs} sequences do not fit a bucket of {bucket}")
    tables = [seq.block_table for seq in seqs]
    table_lens = np.fromiter(map(len, tables), dtype=np.int64, count=bs)  # (bs,) blocks per row
    width = int(table_lens.max())
    if width > max_blocks:
        worst = max(seqs, key=lambda s: len(s.block_table))
        raise ValueError(f"seq {worst.seq_id} has {width} blocks; graphs hold {max_blocks}")
    block_tables = np.zeros((bucket, width), dtype=np.int32)  # (bucket, width); padding rows read block 0
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(table_lens.sum()))
    # The mask's True cells, taken row-major, are exactly each row's first len(table) columns.
    block_tables[:bs][np.arange(width) < table_lens[:, None]] = flat

    input_ids = np.zeros(bucket, dtype=np.int64)
    positions = np.zeros(bucket, dtype=np.int64)
    input_ids[:bs] = [seq.get_last_token_id() for seq in seqs]
    positions[:bs] = [seq.get_len() - 1 for seq in seqs]  # decode feeds the last token, not cached yet
    slot_mapping = np.full(bucket, -1, dtype=np.int64)  # padding rows write nowhere
    pos = positions[:bs]
    blocks = block_tables[np.arange(bs), pos // block_size].astype(np.int64)  # int64: slots outgrow int32
    slot_mapping[:bs] = blocks * block_size + pos % block_size
    seq_lens = (positions + 1).astype(np.int32)
    seq_lens[bs:] = 1  # padding rows see one dummy key
    seq_order = np.arange(bucket, dtype=np.int32)  # padding rows last, in any order
    seq_order[:bs] = longest_first(seq_lens[:bs])
    return dict(
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slot_mapping),
        seq_lens=torch.from_numpy(seq_lens),
        block_tables=torch.from_numpy(block_tables),
        seq_order=torch.from_numpy(seq_order),
    )


def host_decode_inputs_reference(seqs, bucket: int, block_size: int) -> dict[str, torch.Tensor]:
    """`host_decode_inputs` in plain Python, one row at a time (the test reference)."""
    width = max(len(seq.block_table) for seq in seqs)
    rows = [(seq.get_last_token_id(), seq.get_len() - 1, seq.block_table) for seq in seqs]
    rows += [(0, None, [])] * (bucket - len(seqs))  # padding
    # longest context first (ties in batch order), then the padding rows
    order = sorted(range(len(seqs)), key=lambda i: -seqs[i].get_len()) + list(range(len(seqs), bucket))
    return dict(
        input_ids=torch.tensor([tok for tok, _, _ in rows]),
        positions=torch.tensor([0 if p is None else p for _, p, _ in rows]),
        slot_mapping=torch.tensor(
            [-1 if p is None else t[p // block_size] * block_size + p % block_size for _, p, t in rows]
        ),
        seq_lens=torch.tensor([1 if p is None else p + 1 for _, p, _ in rows], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for _, _, t in rows], dtype=torch.int32),
        seq_order=torch.tensor(order, dtype=torch.int32),
    )
