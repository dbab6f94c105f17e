"""m3's input preparation (numpy, `HostPagedInputs`) against `PagedAttentionMetadata.build_paged`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence
from m3_paged import LLM
from m3_paged.attention.metadata import PagedAttentionMetadata
from m3_paged.model_runner import HostPagedInputs
from m3_paged.scheduler import SchedulerOutput

pytestmark = pytest.mark.m3

FIELDS = ["cu_seqlens_q", "seq_lens", "token_seq_ids", "positions", "block_tables", "slot_mapping"]


def random_batch(seed: int, block_size: int) -> tuple[list[Sequence], list[int]]:
    """Sequences with ragged tables of large block ids, each computing a random chunk (decode rows,
    prefill chunks after a cached prefix, whole prompts)."""
    rng = np.random.default_rng(seed)
    seqs, query_lens = [], []
    for i in range(int(rng.integers(1, 10))):
        length = int(rng.integers(1, 6 * block_size + 2))
        seq = Sequence(i, None, rng.integers(0, 500, length).tolist())
        seq.block_table = rng.choice(2**20, -(-length // block_size), replace=False).tolist()
        seq.data.num_computed_tokens = int(rng.integers(0, length))
        seqs.append(seq)
        query_lens.append(int(rng.integers(1, length - seq.data.num_computed_tokens + 1)))
    return seqs, query_lens


def reference(seqs: list[Sequence], query_lens: list[int], block_size: int):
    starts = [s.data.num_computed_tokens for s in seqs]
    input_ids = [t for s, a, n in zip(seqs, starts, query_lens) for t in s.get_token_ids()[a : a + n]]
    seq_lens = [a + n for a, n in zip(starts, query_lens)]
    md = PagedAttentionMetadata.build_paged(query_lens, seq_lens, [s.block_table for s in seqs], block_size)
    return torch.tensor(input_ids, dtype=torch.long), md


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_host_inputs_equal_build_paged(seed, block_size):
    seqs, query_lens = random_batch(seed, block_size)
    host = HostPagedInputs.build(seqs, query_lens, block_size)
    input_ids, md = reference(seqs, query_lens, block_size)
    assert torch.equal(torch.from_numpy(host.input_ids), input_ids)
    for name in FIELDS:
        got, expected = torch.from_numpy(getattr(host, name)), getattr(md, name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_host_inputs_reject_an_empty_row():
    seq = Sequence(0, None, [1, 2, 3])
    seq.block_table = [0]
    with pytest.raises(ValueError, match="query_len"):
        HostPagedInputs.build([seq], [0], 4)


@pytest.mark.parametrize("decode", [False, True])
def test_prepare_inputs_equals_build_paged(qwen3_dir, decode):
    runner = LLM(qwen3_dir, block_size=4).llm_engine.model_runner
    seqs, query_lens = random_batch(0, 4)
    if decode:  # one new token per sequence: the batch also gets attention's launch order
        for seq in seqs:
            seq.data.num_computed_tokens = seq.get_len() - 1
        query_lens = [1] * len(seqs)
    so = SchedulerOutput()
    for seq, n in zip(seqs, query_lens):
        so.add(seq, n, True, SamplingParams())
    input_ids, md = runner.prepare_inputs(so)
    expected_ids, expected = reference(seqs, query_lens, 4)
    assert torch.equal(input_ids, expected_ids)
    for name in [*FIELDS, "slot_ids"]:
        got, want = getattr(md, name), getattr(expected, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert (md.max_seqlen_q, md.max_seqlen_k, md.block_size, md.num_splits) == (
        expected.max_seqlen_q,
        expected.max_seqlen_k,
        4,
        None,
    )
    if decode:  # longest context first, ties in batch order
        lens = [seq.get_len() for seq in seqs]
        assert md.seq_order.tolist() == sorted(range(len(seqs)), key=lambda i: -lens[i])
        assert torch.equal(md.seq_order, expected.seq_order)
    else:
        assert md.seq_order is None and expected.seq_order is None
