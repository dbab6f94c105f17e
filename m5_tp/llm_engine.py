"""m5's engine: the previous milestone's loop with the tensor-parallel executor as its model runner.

The scheduler, the sampler and the detokenizer stay on the driver (rank 0); only the model is
split. The executor has the runner's interface, so nothing else changes.
"""

from __future__ import annotations

from m4_cudagraph.llm_engine import LLMEngine as BaseEngine
from m5_tp.executor import MultiprocExecutor


class LLMEngine(BaseEngine):
    model_runner_cls = MultiprocExecutor

    def shutdown(self) -> None:
        """Stop the worker processes; the engine cannot run afterwards."""
        self.model_runner.shutdown()
