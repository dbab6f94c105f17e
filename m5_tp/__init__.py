"""Milestone 5: tensor parallelism. Parallel linear / embedding / LM-head layers injected into the
same model code, one process per rank (gloo on a CPU, NCCL on CUDA), and torchrun for several
machines.

The public API is the previous milestone's, with this milestone's `LLM` and `LLMEngine` (and the
names below) in place of its own: `from m5_tp import LLM, SamplingParams` is a complete engine."""

from m4_cudagraph import *  # noqa: F403  (the API so far; the imports below override LLM and LLMEngine)
from m4_cudagraph import __all__ as _previous_api
from m5_tp.executor import MultiprocExecutor as MultiprocExecutor
from m5_tp.llm import LLM as LLM
from m5_tp.llm_engine import LLMEngine as LLMEngine
from m5_tp.parallel_state import (
    TensorParallelGroup as TensorParallelGroup,
)
from m5_tp.parallel_state import (
    init_tensor_parallel_group as init_tensor_parallel_group,
)

__all__ = sorted({*_previous_api, "MultiprocExecutor", "TensorParallelGroup", "init_tensor_parallel_group"})
