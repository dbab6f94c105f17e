"""m2's scheduler: continuous batching over KV-cache slots.

The cache has `max_num_seqs` slots of `max_model_len` tokens each. A waiting request is admitted
as soon as there is a free slot for each of its sequences, instead of waiting for the whole batch
to finish (m1). Each step is either a prefill step (newly admitted prompts, up to
`max_num_batched_tokens` tokens) or a decode step (one token for every running sequence);
prefill goes first so new requests join the running batch quickly. A finished sequence frees its
slot immediately.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from m0_config.config import EngineConfig
from m0_config.logger import init_logger
from m0_config.sequence import Request, Sequence, SequenceStatus
from m1_sampling.scheduler import Scheduler as StaticScheduler
from m1_sampling.scheduler import SchedulerOutput as BaseSchedulerOutput

logger = init_logger(__name__)


@dataclass
class SchedulerOutput(BaseSchedulerOutput):
    slot_ids: list[int] = field(default_factory=list)  # the cache slot of each scheduled sequence
    is_prefill: bool = False


class Scheduler(StaticScheduler):
    """Waiting requests, running requests, and a free list of cache slots."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.max_num_batched_tokens = config.scheduler_config.max_num_batched_tokens
        self.max_model_len = config.scheduler_config.max_model_len
        self.free_slots: deque[int] = deque(range(self.max_num_seqs))
        self.slot_of: dict[int, int] = {}  # seq_id -> slot

    def schedule(self) -> SchedulerOutput:
        out = self._schedule_prefills()
        return out if not out.is_empty else self._schedule_decodes()

    def _schedule_prefills(self) -> SchedulerOutput:
        out = SchedulerOutput(is_prefill=True)
        num_tokens = 0
        while self.waiting:
            req = self.waiting[0]
            if self._can_never_run(req):
                self.waiting.popleft()
                self._finish_request(req, SequenceStatus.FINISHED_IGNORED)
                continue
            prompt_tokens = req.num_seqs() * len(req.prompt_token_ids)
            fits_budget = num_tokens + prompt_tokens <= self.max_num_batched_tokens or out.is_empty
            if req.num_seqs() > len(self.free_slots) or not fits_budget:
                break
            self.waiting.popleft()
            self.running.append(req)
            for seq in req.seqs:
                seq.status = SequenceStatus.RUNNING
                self.slot_of[seq.seq_id] = self.free_slots.popleft()
                self._add(out, seq, seq.get_len(), req)
            num_tokens += prompt_tokens
        return out

    def _can_never_run(self, req: Request) -> bool:
        """More sequences than slots, or a prompt that leaves a slot no room for one output token.
        LLM.generate refuses both up front; a request added to the engine directly is finished
        ("length", no tokens) rather than blocking the queue or writing past its slot."""
        if req.num_seqs() <= self.max_num_seqs and len(req.prompt_token_ids) < self.max_model_len:
            return False
        logger.warning(
            "request %s has %d sequences and a %d-token prompt; %d slots of max_model_len=%d can never "
            "run it: finished as 'length'",
            req.request_id, req.num_seqs(), len(req.prompt_token_ids), self.max_num_seqs, self.max_model_len,
        )  # fmt: skip
        return True

    def _schedule_decodes(self) -> SchedulerOutput:
        out = SchedulerOutput(is_prefill=False)
        for req in self.running:
            for seq in req.get_seqs(SequenceStatus.RUNNING):
                self._add(out, seq, 1, req)
        return out

    def _add(self, out: SchedulerOutput, seq: Sequence, num_tokens: int, req: Request) -> None:
        out.add(seq, num_tokens, True, req.sampling_params)
        out.slot_ids.append(self.slot_of[seq.seq_id])

    def update_from_output(self, scheduler_output: SchedulerOutput) -> None:
        """The scheduled tokens are now in the cache; finished sequences give their slot back."""
        any_finished = False
        for seq, n in zip(scheduler_output.seqs, scheduler_output.num_scheduled_tokens):
            seq.data.num_computed_tokens += n
            any_finished = any_finished or seq.is_finished()
        if not any_finished:  # only a sequence that got a token this step can have finished in it
            return
        for req in list(self.running):
            for seq in req.seqs:
                if seq.is_finished() and seq.seq_id in self.slot_of:
                    self.free_slots.append(self.slot_of.pop(seq.seq_id))
            if req.is_finished():
                self.running.remove(req)
                self.finished.append(req)

    def _finish_request(self, req: Request, status: SequenceStatus) -> None:
        for seq in req.seqs:
            if seq.seq_id in self.slot_of:
                self.free_slots.append(self.slot_of.pop(seq.seq_id))
        super()._finish_request(req, status)
