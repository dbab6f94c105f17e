"""Milestone 2: the project's own Qwen3 / Qwen2 / Llama code, safetensors loading, a contiguous
KV cache and continuous batching over cache slots.

The public API is the previous milestone's, with this milestone's `LLM` and `LLMEngine` (and the
names below) in place of its own: `from m2_kvcache import LLM, SamplingParams` is a complete engine."""

from m1_sampling import *  # noqa: F403  (the API so far; the imports below override LLM and LLMEngine)
from m1_sampling import __all__ as _previous_api
from m2_kvcache.llm import LLM as LLM
from m2_kvcache.llm_engine import LLMEngine as LLMEngine
from m2_kvcache.model_loader import load_model as load_model

__all__ = sorted({*_previous_api, "load_model"})
