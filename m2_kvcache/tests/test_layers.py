"""Each layer against HF transformers' implementation or a brute-force formula."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from m0_config.toy import make_hf_config
from m2_kvcache.layers import (
    Attention,
    LMHead,
    MergedColumnLinear,
    QKVLinear,
    RMSNorm,
    RowLinear,
    SiluAndMul,
    VocabEmbedding,
    default_weight_loader,
    get_rope,
    rope_config,
)

pytestmark = pytest.mark.m2

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_hf(with_residual):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x, residual = torch.randn(7, 64), torch.randn(7, 64)
    ours, theirs = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    ours.weight.copy_(torch.randn(64))
    theirs.weight.data.copy_(ours.weight)
    if not with_residual:
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
        return
    out, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(out, theirs(x + residual), atol=1e-6, rtol=1e-6)


def test_rms_norm_per_head():
    """Qwen3's q/k norm: each head vector is normalized on its own."""
    torch.manual_seed(0)
    q = torch.randn(5, 4, 32)
    norm = RMSNorm(32)
    torch.testing.assert_close(norm(q), torch.stack([norm(q[:, h]) for h in range(4)], dim=1))


def test_silu_and_mul():
    torch.manual_seed(0)
    x = torch.randn(6, 2 * 48)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :48]) * x[:, 48:])


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {**LLAMA3, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("rope_type", list(ROPE_CASES))
def test_rope_matches_hf(rope_type, head_dim):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    scaling = ROPE_CASES[rope_type]
    params = {"rope_theta": 500000.0, "rope_type": "default", **(scaling or {})}
    hf_config = make_hf_config(
        "llama",
        512,
        num_attention_heads=2,
        hidden_size=2 * head_dim,
        head_dim=head_dim,
        rope_parameters=params,
    )
    theta, scaling_read = rope_config(hf_config)
    assert theta == 500000.0 and (scaling_read or {}).get("rope_type") == (scaling or {}).get("rope_type")
    rope = get_rope(head_dim, 512, theta, scaling_read)
    torch.manual_seed(0)
    positions = torch.randint(0, 512, (9,))
    q, k = torch.randn(9, 4, head_dim), torch.randn(9, 2, head_dim)
    q_out, k_out = rope(positions, q, k)

    cos, sin = LlamaRotaryEmbedding(hf_config)(q, positions[None])  # (1, num_tokens, head_dim)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_rope_scaling_changes_the_rotation():
    """Guards the test above: a scaling type that were ignored would give the default rotation."""
    positions, q = torch.arange(100), torch.randn(100, 1, 64)
    default = get_rope(64, 512, 10000.0)(positions, q, q)[0]
    for scaling in ROPE_CASES.values():
        if scaling is not None:
            assert not torch.allclose(get_rope(64, 512, 10000.0, scaling)(positions, q, q)[0], default)


def test_rope_config_reads_both_spellings():
    new = make_hf_config("llama", 512, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    assert rope_config(new) == (1e6, None)
    old = SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_config(old) == (5e5, {"type": "linear", "factor": 2.0, "rope_type": "linear"})
    assert rope_config(SimpleNamespace(rope_theta=5e5, rope_scaling=None)) == (5e5, None)
    assert rope_config(SimpleNamespace(rope_theta=5e5, rope_scaling={"rope_type": "default"})) == (5e5, None)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope", "mrope"])
def test_rope_rejects_unsupported_scaling(rope_type):
    with pytest.raises(ValueError, match=rf"{rope_type}.*supported types: default, linear, llama3"):
        get_rope(64, 512, 10000.0, {"rope_type": rope_type, "factor": 2.0})


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_linear_loads_shards_into_place(bias):
    torch.manual_seed(0)
    layer = QKVLinear(hidden_size=32, head_size=8, total_num_heads=4, total_num_kv_heads=2, bias=bias)
    assert (layer.num_heads, layer.num_kv_heads, layer.q_size, layer.kv_size) == (4, 2, 32, 16)
    parts = {"q": torch.randn(32, 32), "k": torch.randn(16, 32), "v": torch.randn(16, 32)}
    biases = {"q": torch.randn(32), "k": torch.randn(16), "v": torch.randn(16)}
    for shard in "vqk":  # order of arrival must not matter
        layer.weight_loader(layer.weight, parts[shard], shard)
        if bias:
            layer.weight_loader(layer.bias, biases[shard], shard)
    x = torch.randn(5, 32)
    expected = torch.cat([F.linear(x, parts[s], biases[s] if bias else None) for s in "qkv"], dim=-1)
    torch.testing.assert_close(layer(x), expected)


def test_merged_column_linear_loads_shards_into_place():
    torch.manual_seed(0)
    layer = MergedColumnLinear(16, [24, 24])
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    layer.weight_loader(layer.weight, up, 1)
    layer.weight_loader(layer.weight, gate, 0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))


def test_linear_loaders_reject_bad_shapes_and_shards():
    qkv = QKVLinear(32, 8, 4, 2)
    with pytest.raises(ValueError, match=r"\(17, 32\).*\(16, 32\)"):
        qkv.weight_loader(qkv.weight, torch.zeros(17, 32), "k")
    with pytest.raises(ValueError, match="shard_id must be 'q', 'k' or 'v'"):
        qkv.weight_loader(qkv.weight, torch.zeros(16, 32), "x")
    merged = MergedColumnLinear(16, [24, 24])
    with pytest.raises(ValueError, match="shard_id must be an int in 0..1"):
        merged.weight_loader(merged.weight, torch.zeros(24, 16), 2)
    row = RowLinear(8, 4, bias=True)
    with pytest.raises(ValueError, match=r"\(5,\).*\(4,\)"):
        row.weight_loader(row.bias, torch.zeros(5))
    with pytest.raises(ValueError, match="not fused"):
        default_weight_loader(row.weight, torch.zeros(4, 8), "q")


def test_tied_lm_head_is_the_embedding():
    torch.manual_seed(0)
    embedding, head = VocabEmbedding(50, 8), LMHead(50, 8)
    embedding.weight_loader(embedding.weight, torch.randn(50, 8))
    head.tie_weights(embedding)
    assert head.weight is embedding.weight
    hidden = torch.randn(3, 8)
    torch.testing.assert_close(head(hidden), hidden @ embedding.weight.T)
    torch.testing.assert_close(embedding(torch.tensor([4, 0])), embedding.weight[[4, 0]])


def test_attention_layer_delegates_to_its_backend():
    calls = []

    class Recorder:
        def forward(self, layer, q, k, v, attn_metadata):
            calls.append((layer, q.shape, k.shape, attn_metadata))
            return q.reshape(q.shape[0], -1)

    layer = Attention(num_heads=4, num_kv_heads=2, head_dim=8, scale=0.5, layer_idx=3, backend=Recorder())
    assert layer.k_cache.numel() == 0 and layer.v_cache.numel() == 0  # until the runner allocates
    q, k = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    out = layer(q, k, k, "metadata")
    assert out.shape == (5, 32) and calls == [(layer, (5, 4, 8), (5, 2, 8), "metadata")]
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(4, 3, 8, 0.5, 0, Recorder())
