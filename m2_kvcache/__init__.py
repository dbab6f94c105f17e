"""Milestone 2: the project's own Qwen3 / Qwen2 / Llama code, safetensors loading, a contiguous
KV cache and continuous batching over cache slots."""

from m0_config import (
    BeamSearchParams,
    CompletionOutput,
    EngineConfig,
    RequestOutput,
    SamplingParams,
    toy_checkpoint,
)
from m2_kvcache.llm import LLM
from m2_kvcache.llm_engine import LLMEngine
from m2_kvcache.model_loader import load_model

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "load_model",
    "toy_checkpoint",
]
