"""Milestone 3: paged KV blocks, prefix caching, a token-budget scheduler with preemption and
chunked prefill, and Triton kernels (store_kvcache, paged attention).

The public API is the previous milestone's, with this milestone's `LLM` and `LLMEngine` (and the
names below) in place of its own: `from m3_paged import LLM, SamplingParams` is a complete engine."""

from m2_kvcache import *  # noqa: F403  (the API so far; the imports below override LLM and LLMEngine)
from m2_kvcache import __all__ as _previous_api
from m3_paged.block_manager import BlockManager as BlockManager
from m3_paged.llm import LLM as LLM
from m3_paged.llm_engine import LLMEngine as LLMEngine

__all__ = sorted({*_previous_api, "BlockManager"})
