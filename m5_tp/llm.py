"""m5's `LLM`: the same API, with the model split over `tensor_parallel_size` ranks.

    with LLM(model, tensor_parallel_size=2) as llm:   # starts 1 worker process (rank 1)
        outputs = llm.generate(prompts, params)
    # the workers are gone here; also when `llm` is garbage-collected or a rank fails

Under torchrun the same script runs on every rank: rank 0 gets a working `LLM`, while on the other
ranks `LLM(...)` serves rank 0 until it shuts down and then exits the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from m4_cudagraph.llm import LLM as BaseLLM
from m5_tp.llm_engine import LLMEngine


class LLM(BaseLLM):
    engine_cls = LLMEngine
    milestone = "m5_tp"
    supported_arguments = BaseLLM.supported_arguments | {"tensor_parallel_size", "distributed_backend"}

    def collective_rpc(self, fn: Callable[..., Any], args: tuple = ()) -> list[Any]:
        """fn(worker, *args) on every rank (a module-level function); results in rank order."""
        return self.llm_engine.model_runner.collective_rpc(fn, args)

    def shutdown(self) -> None:
        """Stop the worker processes now (also done on garbage collection and at exit)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
