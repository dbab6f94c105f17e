"""Weight loading straight from safetensors: packed modules, tied heads, shards, and every error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from m0_config.config import SUPPORTED_ARCHITECTURES, ModelConfig
from m2_kvcache.layers import ModelLayers, QKVLinear
from m2_kvcache.model_loader import load_model
from m2_kvcache.models import MODEL_REGISTRY, get_model_class

pytestmark = pytest.mark.m2


def load(path: str, **kwargs):
    return load_model(ModelConfig(path, device="cpu", **kwargs))


@pytest.fixture
def edited(derived_checkpoint, rewrite_checkpoint, tmp_path):
    """A function: edited(arch, edit) -> a copy of the derived `arch` checkpoint with edited tensors."""
    return lambda arch, edit: rewrite_checkpoint(derived_checkpoint(arch), str(tmp_path / "edited"), edit)


def test_fused_parameters_hold_the_checkpoint_tensors(derived_checkpoint):
    path = derived_checkpoint("qwen2")
    model, tensors = load(path), load_file(os.path.join(path, "model.safetensors"))
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    prefix = "model.layers.1."
    for kind in ("weight", "bias"):
        parts = [tensors[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv"]
        torch.testing.assert_close(getattr(attn.qkv_proj, kind), torch.cat(parts), atol=0, rtol=0)
    gate_up = torch.cat([tensors[f"{prefix}mlp.gate_proj.weight"], tensors[f"{prefix}mlp.up_proj.weight"]])
    torch.testing.assert_close(mlp.gate_up_proj.weight, gate_up, atol=0, rtol=0)
    norm = model.model.layers[1].post_attention_layernorm.weight
    torch.testing.assert_close(norm, tensors[f"{prefix}post_attention_layernorm.weight"], atol=0, rtol=0)


def test_tied_and_untied_heads(derived_checkpoint, edited):
    tied = load(derived_checkpoint("qwen2"))  # the toy qwen2 ties; its checkpoint has no lm_head.weight
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied_path = derived_checkpoint("llama")
    untied, tensors = load(untied_path), load_file(os.path.join(untied_path, "model.safetensors"))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    torch.testing.assert_close(untied.lm_head.weight, tensors["lm_head.weight"], atol=0, rtol=0)
    # A tied checkpoint that also stores the head: the duplicate is skipped, the embedding wins.
    doubled = edited("qwen2", lambda t: {**t, "lm_head.weight": torch.zeros(512, 64)})
    model = load(doubled)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.abs().sum() > 0


def test_untied_checkpoint_without_head_is_an_error(edited):
    path = edited("llama", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\).*lm_head\.weight.*tie_word_embeddings=false"):
        load(path)


@pytest.mark.parametrize(
    "name",
    ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"],
)
def test_missing_tensor_is_named(edited, name):
    path = edited("qwen3", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(
        ValueError, match=rf"missing tensor\(s\) in the checkpoint: {name.replace('.', '[.]')}$"
    ):
        load(path)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("model.layers.0.self_attn.v_proj.weight", (32, 63)),  # packed into qkv_proj
        ("model.layers.1.mlp.gate_proj.weight", (127, 64)),  # packed into gate_up_proj
        ("model.layers.0.self_attn.q_norm.weight", (16,)),
        ("model.embed_tokens.weight", (480, 64)),
    ],
)
def test_misshaped_tensor_is_named_with_both_shapes(edited, name, shape):
    def edit(tensors):
        expected = tuple(tensors[name].shape)
        edit.expected = expected
        return {**tensors, name: torch.zeros(shape)}

    path = edited("qwen3", edit)
    with pytest.raises(ValueError) as info:
        load(path)
    message = str(info.value)
    assert name in message and str(shape) in message and str(edit.expected) in message


def test_unexpected_tensor_is_named(edited):
    extra = "model.layers.0.self_attn.extra_proj.weight"
    path = edited("qwen3", lambda t: {**t, extra: torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=f"unexpected tensor '{extra}'"):
        load(path)


def test_old_rotary_inv_freq_tensors_are_ignored(edited):
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    path = edited("llama", lambda t: {**t, inv_freq: torch.ones(8)})
    load(path)


def test_tensor_in_two_files_is_an_error(edited):
    path = edited("qwen3", lambda t: t)
    save_file({"model.norm.weight": torch.ones(64)}, os.path.join(path, "model-extra.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' appears twice"):
        load(path)


def test_sharded_checkpoint_loads_identically(derived_checkpoint):
    single, sharded = derived_checkpoint("llama"), derived_checkpoint("llama", max_shard_size="20KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 3
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    a, b = load(single).state_dict(), load(sharded).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_missing_shard_file_is_an_error(derived_checkpoint, tmp_path):
    path = shutil.copytree(derived_checkpoint("llama", max_shard_size="20KB"), tmp_path / "ckpt")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        first = sorted(set(json.load(f)["weight_map"].values()))[0]
    os.remove(os.path.join(path, first))
    with pytest.raises(ValueError, match=f"shard files that do not exist.*{first}"):
        load(str(path))


def test_loader_uses_each_layers_weight_loader(qwen3_dir):
    """The m5 extension point: a sharding layer sees every q/k/v tensor through its own loader."""

    class RecordingQKV(QKVLinear):
        def weight_loader(self, param, loaded_weight, shard_id=None):
            self.seen = [*getattr(self, "seen", []), shard_id]
            super().weight_loader(param, loaded_weight, shard_id)

    model = load_model(ModelConfig(qwen3_dir, device="cpu"), layers=ModelLayers(qkv_linear=RecordingQKV))
    for layer in model.model.layers:
        assert sorted(layer.self_attn.qkv_proj.seen) == ["k", "q", "v"]


def test_bfloat16_load(qwen3_dir):
    model = load(qwen3_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rope = model.model.layers[0].self_attn.rotary_emb
    assert rope.cos_cache.dtype == torch.float32  # angles stay exact; cast per use
    reference = load(qwen3_dir).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name].to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_unsupported_rope_scaling_is_rejected(derived_checkpoint, rope_type):
    path = derived_checkpoint("llama", rope_scaling={"rope_type": rope_type, "factor": 4.0})
    with pytest.raises(ValueError, match=f"rope_scaling type '{rope_type}' is not supported.*linear, llama3"):
        load(path)


def test_registry():
    assert tuple(MODEL_REGISTRY) == SUPPORTED_ARCHITECTURES
    with pytest.raises(
        ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen3ForCausalLM.*Llama"
    ):
        get_model_class("GPT2LMHeadModel")
