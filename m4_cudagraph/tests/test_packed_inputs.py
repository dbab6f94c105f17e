"""PackedBuffers: typed views into one allocation, filled by one copy (reference: separate tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m0_config.sequence import Sequence
from m4_cudagraph.packed_inputs import ALIGN, PackedBuffers
from m4_cudagraph.static_buffers import STEP_FIELDS, DecodeBuffers, host_decode_inputs

pytestmark = pytest.mark.m4

FIELDS = dict(ids=(5, torch.long), lens=(3, torch.int32), order=(7, torch.int32), last=(2, torch.long))


def test_views_are_typed_aligned_and_disjoint():
    packed = PackedBuffers(FIELDS, "cpu")
    base = packed.arena.data_ptr()
    spans = []
    for name, (length, dtype) in FIELDS.items():
        view = packed.view(name)
        assert view.shape == (length,) and view.dtype == dtype and view.is_contiguous()
        assert (view.data_ptr() - base) % ALIGN == 0
        spans.append((view.data_ptr(), view.data_ptr() + length * dtype.itemsize))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= base + packed.nbytes


@pytest.mark.parametrize("seed", range(4))
def test_upload_equals_separate_copies(seed):
    """Each named buffer starts with its values; every other entry, and unnamed buffers, are 0,
    whatever an earlier upload left there."""
    rng = np.random.default_rng(seed)
    packed = PackedBuffers(FIELDS, "cpu")
    for _ in range(3):
        named = [n for n in FIELDS if rng.random() < 0.7]
        values = {n: rng.integers(-(2**31), 2**31, rng.integers(0, FIELDS[n][0] + 1)) for n in named}
        packed.upload(values)
        for name, (length, dtype) in FIELDS.items():
            expected = torch.zeros(length, dtype=dtype)  # the reference: one tensor per buffer
            if name in values:
                expected[: len(values[name])] = torch.from_numpy(values[name]).to(dtype)
            assert torch.equal(packed.view(name), expected), name


def test_upload_rejects_too_many_values():
    packed = PackedBuffers(FIELDS, "cpu")
    with pytest.raises(ValueError, match="lens: 4 values for a buffer of 3"):
        packed.upload({"lens": np.arange(4)})


def test_decode_fill_puts_host_inputs_where_the_graph_reads_them():
    buf = DecodeBuffers.allocate(max_bs=8, max_model_len=64, block_size=4, device="cpu")
    seqs = []
    for i, (n, table) in enumerate([(6, [7, 2]), (3, [5]), (9, [1, 3, 4])]):
        seqs.append(Sequence(i, None, list(range(10, 10 + n))))
        seqs[-1].block_table = table
    host = host_decode_inputs(seqs, bucket=4, block_size=4, max_blocks=buf.max_blocks_per_seq)
    buf.fill(host)
    for name in STEP_FIELDS:
        assert torch.equal(getattr(buf, name)[:4], host[name].to(getattr(buf, name).dtype)), name
    assert torch.equal(buf.block_tables[:4, :3], host["block_tables"])
    # the constant inputs live outside the packed arena and are untouched
    assert torch.equal(buf.cu_seqlens_q, torch.arange(9, dtype=torch.int32))
    assert torch.equal(buf.token_seq_ids, torch.arange(8))


def test_decode_buffers_start_in_a_safe_replay_state():
    """Before the first step (capture and warm replays), every row writes nowhere, sees one key and
    is launched once, in row order."""
    buf = DecodeBuffers.allocate(max_bs=6, max_model_len=64, block_size=4, device="cpu")
    assert buf.slot_mapping.tolist() == [-1] * 6
    assert buf.seq_lens.tolist() == [1] * 6
    assert buf.seq_order.tolist() == list(range(6))
