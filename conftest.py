"""Shared fixtures: toy checkpoints (made locally, cached per machine) and the gpu marker."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter. The variable must be set before anything
# (transformers included) imports Triton, or helpers such as tl.zeros are built for a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m0_config.toy import ARCHS, toy_checkpoint

TOY_ARCHS = sorted(ARCHS)  # llama, qwen2, qwen3, qwen3_moe


@pytest.fixture(scope="session")
def toy_cache_dir(tmp_path_factory) -> str:
    """One cache folder per test session unless FOLOVLLM_CACHE points at a persistent one."""
    return os.environ.get("FOLOVLLM_CACHE") or str(tmp_path_factory.mktemp("folovllm-cache"))


@pytest.fixture(scope="session")
def toy_model_dir(toy_cache_dir):
    """A function: toy_model_dir("llama", **overrides) -> checkpoint folder."""

    def make(arch: str = "qwen3", **kwargs) -> str:
        return toy_checkpoint(arch, cache_dir=toy_cache_dir, **kwargs)

    return make


@pytest.fixture(scope="session", params=TOY_ARCHS)
def toy_arch_dir(request, toy_model_dir) -> str:
    """Parametrized over every toy architecture."""
    return toy_model_dir(request.param)


@pytest.fixture(scope="session")
def qwen3_dir(toy_model_dir) -> str:
    return toy_model_dir("qwen3")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_greedy():
    """A function: hf_greedy(model_dir, prompts, max_new_tokens) -> HF `generate` greedy token ids,
    one prompt at a time (no padding), float32 on the CPU, stopping at the checkpoint's EOS ids."""
    from m0_config.config import ModelConfig
    from m0_config.loader import load_hf_model, load_tokenizer

    def run(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        model = load_hf_model(ModelConfig(model_dir, device="cpu", dtype="float32"))
        tok = load_tokenizer(model_dir)
        outs = []
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
            outs.append(gen[0, ids.shape[1] :].tolist())
        return outs

    return run


@pytest.fixture
def spy_chunks():
    """A function: spy_chunks(engine) -> a list that gets one bool per scheduled row of every later
    step, True for a non-final prefill chunk (a row that computes tokens but does not sample)."""

    def install(engine) -> list[bool]:
        chunked: list[bool] = []
        schedule = engine.scheduler.schedule

        def spy():
            out = schedule()
            chunked.extend(not s for s in out.samples)
            return out

        engine.scheduler.schedule = spy  # an instance attribute: this engine only
        return chunked

    return install
