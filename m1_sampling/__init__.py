"""Milestone 1: the sampler, n / best_of, beam search, stop conditions and a first LLM.generate
on the Hugging Face model (static batching, no KV cache)."""

from m0_config import (
    BeamSearchParams,
    CompletionOutput,
    EngineConfig,
    RequestOutput,
    SamplingParams,
    toy_checkpoint,
)
from m1_sampling.beam_search import BeamSearchOutput, BeamSearchSequence
from m1_sampling.llm import LLM
from m1_sampling.llm_engine import LLMEngine
from m1_sampling.sampler import Sampler

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "Sampler",
    "SamplingParams",
    "toy_checkpoint",
]
