"""Milestone 3: paged KV blocks, prefix caching, a token-budget scheduler with preemption and
chunked prefill, and Triton kernels (store_kvcache, paged attention)."""

from m0_config import (
    BeamSearchParams,
    CompletionOutput,
    EngineConfig,
    RequestOutput,
    SamplingParams,
    toy_checkpoint,
)
from m3_paged.block_manager import BlockManager
from m3_paged.llm import LLM
from m3_paged.llm_engine import LLMEngine

__all__ = [
    "LLM",
    "BeamSearchParams",
    "BlockManager",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "toy_checkpoint",
]
