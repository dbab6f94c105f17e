"""Milestone 3's kernels against their pure-torch references, and the references against brute force.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors: `m3_paged.ops` sets
TRITON_INTERPRET=1 before its kernels are decorated (see its docstring). The interpreter is slow,
so the CPU cases are small; the `gpu` tests repeat the comparisons at realistic sizes on CUDA.
The interpreter cannot run `tl.dot` on bfloat16 (triton-lang/triton#11584), so bfloat16 attention
is covered by the GPU tests only; bfloat16 stores are covered on both.

Every paged cache here is poisoned: blocks no sequence owns, and the tail of each sequence's last
block, hold NaN. A kernel that reads past seq_len or through a padding entry of the block table
returns NaN and fails the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from m3_paged import ops
from m3_paged.ops import (
    choose_num_splits,
    paged_attention,
    paged_attention_ref,
    store_kvcache,
    store_kvcache_ref,
)

pytestmark = pytest.mark.m3

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# Outputs are compared in float32; the low-precision budgets cover rounding p to 16 bits before P @ V.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# (q_lens, prefix_lens): a prefill chunk after a cached prefix, decode rows, a full prefill from 0.
MIXED = ([5, 1, 9, 1], [7, 20, 0, 33])
DECODE = ([1, 1, 1], [40, 3, 71])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


@dataclass
class PagedBatch:
    q: torch.Tensor  # (num_tokens, num_heads, head_dim)
    k_cache: torch.Tensor  # (num_blocks, block_size, num_kv_heads, head_dim), poisoned with NaN
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # (num_seqs + 1,) int32
    seq_lens: torch.Tensor  # (num_seqs,) int32
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32, a column slice of a wider buffer
    keys: list[torch.Tensor]  # per sequence, (seq_len, num_kv_heads, head_dim): the dense truth
    values: list[torch.Tensor]

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def args(self) -> tuple:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.cu_seqlens_q,
            self.seq_lens,
            self.block_tables,
            self.scale,
        )


def make_batch(
    q_lens: list[int],
    prefix_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
    pad: int = -1,
    seed: int = 0,
) -> PagedBatch:
    """Random q/K/V; each sequence's K/V written to randomly chosen (shuffled) cache blocks."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that belong to nobody
    owner = torch.randperm(num_blocks, generator=gen)
    width = max(blocks_per_seq) + 2  # padding columns after every row's last block
    # A wider buffer sliced by columns, like a runner's persistent table: rows are not contiguous.
    wide = torch.full((len(seq_lens), width + 5), pad, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    keys, values, first = [], [], 0
    for s, seq_len in enumerate(seq_lens):
        ids = owner[first : first + blocks_per_seq[s]]
        first += blocks_per_seq[s]
        wide[s, : len(ids)] = ids.int()
        pos = torch.arange(seq_len)
        keys.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
        k_cache[ids[pos // block_size], pos % block_size] = keys[-1]
        v_cache[ids[pos // block_size], pos % block_size] = values[-1]
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=wide.to(device)[:, :width],
        keys=[k.to(device) for k in keys],
        values=[v.to(device) for v in values],
    )


def dense_attention(batch: PagedBatch) -> torch.Tensor:
    """Brute force: F.scaled_dot_product_attention per sequence on its contiguous K/V, float32."""
    out = torch.empty(batch.q.shape, dtype=torch.float32, device=batch.q.device)
    cu = batch.cu_seqlens_q.tolist()
    for s, (k, v) in enumerate(zip(batch.keys, batch.values)):
        seq_len, q_len = k.shape[0], cu[s + 1] - cu[s]
        q = batch.q[cu[s] : cu[s + 1]].float().transpose(0, 1)[None]  # (1, num_heads, q_len, head_dim)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # True = may attend
        kt, vt = (x.float().transpose(0, 1)[None] for x in (k, v))  # (1, num_kv_heads, seq_len, head_dim)
        o = F.scaled_dot_product_attention(q, kt, vt, attn_mask=mask, scale=batch.scale, enable_gqa=True)
        out[cu[s] : cu[s + 1]] = o[0].transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# store_kvcache


def store_kvcache_loop(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Brute force: one token at a time."""
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = key[t]
            v_cache[slot // block_size, slot % block_size] = value[t]


def make_store_inputs(num_tokens, num_kv_heads, head_dim, block_size, dtype, slot_dtype, device, seed=0):
    """key/value as strided views of a fused qkv tensor; distinct random slots, every third one -1."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-num_tokens // block_size) + 2
    kv_size = num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, 3 * kv_size, generator=gen).to(dtype).to(device)  # views made on the device
    key = qkv[:, kv_size : 2 * kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 2 * kv_size :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    return key, value, cache.to(device), slots.to(slot_dtype).to(device)


def check_store(num_tokens, num_kv_heads, head_dim, block_size, dtype, slot_dtype, device) -> None:
    key, value, cache, slots = make_store_inputs(
        num_tokens, num_kv_heads, head_dim, block_size, dtype, slot_dtype, device
    )
    assert not key.is_contiguous()
    expected, actual = cache.clone(), cache.clone()
    store_kvcache_ref(key, value, expected[0], expected[1], slots)
    store_kvcache(key, value, actual[0], actual[1], slots)  # caches are views into one allocation
    assert torch.equal(actual, expected)  # a copy: exact, including every slot left alone
    assert not torch.equal(expected, cache)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kvcache_ref_matches_loop(slot_dtype):
    key, value, cache, slots = make_store_inputs(23, 2, 16, 4, torch.float32, slot_dtype, CPU)
    expected, actual = cache.clone(), cache.clone()
    store_kvcache_loop(key, value, expected[0], expected[1], slots)
    store_kvcache_ref(key, value, actual[0], actual[1], slots)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "num_kv_heads,head_dim,block_size", [(1, 16, 4), (2, 32, 16), (3, 24, 8), (2, 64, 256)]
)
def test_store_kvcache_matches_ref(num_kv_heads, head_dim, block_size, dtype):
    check_store(19, num_kv_heads, head_dim, block_size, dtype, torch.int64, CPU)


def test_store_kvcache_int32_slots_and_all_padding():
    check_store(9, 2, 16, 8, torch.float32, torch.int32, CPU)
    key, value, cache, _ = make_store_inputs(4, 2, 16, 8, torch.float32, torch.int64, CPU)
    before = cache.clone()
    store_kvcache(key, value, cache[0], cache[1], torch.full((4,), -1, dtype=torch.int64))
    assert torch.equal(cache, before)  # a batch of CUDA-graph padding rows writes nothing


# ---------------------------------------------------------------------------------------------------
# paged attention: the reference against dense SDPA


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [4, 16, 64])
@pytest.mark.parametrize("pad", [-1, 0])
def test_paged_attention_ref_matches_dense(group, block_size, pad):
    batch = make_batch(
        *MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=16, block_size=block_size, pad=pad
    )
    assert_close(paged_attention_ref(*batch.args()), dense_attention(batch), torch.float32)


def test_paged_attention_ref_half_precision_rounds_float32_result():
    batch = make_batch(*MIXED, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, dtype=torch.bfloat16)
    out = paged_attention_ref(*batch.args())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dense_attention(batch).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# paged attention: the Triton kernel against the reference


def check_attention(batch: PagedBatch, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    expected = paged_attention_ref(*batch.args())
    actual = paged_attention(*batch.args(), **kwargs)
    assert actual.dtype == dtype and not actual.float().isnan().any()
    assert_close(actual, expected, dtype)
    return actual


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim,block_size", [(16, 4), (32, 16), (64, 256)])
def test_paged_attention_mixed_batch(group, head_dim, block_size):
    batch = make_batch(*MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, block_size=block_size)
    check_attention(batch, torch.float32, tile_n=16)


@pytest.mark.parametrize("group,block_size", [(1, 8), (2, 32), (4, 16)])
def test_paged_attention_float16(group, block_size):
    batch = make_batch(
        *MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=32, block_size=block_size, dtype=torch.float16
    )
    check_attention(batch, torch.float16)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("group", [1, 4])
def test_paged_attention_forced_split_k_on_mixed_batch(group, num_splits):
    # More splits than some tiles have KV tiles: empty splits must merge as weight 0.
    batch = make_batch(*MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=16, block_size=8)
    check_attention(batch, torch.float32, num_splits=num_splits, tile_n=16)


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_decode_batch(num_splits, dtype):
    batch = make_batch(*DECODE, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype)
    check_attention(batch, dtype, num_splits=num_splits, tile_n=16)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_attention_seq_order(num_splits):
    """The launch order of a decode batch changes which program takes which sequence, never the result."""
    batch = make_batch([1] * 5, [40, 3, 71, 17, 64], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8)
    args, options = batch.args(), dict(num_splits=num_splits, tile_n=16)
    plain = paged_attention(*args, **options)
    for order in ([2, 4, 0, 3, 1], [4, 3, 2, 1, 0]):
        ordered = paged_attention(*args, seq_order=torch.tensor(order, dtype=torch.int32), **options)
        assert torch.equal(ordered, plain), order
    # Program i computes sequence seq_order[i]: a sequence that is not listed is never computed (with
    # splits, the merge pass would fill its rows from unwritten partials, so check without).
    out, plain = torch.full_like(batch.q, float("nan")), paged_attention(*args, num_splits=1, tile_n=16)
    paged_attention(
        *args, out=out, seq_order=torch.tensor([2, 2, 0, 4, 4], dtype=torch.int32), num_splits=1, tile_n=16
    )
    assert torch.equal(out[[0, 2, 4]], plain[[0, 2, 4]]) and out[[1, 3]].isnan().all()
    with pytest.raises(AssertionError, match="decode-only"):  # a prefill chunk has several tiles
        mixed = make_batch(*MIXED, num_heads=4, num_kv_heads=2, head_dim=16, block_size=8)
        paged_attention(*mixed.args(), seq_order=torch.arange(4, dtype=torch.int32))


def test_paged_attention_odd_shapes():
    # GQA group 3 (BLOCK_M is not a multiple of it), head_dim 24 (padded to 32), block_size 5.
    batch = make_batch(*MIXED, num_heads=6, num_kv_heads=2, head_dim=24, block_size=5)
    check_attention(batch, torch.float32, tile_n=16)
    check_attention(batch, torch.float32, tile_n=16, num_splits=3)


def test_paged_attention_tile_sizes_and_single_sequence():
    batch = make_batch([13], [22], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    for block_m, tile_n in [(16, 16), (32, 64)]:
        check_attention(batch, torch.float32, block_m=block_m, tile_n=tile_n)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_attention_writes_into_out_and_skips_padding_rows(num_splits):
    batch = make_batch(*DECODE, num_heads=4, num_kv_heads=2, head_dim=16, block_size=8)
    expected = paged_attention_ref(*batch.args())
    # Two padding rows after the real tokens, as a CUDA-graph bucket would have.
    padded_q = torch.cat([batch.q, torch.randn(2, *batch.q.shape[1:])])
    out = torch.full_like(padded_q, 7.0)
    args = (padded_q, *batch.args()[1:])
    result = paged_attention(*args, out=out, num_splits=num_splits, tile_n=16)
    assert result is out
    assert_close(out[:3], expected, torch.float32)
    assert torch.equal(out[3:], torch.full_like(out[3:], 7.0))


def test_store_then_attend_matches_dense():
    """The two kernels together: K/V written through store_kvcache, then paged attention."""
    batch = make_batch(*MIXED, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    k_cache, v_cache = (
        torch.full_like(batch.k_cache, float("nan")),
        torch.full_like(batch.v_cache, float("nan")),
    )
    block_size = k_cache.shape[1]
    slots = []
    for s, k in enumerate(batch.keys):
        pos = torch.arange(k.shape[0])
        slots.append(batch.block_tables[s, pos // block_size].long() * block_size + pos % block_size)
    store_kvcache(torch.cat(batch.keys), torch.cat(batch.values), k_cache, v_cache, torch.cat(slots))
    args = (batch.q, k_cache, v_cache, *batch.args()[3:])
    assert_close(paged_attention(*args, tile_n=16), dense_attention(batch), torch.float32)


def test_choose_num_splits():
    # Prefill in the batch, or a short context: never split.
    assert choose_num_splits(4, 8, 100_000, decode_only=False, num_sms=132) == 1
    assert choose_num_splits(1, 8, 500, decode_only=True, num_sms=132) == 1
    # One long decode: split up to MAX_SPLITS; each split keeps >= SPLIT_MIN_TOKENS keys.
    assert choose_num_splits(1, 8, 100_000, decode_only=True, num_sms=132) == 32
    assert choose_num_splits(1, 8, 2048, decode_only=True, num_sms=132) == 8
    # A batch that already fills the GPU: no split; up to four waves of programs: two (the tail).
    assert choose_num_splits(67, 8, 100_000, decode_only=True, num_sms=132) == 1
    assert choose_num_splits(66, 8, 100_000, decode_only=True, num_sms=132) == 2
    assert choose_num_splits(66, 8, 511, decode_only=True, num_sms=132) == 1  # too short to split


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU set-up")
def test_kernels_run_in_the_interpreter_without_cuda():
    assert ops.TRITON_INTERPRET  # the @triton.jit kernels were built as interpreted functions


# ---------------------------------------------------------------------------------------------------
# GPU: the same comparisons at realistic sizes (skipped without CUDA)

GPU_MIXED = ([300, 1, 1, 1000, 77, 1, 1, 128], [1000, 4000, 17, 0, 513, 2047, 255, 128])
GPU_LONG_DECODE = ([1, 1, 1], [16_000, 9_000, 3_500])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
def test_store_kvcache_gpu(dtype, block_size):
    check_store(4099, 8, 128, block_size, dtype, torch.int64, CUDA)
    check_store(517, 2, 64, block_size, dtype, torch.int32, CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_paged_attention_gpu_mixed(dtype, head_dim, group):
    batch = make_batch(
        *GPU_MIXED,
        num_heads=8 * group,
        num_kv_heads=8,
        head_dim=head_dim,
        block_size=16,
        dtype=dtype,
        device=CUDA,
    )
    check_attention(batch, dtype)
    assert_close(paged_attention_ref(*batch.args()), dense_attention(batch), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_attention_gpu_block_sizes(block_size, num_splits):
    batch = make_batch(
        *GPU_MIXED,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        block_size=block_size,
        dtype=torch.bfloat16,
        device=CUDA,
    )
    check_attention(batch, torch.bfloat16, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_paged_attention_gpu_long_decode_split_k(dtype, group):
    batch = make_batch(
        *GPU_LONG_DECODE,
        num_heads=8 * group,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=dtype,
        device=CUDA,
    )
    num_sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    assert choose_num_splits(3, 8, 16_000, decode_only=True, num_sms=num_sms) > 1  # auto picks split-K
    split = check_attention(batch, dtype)  # automatic choice
    unsplit = check_attention(batch, dtype, num_splits=1)
    assert_close(split, unsplit, dtype)
    check_attention(batch, dtype, max_seqlen_k=16_000)  # no host sync for the choice


def test_pdl_only_on_hopper_and_later(monkeypatch):
    """PDL's griddepcontrol instructions need compute capability 9.0: older GPUs and the CPU launch
    plainly (`m3_paged/ops/pdl.py::use_pdl`)."""
    from m3_paged.ops.pdl import _has_pdl, use_pdl

    assert not use_pdl(torch.device("cpu"))
    for capability, expected in [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        _has_pdl.cache_clear()
        assert use_pdl(torch.device("cuda", 0)) is expected
    _has_pdl.cache_clear()  # forget the fake answers
