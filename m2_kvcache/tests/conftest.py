"""Checkpoints derived from the toy ones: random biases and norm scales (HF initializes them to 0 and
1, which would hide a bias or norm that is loaded into the wrong place), config edits (RoPE scaling,
attention_bias), sharding, and tensor-level surgery for the loader's error paths."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable

import pytest
import torch

_COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def write_derived_checkpoint(
    src: str, dst: str, seed: int = 0, max_shard_size: str | None = None, **config_updates
) -> str:
    """`src` with config.json updated, every 1-D parameter random, saved by HF (optionally sharded)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(dst, exist_ok=True)
    for name in _COPIED:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    with open(os.path.join(src, "config.json")) as f:
        config = {**json.load(f), **config_updates}
    if "rope_scaling" in config_updates:  # the legacy spelling (as in Llama 3.1's config.json)
        config.pop("rope_parameters", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    hf_config = AutoConfig.from_pretrained(dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, _ = model.load_state_dict(load_file(os.path.join(src, "model.safetensors")), strict=False)
    assert all(n.endswith(".bias") or n == "lm_head.weight" for n in missing), missing
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales around 1, biases around 0, both clearly not the HF defaults
                noise = 0.3 * torch.randn(p.shape, generator=gen)
                p.copy_(1.0 + noise if "norm" in name else noise)
    model.save_pretrained(dst, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return dst


def rewrite_weights(src: str, dst: str, edit: Callable[[dict], dict]) -> str:
    """A copy of the single-file checkpoint `src` whose tensors dict went through `edit`."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for name in _COPIED:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    tensors = edit(load_file(os.path.join(src, "model.safetensors")))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    return dst


@pytest.fixture(scope="session")
def derived_checkpoint(toy_model_dir, tmp_path_factory):
    """A function: derived_checkpoint(arch, seed=0, max_shard_size=None, toy=None, **config_updates)
    -> folder. `toy` are overrides of the toy checkpoint itself (shape changes such as head_dim)."""
    made: dict[str, str] = {}

    def make(
        arch: str = "qwen3",
        seed: int = 0,
        max_shard_size: str | None = None,
        toy: dict | None = None,
        **config_updates,
    ) -> str:
        key = json.dumps([arch, seed, max_shard_size, toy, config_updates], sort_keys=True)
        if key not in made:
            dst = str(tmp_path_factory.mktemp(f"derived-{arch}"))
            made[key] = write_derived_checkpoint(
                toy_model_dir(arch, **(toy or {})), dst, seed, max_shard_size, **config_updates
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def rewrite_checkpoint():
    """A function: rewrite_checkpoint(src, dst, edit) -> dst, a copy whose tensors went through `edit`."""
    return rewrite_weights
