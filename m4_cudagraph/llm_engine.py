"""m4's engine: m3's with the CUDA-graph model runner, and async scheduling (async_scheduling.py):
the host schedules step n+1 while the GPU runs step n, then reads step n's tokens."""

from __future__ import annotations

import torch

from m0_config.config import EngineConfig
from m0_config.outputs import RequestOutput
from m3_paged.llm_engine import LLMEngine as PagedEngine
from m3_paged.scheduler import SchedulerOutput
from m4_cudagraph.async_scheduling import StepInFlight, needs_token_values, take_rows
from m4_cudagraph.model_runner import ModelRunner
from m4_cudagraph.sampler import FusedSampler, sampler_for


class LLMEngine(PagedEngine):
    model_runner_cls = ModelRunner

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.sampler = sampler_for(config.model_config.device)  # one fused kernel for plain batches
        if isinstance(self.sampler, FusedSampler):
            mc = config.model_config
            self.sampler.warm_up(self.model_runner.vocab_size, [mc.torch_dtype, torch.float32], mc.device)
        self.async_scheduling = self.resolve_async_scheduling()
        self.in_flight: StepInFlight | None = None  # the launched step whose tokens are not read yet

    def resolve_async_scheduling(self) -> bool:
        """The user's choice; unset means on where it pays and works: on a GPU with CUDA graphs (a CPU
        runs every op before returning, so there is nothing to overlap) and one rank (m5's workers
        would need each step's sampled ids; EngineConfig rejects async_scheduling=True with TP)."""
        cfg = self.config
        if cfg.scheduler_config.async_scheduling is not None:
            return cfg.scheduler_config.async_scheduling
        return (
            cfg.model_config.device.type == "cuda"
            and not cfg.enforce_eager
            and cfg.parallel_config.tensor_parallel_size == 1
        )

    def has_unfinished_requests(self) -> bool:
        return self.in_flight is not None or super().has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read the previous one's tokens while the GPU runs it."""
        if not self.async_scheduling:
            return super().step()
        if self.in_flight is not None and self._next_step_needs_token_values():
            self._resolve(self.in_flight)
            self.in_flight = None
        scheduler_output = self.scheduler.schedule()
        launched = None if scheduler_output.is_empty else self._launch(scheduler_output)
        self.scheduler.update_from_output(scheduler_output)  # lengths only: placeholders are counted
        if self.in_flight is not None:
            self._resolve(self.in_flight)  # waits for the previous step; the GPU has the new one queued
        self.in_flight = launched
        return [self._make_output(req) for req in self.scheduler.pop_finished_requests()]

    def _next_step_needs_token_values(self) -> bool:
        return any(needs_token_values(req.sampling_params) for req in self.scheduler.running)

    def _launch(self, so: SchedulerOutput) -> StepInFlight | None:
        """Run the model and the sampler on `so` without reading anything back; None when no row
        samples (only non-final prompt chunks)."""
        so.prev_sampled_token_ids = None if self.in_flight is None else self.in_flight.sampled_token_ids
        sampled = self._sample(so, self.model_runner.execute_model(so))
        return None if sampled is None else StepInFlight.launch(*sampled)

    @staticmethod
    def _wait_for(step: StepInFlight):
        """The host's only wait for the GPU: the previous step's sampled ids in host memory."""
        return step.wait()

    def _resolve(self, step: StepInFlight) -> None:
        """Swap each row's oldest placeholder for its real token through the synchronous path
        (`_append_tokens`: append, detokenize, stop checks), then hash and free as a synchronous
        step's `update_from_output` would. A row whose sequence finished meanwhile (it stopped one
        step earlier, or was aborted) is dropped with its placeholders."""
        out = self._wait_for(step)
        rows = [i for i, seq in enumerate(step.seqs) if not seq.is_finished()]
        for seq in step.seqs:
            if seq.is_finished():
                while seq.data.num_placeholders:
                    seq.data.pop_placeholder()
        seqs = [step.seqs[i] for i in rows]
        # A row scheduled again already carries the next step's placeholder on top of this one.
        newer = [[seq.data.pop_placeholder() for _ in range(seq.data.num_placeholders - 1)] for seq in seqs]
        for seq in seqs:
            seq.data.pop_placeholder()
        if len(rows) < len(step.seqs):
            out = take_rows(out, rows)
        self._append_tokens(seqs, [step.params[i] for i in rows], out)
        for seq, ids in zip(seqs, newer):
            if not seq.is_finished():  # a finished sequence's newer row is dropped when it resolves
                for pid in reversed(ids):
                    seq.data.append_placeholder(pid)
        self.scheduler.on_tokens_resolved(seqs)
