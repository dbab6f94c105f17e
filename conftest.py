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
