"""Milestone 0: configuration, sampling parameters, the Request/Sequence/SequenceData data model,
outputs, checkpoint loading and toy checkpoints. No engine yet."""

from m0_config.config import (
    SUPPORTED_ARCHITECTURES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from m0_config.loader import check_vocab, get_eos_token_ids, load_hf_config, load_hf_model, load_tokenizer
from m0_config.outputs import CompletionOutput, Logprob, RequestOutput
from m0_config.sampling_params import BeamSearchParams, SamplingParams, SamplingType
from m0_config.sequence import Request, Sequence, SequenceData, SequenceStatus
from m0_config.toy import toy_checkpoint, write_toy_checkpoint

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "BeamSearchParams",
    "CacheConfig",
    "CompletionOutput",
    "EngineConfig",
    "Logprob",
    "ModelConfig",
    "ParallelConfig",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "SamplingType",
    "SchedulerConfig",
    "Sequence",
    "SequenceData",
    "SequenceStatus",
    "check_vocab",
    "get_eos_token_ids",
    "load_hf_config",
    "load_hf_model",
    "load_tokenizer",
    "toy_checkpoint",
    "write_toy_checkpoint",
]
