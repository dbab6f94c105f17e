"""Milestone 4: CUDA graphs for decode (batch-size buckets, padding, one memory pool).

The public API is the previous milestone's, with this milestone's `LLM` and `LLMEngine` in place of
its own: `from m4_cudagraph import LLM, SamplingParams` is a complete engine."""

from m3_paged import *  # noqa: F403  (the API so far; the imports below override LLM and LLMEngine)
from m3_paged import __all__ as _previous_api
from m4_cudagraph.llm import LLM as LLM
from m4_cudagraph.llm_engine import LLMEngine as LLMEngine

__all__ = sorted(_previous_api)
