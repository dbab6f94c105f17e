"""m4's CPU-testable parts: buckets, padding, static buffers, and the eager fallback."""

from __future__ import annotations

import pytest
import torch

from m0_config.sequence import Sequence
from m3_paged.attention.metadata import PagedAttentionMetadata
from m3_paged.model_runner import HostPagedInputs
from m4_cudagraph.buckets import capture_sizes, pick_bucket
from m4_cudagraph.mixed_batch import MixedBuffers
from m4_cudagraph.static_buffers import DecodeBuffers, host_decode_inputs, host_decode_inputs_reference

pytestmark = pytest.mark.m4


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8, 16, 23, 64, 256])
def test_capture_sizes_always_include_max_num_seqs(max_num_seqs):
    sizes = capture_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    assert all(1 <= s <= max_num_seqs for s in sizes)
    # every batch size the scheduler can form has a bucket, and it is the smallest that fits
    for bs in range(1, max_num_seqs + 1):
        bucket = pick_bucket(sizes, bs)
        assert bucket >= bs and not any(bs <= s < bucket for s in sizes)


def test_capture_sizes_for_23():
    assert capture_sizes(23) == [1, 2, 4, 8, 16, 23]
    assert pick_bucket(capture_sizes(23), 17) == 23
    assert pick_bucket(capture_sizes(23), 24) is None  # more rows than any graph: eager


def test_block_tables_cover_max_model_len():
    buf = DecodeBuffers.allocate(max_bs=8, max_model_len=100, block_size=16, device="cpu")
    assert buf.max_blocks_per_seq == 7  # ceil(100 / 16)
    assert buf.slot_mapping.tolist() == [-1] * 8


def _seq(seq_id, tokens, table):
    s = Sequence(seq_id, None, tokens)
    s.block_table = table
    return s


def test_host_inputs_pad_rows_to_a_dummy_slot():
    block_size = 4
    a = _seq(0, [1, 2, 3, 4, 5, 6], [7, 2])  # last token at position 5: block 2, offset 1 -> slot 9
    b = _seq(1, [9, 8, 7], [5])  # position 2 in block 5 -> slot 22
    host = host_decode_inputs([a, b], bucket=4, block_size=block_size, max_blocks=8)
    assert host["input_ids"].tolist() == [6, 7, 0, 0]
    assert host["positions"].tolist() == [5, 2, 0, 0]
    assert host["slot_mapping"].tolist() == [9, 22, -1, -1]  # padding rows write nowhere
    assert host["seq_lens"].tolist() == [6, 3, 1, 1]  # padding rows see one dummy key
    # as wide as the widest table in the batch, not max_blocks
    assert host["block_tables"].tolist() == [[7, 2], [5, 0], [0, 0], [0, 0]]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_host_inputs_equal_the_reference(seed, block_size):
    """Random batches: ragged tables (one row may be the widest), any padding, large block ids."""
    gen = torch.Generator().manual_seed(seed)
    bs = int(torch.randint(1, 12, (1,), generator=gen))
    seqs = []
    for i in range(bs):
        num_tokens = int(torch.randint(1, 5 * block_size + 1, (1,), generator=gen))
        table = torch.randint(0, 2**20, (-(-num_tokens // block_size),), generator=gen).tolist()
        seqs.append(_seq(i, torch.randint(0, 500, (num_tokens,), generator=gen).tolist(), table))
    bucket = bs + int(torch.randint(0, 4, (1,), generator=gen))
    got = host_decode_inputs(seqs, bucket, block_size, max_blocks=5)
    expected = host_decode_inputs_reference(seqs, bucket, block_size)
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name


def test_host_inputs_reject_overflow():
    with pytest.raises(ValueError, match="do not fit"):
        host_decode_inputs([_seq(i, [1], [0]) for i in range(3)], bucket=2, block_size=4, max_blocks=1)
    with pytest.raises(ValueError, match="graphs hold 1"):
        host_decode_inputs([_seq(0, [1] * 5, [0, 1])], bucket=1, block_size=4, max_blocks=1)


def test_cpu_runs_eagerly_without_graphs(qwen3_dir):
    from m4_cudagraph import LLM

    llm = LLM(qwen3_dir, max_num_seqs=4)
    runner = llm.llm_engine.model_runner
    assert not runner.use_static_decode and runner.graphs == {}
    assert runner.capture_sizes == [1, 2, 4]


def test_enforce_eager_is_accepted_and_rejected_before_m4(qwen3_dir):
    import m3_paged
    from m4_cudagraph import LLM

    assert LLM(qwen3_dir, enforce_eager=True).llm_engine.config.enforce_eager
    with pytest.raises(ValueError, match="enforce_eager.*m4_cudagraph"):
        m3_paged.LLM(qwen3_dir, enforce_eager=True)


def test_buffers_are_reused_not_reallocated(qwen3_dir):
    from m4_cudagraph import LLM, SamplingParams

    llm = LLM(qwen3_dir, max_num_seqs=4)
    runner = llm.llm_engine.model_runner
    runner.use_static_decode = True  # the padded static path, run eagerly on the CPU
    ptr = runner.buffers.input_ids.data_ptr()
    llm.generate(["Hello", "The model"], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert runner.buffers.input_ids.data_ptr() == ptr
    assert torch.all(runner.buffers.cu_seqlens_q == torch.arange(5, dtype=torch.int32))


HOST_FIELDS = ("token_seq_ids", "positions", "slot_mapping", "cu_seqlens_q", "seq_lens", "block_tables")


def _mixed_step(query_lens, seq_lens, block_size=4, first_block=0):
    tables = [
        list(range(first_block + 10 * i, first_block + 10 * i + -(-n // block_size)))
        for i, n in enumerate(seq_lens)
    ]
    md = PagedAttentionMetadata.build_paged(query_lens, seq_lens, tables, block_size)
    input_ids = torch.arange(100, 100 + md.num_tokens)
    host = HostPagedInputs(  # the host arrays m3's prepare_inputs would copy: the reference's values
        input_ids=input_ids.numpy(),
        **{name: getattr(md, name).numpy() for name in HOST_FIELDS},
    )
    return input_ids, md, host


@pytest.mark.parametrize("padded_tokens", [False, True])
def test_mixed_fill_pads_over_a_larger_earlier_step(padded_tokens):
    """After a step with more tokens and sequences, a smaller one leaves no stale value the graph
    reads: padding tokens write nowhere, padding sequences have no tokens and no keys, and every
    sequence's logits row is its last real token (a padding sequence's: the last real row)."""
    buf = MixedBuffers.allocate(max_tokens=32, max_seqs=8, max_blocks=8, device="cpu")
    buf.fill(_mixed_step([9, 7, 5, 3], [20, 7, 25, 3], first_block=50)[2], num_tokens=32, num_seqs=8)
    query_lens = [3, 5] if padded_tokens else [9, 7]  # 8 tokens pad to 16; 16 fill the graph
    input_ids, md, host = _mixed_step(query_lens, [11, 8])
    n, num_tokens, num_seqs = md.num_tokens, 16, 8
    buf.fill(host, num_tokens, num_seqs)
    view = buf.metadata(num_tokens, num_seqs, max_model_len=32, block_size=4)
    assert buf.input_ids[:n].tolist() == input_ids.tolist()
    assert view.positions[:n].tolist() == md.positions.tolist()
    assert view.token_seq_ids[:n].tolist() == md.token_seq_ids.tolist()
    assert view.slot_mapping.tolist() == md.slot_mapping.tolist() + [-1] * (num_tokens - n)
    assert view.cu_seqlens_q.tolist() == md.cu_seqlens_q.tolist() + [n] * (num_seqs - 2)
    assert view.seq_lens.tolist() == md.seq_lens.tolist() + [0] * (num_seqs - 2)
    assert view.block_tables[:2, : md.block_tables.shape[1]].tolist() == md.block_tables.tolist()
    last = buf.last_token_indices[:num_seqs].tolist()
    assert last == md.last_token_indices.tolist() + [n - 1] * (num_seqs - 2)
