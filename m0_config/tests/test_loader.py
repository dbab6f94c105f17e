"""Loading toy checkpoints of every architecture: model, tokenizer (left padding), EOS ids, errors."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from m0_config.config import ModelConfig
from m0_config.loader import (
    check_vocab,
    count_parameters,
    get_eos_token_ids,
    load_hf_config,
    load_hf_model,
    load_tokenizer,
)
from m0_config.toy import train_tokenizer

pytestmark = pytest.mark.m0

PROMPTS = ["hello", "the model is fast and the cache is small"]  # different lengths: padding needed


def written_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def loaded(toy_arch_dir):
    """(folder, ModelConfig, HF model, tokenizer) for each toy architecture."""
    mc = ModelConfig(toy_arch_dir, device="cpu")
    return toy_arch_dir, mc, load_hf_model(mc), load_tokenizer(toy_arch_dir)


def test_model_matches_the_written_checkpoint(loaded):
    path, mc, model, _ = loaded
    raw = written_config(path)
    assert type(model).__name__ == raw["architectures"][0] == mc.architecture
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == raw["num_hidden_layers"] == len(model.model.layers)
    assert model.get_input_embeddings().weight.shape == (raw["vocab_size"], raw["hidden_size"])
    # Tied embeddings: Qwen toys share the matrix, the Llama toy has its own lm_head.
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == raw["tie_word_embeddings"]


def hf_param(params: dict, name: str) -> torch.Tensor:
    """The HF parameter (or slice) a checkpoint tensor became: transformers >= 5 stacks MoE experts,
    so the file's experts.{e}.gate_proj/up_proj/down_proj.weight are slices of experts.gate_up_proj
    (rows [gate | up] per expert) and experts.down_proj in memory."""
    prefix, sep, rest = name.partition(".experts.")
    if not sep:
        return params[name]
    expert, proj, _ = rest.split(".")
    if proj == "down_proj":
        return params[f"{prefix}.experts.down_proj"][int(expert)]
    gate, up = params[f"{prefix}.experts.gate_up_proj"][int(expert)].chunk(2)
    return gate if proj == "gate_proj" else up


def test_weights_are_the_safetensors_weights(loaded):
    path, _, model, _ = loaded
    saved = load_file(os.path.join(path, "model.safetensors"))
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        torch.testing.assert_close(hf_param(params, name), tensor, rtol=0, atol=0)
    # count_parameters counts a tied matrix once, which is what the file stores.
    assert count_parameters(model) == sum(t.numel() for t in saved.values())


def test_shape_properties_match_the_modules(loaded):
    _, mc, model, _ = loaded
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == mc.num_attention_heads * mc.head_dim
    assert attn.k_proj.out_features == mc.num_kv_heads * mc.head_dim
    assert attn.v_proj.out_features == mc.num_kv_heads * mc.head_dim
    assert mc.num_layers == len(model.model.layers)


def test_kv_cache_bytes_per_token_matches_hfs_cache(loaded):
    _, mc, model, _ = loaded
    num_tokens = 7
    with torch.no_grad():
        out = model(torch.arange(1, num_tokens + 1)[None], use_cache=True)
    layers = out.past_key_values.layers
    # keys / values: (batch=1, num_kv_heads, num_tokens, head_dim) per layer
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    assert total == mc.kv_cache_bytes_per_token() * num_tokens


def test_tokenizer_pads_on_the_left(loaded):
    _, _, _, tok = loaded
    assert tok.padding_side == "left"
    assert tok.pad_token is not None and tok.pad_token_id is not None
    batch = tok(PROMPTS, padding=True)
    singles = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(len(s) for s in singles)
    for ids, mask, single in zip(batch["input_ids"], batch["attention_mask"], singles):
        pad = width - len(single)
        assert mask == [0] * pad + [1] * len(single)  # zeros first, then ones
        assert ids == [tok.pad_token_id] * pad + single  # real tokens flush right
    assert batch["attention_mask"][0].count(0) > 0  # the short prompt really was padded


def test_left_padding_keeps_the_next_token_logits(loaded):
    """The padded batch gives each prompt the same last-position logits as running it alone,
    so generation can append on the right of every row at once."""
    _, _, model, tok = loaded
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate does for left padding
    with torch.no_grad():
        padded = model(batch["input_ids"], attention_mask=mask, position_ids=position_ids).logits[:, -1]
        for row, prompt in enumerate(PROMPTS):
            alone = model(tok(prompt, return_tensors="pt")["input_ids"]).logits[0, -1]
            torch.testing.assert_close(padded[row], alone, rtol=1e-4, atol=1e-5)


def test_pad_token(loaded):
    path, _, _, tok = loaded
    # Every toy has an EOS; the Llama toy ships without a pad token, so the loader reuses EOS.
    assert tok.pad_token == "<|endoftext|>" == tok.eos_token
    if written_config(path)["architectures"] == ["LlamaForCausalLM"]:
        assert tok.bos_token == "<|begin_of_text|>"
        assert tok("hello")["input_ids"][0] == tok.bos_token_id  # Llama prepends BOS


def test_pad_token_is_added_when_there_is_no_eos(tmp_path):
    tok = train_tokenizer()
    tok.eos_token = None
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|pad|>"
    assert len(loaded) == len(tok) + 1 and loaded.pad_token_id == len(tok)


def test_get_eos_token_ids_includes_generation_config(loaded):
    path, _, _, tok = loaded
    with open(os.path.join(path, "generation_config.json")) as f:
        listed = json.load(f)["eos_token_id"]
    assert isinstance(listed, list) and len(listed) == 2
    ids = get_eos_token_ids(tok, path)
    assert ids[0] == tok.eos_token_id
    assert set(ids) == {tok.eos_token_id, *listed}
    assert len(ids) == len(set(ids))  # no duplicates
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_get_eos_token_ids_edge_cases(tmp_path):
    assert get_eos_token_ids(SimpleNamespace(eos_token_id=5), str(tmp_path)) == [5]  # no generation config
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert get_eos_token_ids(SimpleNamespace(eos_token_id=5), str(tmp_path)) == [5, 9]  # an int
    assert get_eos_token_ids(SimpleNamespace(eos_token_id=None), str(tmp_path)) == [9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6, 7]}))
    assert get_eos_token_ids(SimpleNamespace(eos_token_id=5), str(tmp_path)) == [5, 6, 7]


def test_without_generation_config_the_eos_of_config_json_counts(tmp_path):
    """No generation_config.json: HF transformers (GenerationConfig.from_model_config) and vLLM take
    the generation defaults from config.json, so its eos_token_id ends generation too."""
    from transformers import AutoConfig, GenerationConfig

    tok = SimpleNamespace(eos_token_id=5)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "eos_token_id": [7, 8]}))
    assert get_eos_token_ids(tok, str(tmp_path)) == [5, 7, 8]
    hf = GenerationConfig.from_model_config(AutoConfig.from_pretrained(tmp_path)).eos_token_id
    assert set(hf) <= set(get_eos_token_ids(tok, str(tmp_path)))
    # With a generation_config.json, that file alone decides (as in HF): config.json is not read.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert get_eos_token_ids(tok, str(tmp_path)) == [5, 9]


def test_check_vocab(qwen3_dir):
    tok = load_tokenizer(qwen3_dir)
    cfg = load_hf_config(qwen3_dir)
    assert len(tok) < cfg.vocab_size  # a padded model vocabulary is normal ...
    check_vocab(tok, cfg)
    check_vocab(tok, SimpleNamespace(vocab_size=len(tok)))  # ... and so is an exact fit
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tok)} tokens but .* vocab_size is 100"):
        check_vocab(tok, SimpleNamespace(vocab_size=100))


def test_check_vocab_on_a_checkpoint_with_a_smaller_vocab(qwen3_dir, tmp_path):
    # The toy's tokenizer (480 tokens) next to a config.json that claims a 256-token vocabulary.
    small = tmp_path / "small"
    shutil.copytree(qwen3_dir, small)
    raw = written_config(str(small))
    raw["vocab_size"] = 256
    (small / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="tokenizer has 480 tokens .* does not belong to this checkpoint"):
        check_vocab(load_tokenizer(str(small)), load_hf_config(str(small)))


def test_load_in_bfloat16(qwen3_dir):
    model = load_hf_model(ModelConfig(qwen3_dir, device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_clear_errors_for_bad_folders(tmp_path, qwen3_dir):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_config(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tokenizer folder .* does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_hf_config(str(tmp_path))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        load_hf_config(str(gpt2))
    # A real checkpoint whose config.json names an unsupported architecture is rejected too.
    renamed = tmp_path / "renamed"
    shutil.copytree(qwen3_dir, renamed)
    raw = written_config(str(renamed))
    raw["architectures"] = ["Qwen2MoeForCausalLM"]  # MoE with a shared expert: not supported
    (renamed / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="supported architectures: Qwen3ForCausalLM"):
        ModelConfig(str(renamed))
