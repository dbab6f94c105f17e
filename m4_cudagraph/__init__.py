"""Milestone 4: CUDA graphs for decode (batch-size buckets, padding, one memory pool)."""

from m0_config import (
    BeamSearchParams,
    CompletionOutput,
    EngineConfig,
    RequestOutput,
    SamplingParams,
    toy_checkpoint,
)
from m4_cudagraph.llm import LLM
from m4_cudagraph.llm_engine import LLMEngine

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "toy_checkpoint",
]
