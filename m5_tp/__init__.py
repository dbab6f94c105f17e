"""Milestone 5: tensor parallelism. Parallel linear / embedding / LM-head layers injected into the
same model code, one process per rank (gloo on a CPU, NCCL on CUDA), and torchrun for several
machines."""

from m0_config import (
    BeamSearchParams,
    CompletionOutput,
    EngineConfig,
    RequestOutput,
    SamplingParams,
    toy_checkpoint,
)
from m5_tp.executor import MultiprocExecutor
from m5_tp.llm import LLM
from m5_tp.llm_engine import LLMEngine
from m5_tp.parallel_state import TensorParallelGroup, init_tensor_parallel_group

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "MultiprocExecutor",
    "RequestOutput",
    "SamplingParams",
    "TensorParallelGroup",
    "init_tensor_parallel_group",
    "toy_checkpoint",
]
