"""Attention backends against their pure-torch reference, metadata against brute force, cache stats."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from m2_kvcache.attention import (
    AttentionMetadata,
    ContiguousCacheBackend,
    ContiguousCacheRefBackend,
    NoCacheBackend,
    allocate_kv_cache,
    kv_cache_usage,
)
from m2_kvcache.layers import Attention

pytestmark = pytest.mark.m2

NUM_SLOTS, MAX_LEN = 6, 48


def random_batch(seed: int, kind: str) -> tuple[list[int], list[int], list[int]]:
    """(query_lens, seq_lens, slot_ids) of a ragged batch: whole prefills, decode steps, or a mix of
    prefills, decodes and prompt chunks on top of cached prefixes."""
    rng = random.Random(seed)
    num_seqs = rng.randint(1, 5)
    slots = rng.sample(range(NUM_SLOTS), num_seqs)
    cached = [0 if kind == "prefill" else rng.randint(1 if kind == "decode" else 0, 30) for _ in slots]
    query = [1 if kind == "decode" else rng.randint(1, MAX_LEN - 30) for _ in slots]
    return query, [c + q for c, q in zip(cached, query)], slots


def make_layer(backend, num_heads, num_kv_heads, head_dim, dtype, cache: torch.Tensor | None):
    layer = Attention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, 0, backend)
    if cache is not None:
        layer.k_cache, layer.v_cache = cache[0].clone(), cache[1].clone()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
def test_contiguous_backend_matches_reference(kind, head_dim, heads, dtype):
    num_heads, num_kv_heads = heads
    seed = zlib.crc32(f"{kind}-{head_dim}-{heads}".encode())  # fixed per case, unlike hash()
    query_lens, seq_lens, slots = random_batch(seed, kind)
    md = AttentionMetadata.build(query_lens, seq_lens, slots)
    torch.manual_seed(seed)
    # Stale, finite values everywhere: the masks, not zeros, must keep them out of the result.
    cache = torch.randn(2, NUM_SLOTS, MAX_LEN, num_kv_heads, head_dim, dtype=dtype)
    q = torch.randn(md.num_tokens, num_heads, head_dim, dtype=dtype)
    k, v = (torch.randn(md.num_tokens, num_kv_heads, head_dim, dtype=dtype) for _ in range(2))

    fast = make_layer(ContiguousCacheBackend(), num_heads, num_kv_heads, head_dim, dtype, cache)
    ref = make_layer(ContiguousCacheRefBackend(), num_heads, num_kv_heads, head_dim, dtype, cache)
    out, out_ref = fast(q, k, v, md), ref(q, k, v, md)
    assert out.shape == (md.num_tokens, num_heads * head_dim) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    # The caches are written identically: new tokens at their positions in their slots, nothing else.
    torch.testing.assert_close(fast.k_cache, ref.k_cache, atol=0, rtol=0)
    torch.testing.assert_close(fast.v_cache, ref.v_cache, atol=0, rtol=0)
    untouched = torch.ones(NUM_SLOTS, MAX_LEN, dtype=torch.bool)
    untouched[md.slot_ids[md.token_seq_ids], md.positions] = False
    torch.testing.assert_close(fast.k_cache[untouched], cache[0][untouched], atol=0, rtol=0)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
def test_no_cache_backend_matches_reference(heads):
    num_heads, num_kv_heads = heads
    query_lens, seq_lens, _ = random_batch(3, "prefill")
    md = AttentionMetadata.build(query_lens, seq_lens)
    torch.manual_seed(0)
    q = torch.randn(md.num_tokens, num_heads, 32)
    k, v = torch.randn(md.num_tokens, num_kv_heads, 32), torch.randn(md.num_tokens, num_kv_heads, 32)
    ref = make_layer(ContiguousCacheRefBackend(), num_heads, num_kv_heads, 32, torch.float32, None)
    ref.k_cache, ref.v_cache = torch.zeros(2, len(seq_lens), MAX_LEN, num_kv_heads, 32)
    no_cache = make_layer(NoCacheBackend(), num_heads, num_kv_heads, 32, torch.float32, None)
    torch.testing.assert_close(no_cache(q, k, v, md), ref(q, k, v, md), atol=1e-5, rtol=1e-5)
    decode = AttentionMetadata.build([1], [5])
    with pytest.raises(ValueError, match="whole sequences only"):
        no_cache(q[:1], k[:1], v[:1], decode)


@pytest.mark.gpu
def test_no_cache_prefill_memory_is_linear_in_length():
    """m3's sizing pass runs one max_num_batched_tokens-long sequence through this path. A kernel that
    builds the (heads, len, len) score matrix would need 16 GiB here (float32), and 64 GiB at 32,768
    tokens: an out-of-memory error at start-up, or a KV cache 16 GiB smaller than it could be."""
    n, num_heads, num_kv_heads, head_dim = 16384, 16, 8, 128  # Qwen3-0.6B's heads
    md = AttentionMetadata.build([n], [n], device=torch.device("cuda"))
    q = torch.randn(n, num_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(n, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    layer = make_layer(NoCacheBackend(), num_heads, num_kv_heads, head_dim, torch.bfloat16, None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = layer(q, k, v, md)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2**30, f"{extra / 2**30:.1f} GiB for a {n}-token prefill"  # q, expanded k/v, out: ~0.3 GiB
    # and it is still causal attention: the first query sees only the first key
    v0 = v[0].repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(-1)
    torch.testing.assert_close(out[0], v0, atol=0, rtol=0)


def test_contiguous_backend_needs_an_allocated_cache():
    layer = Attention(2, 2, 8, 1.0, 7, ContiguousCacheBackend())
    md = AttentionMetadata.build([2], [2])
    with pytest.raises(RuntimeError, match="layer 7 is not allocated"):
        layer(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8), md)


def test_metadata_build_matches_brute_force():
    query_lens, seq_lens, slots = [3, 1, 4], [3, 9, 6], [5, 0, 2]
    md = AttentionMetadata.build(query_lens, seq_lens, slots)
    assert md.cu_seqlens_q.tolist() == [0, 3, 4, 8] and md.cu_seqlens_q.dtype == torch.int32
    assert md.seq_lens.tolist() == seq_lens and md.slot_ids.tolist() == slots
    assert (md.max_seqlen_q, md.max_seqlen_k, md.num_seqs, md.num_tokens) == (4, 9, 3, 8)
    positions = [p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)]
    assert md.positions.tolist() == positions == [0, 1, 2, 8, 2, 3, 4, 5]
    assert md.token_seq_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert md.query_lens.tolist() == query_lens and md.last_token_indices.tolist() == [2, 3, 7]
    with pytest.raises(ValueError, match="query_len <= seq_len"):
        AttentionMetadata.build([3], [2])
    with pytest.raises(ValueError, match="share a cache slot"):
        AttentionMetadata.build([1, 1], [2, 2], [1, 1])
    with pytest.raises(ValueError, match="equal length"):
        AttentionMetadata.build([1], [2, 2])


def test_allocate_kv_cache_gives_each_layer_a_zeroed_view():
    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
            self.a = torch.nn.ModuleList(Attention(4, 2, 8, 1.0, i, ContiguousCacheBackend()) for i in (1, 0))

    model = TwoLayers()
    kv = allocate_kv_cache(model, num_slots=3, max_model_len=10)
    assert kv.shape == (2, 2, 3, 10, 2, 8) and kv.dtype == torch.bfloat16 and not kv.any()
    layer0, layer1 = model.a[1], model.a[0]
    assert layer0.k_cache.shape == (3, 10, 2, 8)
    assert (
        layer0.k_cache.data_ptr() == kv[0, 0].data_ptr() and layer1.v_cache.data_ptr() == kv[1, 1].data_ptr()
    )


def test_kv_cache_usage():
    usage = kv_cache_usage([3, 10, 0], num_slots=4, max_model_len=16, bytes_per_token=100)
    assert (usage.reserved_bytes, usage.used_bytes, usage.wasted_bytes) == (6400, 1300, 5100)
    assert usage.used_fraction == pytest.approx(13 / 64)
    with pytest.raises(ValueError):
        kv_cache_usage([17], num_slots=4, max_model_len=16, bytes_per_token=1)
    with pytest.raises(ValueError):
        kv_cache_usage([1] * 5, num_slots=4, max_model_len=16, bytes_per_token=1)
