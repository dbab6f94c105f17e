"""m1's scheduler: static batching. A batch is admitted only when the previous one has finished.

Every step schedules every token of every running sequence (there is no KV cache, so nothing is
remembered between steps). m2 replaces this with continuous batching over cache slots.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from m0_config.config import EngineConfig
from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Request, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What one engine step computes. Row i of every list belongs to `seqs[i]`."""

    seqs: list[Sequence] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)  # tokens computed for each seq
    # Whether the row's sampled token is kept. False for a non-final prefill chunk (m3): its
    # logits belong to a prompt position whose next token is already known.
    samples: list[bool] = field(default_factory=list)
    sampling_params: list[SamplingParams] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int, samples: bool, params: SamplingParams) -> None:
        self.seqs.append(seq)
        self.num_scheduled_tokens.append(num_tokens)
        self.samples.append(samples)
        self.sampling_params.append(params)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Waiting and running requests; the running batch is fixed until all of it has finished."""

    def __init__(self, config: EngineConfig):
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_request(self, request_id: str) -> None:
        for queue in (self.waiting, self.running):
            for req in list(queue):
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish_request(req, SequenceStatus.FINISHED_ABORTED)

    def schedule(self) -> SchedulerOutput:
        if not self.running:
            self._admit_batch()
        out = SchedulerOutput()
        for req in self.running:
            for seq in req.get_seqs(SequenceStatus.RUNNING):
                out.add(seq, seq.get_len(), True, req.sampling_params)
        return out

    def _admit_batch(self) -> None:
        num_seqs = 0
        while self.waiting and num_seqs + self.waiting[0].num_seqs() <= self.max_num_seqs:
            req = self.waiting.popleft()
            for seq in req.seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(req)
            num_seqs += req.num_seqs()
        if not self.running and self.waiting:  # one request with best_of > max_num_seqs
            req = self.waiting.popleft()
            self._finish_request(req, SequenceStatus.FINISHED_IGNORED)

    def update_from_output(self, scheduler_output: SchedulerOutput) -> None:
        """After sampling: move finished requests out of the running batch."""
        for req in list(self.running):
            if req.is_finished():
                self.running.remove(req)
                self.finished.append(req)

    def _finish_request(self, req: Request, status: SequenceStatus) -> None:
        for seq in req.seqs:
            if not seq.is_finished():
                seq.status = status
        self.finished.append(req)

    def pop_finished_requests(self) -> list[Request]:
        done, self.finished = self.finished, []
        return done
