"""m4's fused kernels against their torch references (m2's layer code), and a whole model built from
the fused layers against the same model built from m2's.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (small shapes); the `gpu` case
repeats the comparisons at Qwen3-0.6B sizes in bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from m0_config.config import ModelConfig
from m2_kvcache.attention import AttentionMetadata, NoCacheBackend
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.rotary_embedding import compute_inv_freq
from m2_kvcache.model_loader import load_model
from m4_cudagraph.fused_layers import (
    FusedRMSNorm,
    FusedRotaryEmbedding,
    FusedSiluAndMul,
    SplitKRowLinear,
    fused_layers,
)
from m4_cudagraph.ops import (
    rms_norm,
    rms_norm_ref,
    rotary_embedding,
    rotary_embedding_and_cache,
    rotary_embedding_and_cache_ref,
    rotary_embedding_ref,
    silu_and_mul,
    silu_and_mul_ref,
)

pytestmark = pytest.mark.m4

# float32 kernels round once where the reference rounds once too; bfloat16 may differ by an ulp.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """q, k as (num_tokens, heads, head_dim) strided views into one fused qkv projection output."""
    g = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=g).to(device=device, dtype=dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 96), (33, 1024)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_hidden(device, dtype, num_tokens, hidden, with_residual):
    g = torch.Generator().manual_seed(num_tokens)
    x, res, w = (
        torch.randn(*s, generator=g).to(device, dtype) for s in [(num_tokens, hidden)] * 2 + [(hidden,)]
    )
    residual = res if with_residual else None
    got, expected = rms_norm(x, w, 1e-6, residual), rms_norm_ref(x, w, 1e-6, residual)
    for a, e in zip(*((got, expected) if with_residual else ((got,), (expected,)))):
        close(a, e, dtype)
    if with_residual:  # the inputs are not modified
        torch.testing.assert_close(res, residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_heads,head_dim", [(2, 4, 32), (5, 3, 24), (17, 16, 128)])
def test_rms_norm_per_head_on_strided_view(device, dtype, num_tokens, num_heads, head_dim):
    q, _ = qkv_views(num_tokens, num_heads, 2, head_dim, dtype, device)
    assert q.stride(0) > num_heads * head_dim  # rows are strided by the whole qkv width
    w = torch.randn(head_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    close(rms_norm(q, w, 1e-6), rms_norm_ref(q, w, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens,num_heads,num_kv_heads,head_dim", [(1, 4, 2, 32), (9, 6, 2, 24), (40, 16, 8, 128)]
)
@pytest.mark.parametrize("with_qk_norm", [False, True])
def test_rotary_in_place_equals_reference(
    device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, with_qk_norm
):
    q, k = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(head_dim, generator=g).to(device, dtype) for _ in range(2)]
    qk_norm = (*weights, 1e-6) if with_qk_norm else None
    inv_freq = compute_inv_freq(head_dim, 10000.0)
    max_pos = 4096
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos().to(device), freqs.sin().to(device)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=torch.Generator().manual_seed(2)).to(
        device
    )
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, cos, sin, qk_norm)  # new tensors
    q_out, k_out = rotary_embedding(positions, q, k, cos, sin, qk_norm)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    # With the norm, values reach ~4 (random weights), where one bfloat16 ulp is 0.03.
    tol = dict(atol=6e-2, rtol=2e-2) if with_qk_norm and dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(q.float(), q_ref.float(), **tol)
    torch.testing.assert_close(k.float(), k_ref.float(), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens,num_heads,num_kv_heads,head_dim,block_size",
    [(1, 4, 2, 32, 16), (9, 6, 2, 24, 4), (40, 16, 8, 128, 16)],
)
@pytest.mark.parametrize("with_qk_norm", [False, True])
def test_rotary_and_cache_equals_rope_then_store(
    device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size, with_qk_norm
):
    """q rotated in place; the rotated k and v land in their cache slots exactly where m3's store puts
    them (slot -1 rows nowhere), every other cache entry untouched; k itself is left alone."""
    g = torch.Generator().manual_seed(7)
    q, k = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(device, dtype)
    weights = [torch.randn(head_dim, generator=g).to(device, dtype) for _ in range(2)]
    qk_norm = (*weights, 1e-6) if with_qk_norm else None
    freqs = torch.outer(torch.arange(512, dtype=torch.float32), compute_inv_freq(head_dim, 10000.0))
    cos, sin = freqs.cos().to(device), freqs.sin().to(device)
    positions = torch.randint(0, 512, (num_tokens,), generator=g).to(device)
    num_blocks = -(-num_tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1  # padding rows of a graph batch write nowhere
    slots = slots.to(device)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(cache_shape, generator=g).to(device, dtype) for _ in range(2))
    k_before, expected_k_cache, expected_v_cache = k.clone(), k_cache.clone(), v_cache.clone()
    q_ref = rotary_embedding_and_cache_ref(
        positions, q.clone(), k.clone(), v, cos, sin, expected_k_cache, expected_v_cache, slots, qk_norm
    )
    q_out = rotary_embedding_and_cache(positions, q, k, v, cos, sin, k_cache, v_cache, slots, qk_norm)
    assert q_out.data_ptr() == q.data_ptr() and torch.equal(k, k_before)
    tol = dict(atol=6e-2, rtol=2e-2) if with_qk_norm and dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(q.float(), q_ref.float(), **tol)
    torch.testing.assert_close(k_cache.float(), expected_k_cache.float(), **tol)
    assert torch.equal(v_cache, expected_v_cache)  # a copy: bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,d", [(1, 64), (6, 1500), (33, 3072)])
def test_silu_and_mul(device, dtype, num_tokens, d):
    x = torch.randn(num_tokens, 2 * d, generator=torch.Generator().manual_seed(d)).to(device, dtype) * 4
    close(silu_and_mul(x), silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fused_model_equals_m2_model(toy_model_dir, arch, device):
    """The whole decoder built from the fused layers gives m2's logits (same checkpoint, float32). On
    a GPU the 18-token batch also takes the split-K row linears (their partials summed by the norms)."""
    mc = ModelConfig(toy_model_dir(arch), device=device, dtype="float32")
    plain = load_model(mc, attn_backend=NoCacheBackend(), layers=ModelLayers())
    fused = load_model(mc, attn_backend=NoCacheBackend(), layers=fused_layers())
    layer = fused.model.layers[0]
    assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(layer.mlp.act_fn, FusedSiluAndMul)
    assert isinstance(layer.self_attn.rotary_emb, FusedRotaryEmbedding)
    assert isinstance(layer.self_attn.o_proj, SplitKRowLinear) and isinstance(
        layer.mlp.down_proj, SplitKRowLinear
    )
    lens = [5, 1, 12]
    md = AttentionMetadata.build(lens, lens, device=device)
    input_ids = torch.randint(0, 400, (sum(lens),), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.inference_mode():
        expected = plain.compute_logits(plain(input_ids, md.positions, md))
        got = fused.compute_logits(fused(input_ids, md.positions, md))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_cache_backend_engine_equals_m3(toy_arch_dir, device):
    """m4 on the Triton backend (RoPE and the cache write in one kernel; Triton's interpreter on a
    CPU) gives the greedy tokens of m3 on the torch backend, through prefill, prefix hits and decode."""
    import m3_paged
    import m4_cudagraph
    from m4_cudagraph.fused_attention import RopeCacheTritonBackend

    prompts = ["Hello, my name is", "Hello, my name is Bob and", "a b c d e f g h"]
    params = m4_cudagraph.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kw = dict(device=device, dtype="float32", block_size=4, kv_cache_memory_bytes=2**22)
    m3 = m3_paged.LLM(toy_arch_dir, attention_backend="torch", **kw)
    expected = [o.outputs[0].token_ids for o in m3.generate(prompts, params, use_tqdm=False)]
    m4 = m4_cudagraph.LLM(toy_arch_dir, attention_backend="triton", **kw)
    assert isinstance(m4.llm_engine.model_runner.attn_backend, RopeCacheTritonBackend)
    for _ in range(2):  # the second round hits the prefix cache
        got = [o.outputs[0].token_ids for o in m4.generate(prompts, params, use_tqdm=False)]
        assert got == expected
