"""Toy checkpoints (deterministic, cached, loadable) and `python -m m0_config`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from m0_config.loader import load_tokenizer
from m0_config.toy import ARCHS, PRESETS, make_hf_config, toy_checkpoint, write_toy_checkpoint

pytestmark = pytest.mark.m0

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_bytes(path: str, name: str) -> bytes:
    with open(os.path.join(path, name), "rb") as f:
        return f.read()


def test_same_seed_same_bytes(qwen3_dir, tmp_path):
    # The cached qwen3 toy was written with seed 0; writing it again gives the same files.
    again = write_toy_checkpoint(str(tmp_path / "again"), "qwen3", seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert read_bytes(again, name) == read_bytes(qwen3_dir, name), name


def test_different_seed_different_weights(qwen3_dir, toy_cache_dir):
    other = toy_checkpoint("qwen3", seed=1, cache_dir=toy_cache_dir)
    a = load_file(os.path.join(qwen3_dir, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys()
    assert a["model.embed_tokens.weight"].shape == b["model.embed_tokens.weight"].shape
    # Every randomly initialised matrix differs (norm weights are ones in both).
    differing = [k for k in a if a[k].dim() == 2 and not a[k].equal(b[k])]
    assert differing == [k for k in a if a[k].dim() == 2]


def test_toy_checkpoint_is_cached(toy_cache_dir, qwen3_dir):
    config_file = os.path.join(qwen3_dir, "config.json")
    mtime = os.stat(config_file).st_mtime_ns
    assert toy_checkpoint("qwen3", cache_dir=toy_cache_dir) == qwen3_dir
    assert os.stat(config_file).st_mtime_ns == mtime  # reused, not rewritten
    # Different arguments, different folders.
    assert toy_checkpoint("llama", cache_dir=toy_cache_dir) != qwen3_dir
    assert toy_checkpoint("qwen3", seed=1, cache_dir=toy_cache_dir) != qwen3_dir


def test_toy_folder_contents(toy_arch_dir):
    names = set(os.listdir(toy_arch_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    with open(os.path.join(toy_arch_dir, "config.json")) as f:
        raw = json.load(f)
    tok = load_tokenizer(toy_arch_dir)
    assert len(tok) == 480
    assert raw["vocab_size"] % 64 == 0 and raw["vocab_size"] >= len(tok)  # padded beyond the tokenizer
    assert raw["eos_token_id"] == tok.eos_token_id


def test_qwen3_head_dim_is_not_hidden_over_heads(qwen3_dir):
    with open(os.path.join(qwen3_dir, "config.json")) as f:
        raw = json.load(f)
    # As in real Qwen3 checkpoints: head_dim * heads != hidden_size, so o_proj is not square.
    assert raw["head_dim"] * raw["num_attention_heads"] != raw["hidden_size"]


def test_chat_template(qwen3_dir):
    tok = load_tokenizer(qwen3_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # special tokens are single ids


def test_make_hf_config_errors():
    with pytest.raises(ValueError, match="unknown toy architecture 'gpt2'"):
        make_hf_config("gpt2", vocab_size=512)
    with pytest.raises(ValueError, match="unknown preset 'qwen3-72b'"):
        make_hf_config("qwen3", vocab_size=512, preset="qwen3-72b")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_preset_shapes(arch):
    cfg = make_hf_config(arch, vocab_size=512, preset="qwen3-0.6b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (1024, 28, 151936)
    assert cfg.architectures == ARCHS[arch]["architectures"]
    assert set(PRESETS) == {"qwen3-0.6b", "qwen3-8b"}


def test_python_dash_m_m0_config(toy_cache_dir, qwen3_dir):
    env = {**os.environ, "FOLOVLLM_CACHE": toy_cache_dir, "PYTHONPATH": ROOT}
    # The prompt is what `make demo` passes.
    cmd = [sys.executable, "-m", "m0_config", "Hello, my name is"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "== EngineConfig ==" in text and "== Model ==" in text
    assert f"model_config: ModelConfig(model='{qwen3_dir}'" in text  # the cached toy was reused
    assert "scheduler_config: SchedulerConfig(" in text and "Qwen3ForCausalLM" in text
    # The device is automatic: on a GPU, NCCL and the float32 toy in half precision.
    on_gpu = torch.cuda.is_available()
    assert f"distributed_backend='{'nccl' if on_gpu else 'gloo'}'" in text
    bytes_per_token = 2 * 2 * 2 * 32 * (2 if on_gpu else 4)  # K and V, layers, kv heads, head_dim, bytes
    assert f"KV-cache bytes/token: {bytes_per_token:,}" in text
