"""m3's scheduler: a token budget per step, chunked prefill, and preemption by recompute.

Each step fills a budget of `max_num_batched_tokens` tokens and at most `max_num_seqs` sequences:

1. Running sequences first, oldest request first: a decoding sequence needs 1 token, a sequence
   still in (chunked) prefill gets as much of its remaining prompt as the budget allows. Before a
   sequence is scheduled its blocks must be ready (`can_append` / `may_append`, asked in one call
   as `allocate_slots`); when the pool is out of blocks, the newest running request is preempted:
   its blocks are freed and it goes back to the front of the waiting queue, to be recomputed later
   (its outputs are kept).
2. Then waiting requests, in order, while budget, sequence slots and blocks last (a new prompt may
   be cut into chunks; only the chunk's last step samples a token).

A request with best_of > 1 prefills its first sequence only; the others are forked from it once
the prompt is computed (sharing its blocks by reference count) and recompute just the last prompt
token into a private copy of the shared partial block (copy-on-write).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from m0_config.config import EngineConfig
from m0_config.logger import init_logger
from m0_config.sequence import Request, Sequence, SequenceStatus
from m1_sampling.scheduler import Scheduler as StaticScheduler
from m1_sampling.scheduler import SchedulerOutput as BaseSchedulerOutput
from m3_paged.block_manager import BlockManager

logger = init_logger(__name__)


@dataclass
class SchedulerOutput(BaseSchedulerOutput):
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    num_preempted: int = 0
    # Set by m4's async engine: the previous step's sampled ids, still on the GPU, from which this
    # step's placeholder tokens take their values (see SequenceData.append_placeholder). None when
    # no scheduled token is a placeholder.
    prev_sampled_token_ids: torch.Tensor | None = None


class Scheduler(StaticScheduler):
    def __init__(self, config: EngineConfig, num_blocks: int):
        super().__init__(config)
        sc, cc = config.scheduler_config, config.cache_config
        self.max_num_batched_tokens = sc.max_num_batched_tokens
        self.max_model_len = sc.max_model_len
        self.enable_chunked_prefill = sc.enable_chunked_prefill
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.pending_forks: dict[int, list[Sequence]] = {}  # parent seq_id -> children waiting for its prompt
        self.num_preemptions = 0

    # ---- the step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if out.num_preempted == 0:  # after a preemption the pool is full: admit nobody this step
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # By index, not over a copy: preemption removes only the newest requests (the tail), so the
        # walk simply ends early when it has preempted what it had not reached yet.
        running, i = SequenceStatus.RUNNING, 0  # a local: an enum member lookup costs more
        while i < len(self.running):
            req = self.running[i]
            for seq in req.seqs:
                if seq.status != running:  # finished, or a fork still waiting
                    continue
                if seq.data.num_placeholders and self._stops_by_length(seq, req):
                    continue  # its in-flight token is its last (m4's async scheduling)
                if budget == 0:
                    return budget
                num_new = min(seq.get_len() - seq.data.num_computed_tokens, budget)
                if not self._reserve_blocks(seq, req, out):
                    break  # `req` itself was preempted
                self._add(out, seq, num_new, req)
                budget -= num_new
            i += 1
        return budget

    def _stops_by_length(self, seq: Sequence, req: Request) -> bool:
        """Whether `seq` is certain to finish once its pending tokens arrive: it has reached
        max_tokens or max_model_len, which the stop checker ends whatever the token values."""
        return seq.get_output_len() >= req.sampling_params.max_tokens or seq.get_len() >= self.max_model_len

    def _reserve_blocks(self, seq: Sequence, req: Request, out: SchedulerOutput) -> bool:
        """Make `seq`'s blocks ready, preempting the newest running requests while the pool is
        short. False when `req` itself had to be preempted (it was the newest).
        (`allocate_slots` is `can_append` + `may_append` in one call: None when the pool is short.)"""
        while (copies := self.block_manager.allocate_slots(seq)) is None:
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        out.block_copies.extend(copies)
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if self._can_never_run(req):
                continue
            seqs, pending = self._seqs_to_allocate(req)
            if self._num_live_seqs() + len(seqs) + len(pending) > self.max_num_seqs:
                break
            if (
                not self.enable_chunked_prefill
                and sum(s.get_len() for s in seqs) > budget
                and not out.is_empty
            ):
                break
            if not self._allocate_all(seqs):
                if not self.running:  # alone with an empty pool and still too big: never fits
                    self._finish_unfittable(req)
                    continue
                break
            self.waiting.popleft()
            self.running.append(req)
            if pending:
                self.pending_forks[seqs[-1].seq_id] = pending
            for seq in seqs:
                seq.status, seq.is_prefill = SequenceStatus.RUNNING, True
                num_new = min(seq.get_len() - seq.data.num_computed_tokens, budget)
                if num_new > 0:
                    self._add(out, seq, num_new, req)
                    budget -= num_new
            if budget == 0:
                break

    def _allocate_all(self, seqs: list[Sequence]) -> bool:
        """Allocate every sequence or none: one by one (a later one may hit blocks an earlier one
        revived), rolling back when the pool runs out."""
        done = []
        for seq in seqs:
            if not self.block_manager.try_allocate(seq):  # can_allocate + allocate, one lookup
                for s in reversed(done):
                    self.block_manager.deallocate(s)
                return False
            done.append(seq)
        return True

    def _seqs_to_allocate(self, req: Request) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences that get blocks now, sequences that will fork from the last of them).
        Unstarted candidates (no output yet) are identical: the first is prefilled, the rest wait
        to be forked from it once its prompt is computed."""
        live = [s for s in req.get_seqs() if not s.is_finished()]
        fresh = [s for s in live if s.get_output_len() == 0]
        started = [s for s in live if s.get_output_len() > 0]
        return started + fresh[:1], fresh[1:]

    def _finish_unfittable(self, req: Request) -> None:
        logger.warning(
            "request %s: its %d sequences need more KV blocks than the whole cache (%d) holds; "
            "finished as 'length' with the tokens it has",
            req.request_id, req.num_seqs(), self.block_manager.num_blocks,
        )  # fmt: skip
        self.waiting.popleft()
        self._finish_request(req, SequenceStatus.FINISHED_LENGTH_CAPPED)

    def _can_never_run(self, req: Request) -> bool:
        """A request that could not run even alone in an empty cache is finished, not looped on.
        Only its unfinished sequences count: a candidate that already finished (one token ahead of
        its forks, say) may be longer than the pool without the others being so."""
        bm = self.block_manager
        live = [s for s in req.get_seqs() if not s.is_finished()]
        longest = max(s.get_len() for s in live)
        if bm.num_required_blocks(longest) <= bm.num_blocks and len(live) <= self.max_num_seqs:
            return False
        logger.warning(
            "request %s needs %d tokens (%d blocks of %d) and %d sequences; the cache has %d blocks and "
            "max_num_seqs=%d, so it can never run: finished as 'length'",
            req.request_id, longest, bm.num_required_blocks(longest), bm.block_size, len(live),
            bm.num_blocks, self.max_num_seqs,
        )  # fmt: skip
        self.waiting.popleft()
        self._finish_request(req, SequenceStatus.FINISHED_IGNORED)
        return True

    def _num_live_seqs(self) -> int:
        return sum(1 for r in self.running for s in r.seqs if not s.is_finished())

    def _add(self, out: SchedulerOutput, seq: Sequence, num_new: int, req: Request) -> None:
        # Only the step that computes the last uncomputed token samples; earlier chunks do not.
        samples = seq.data.num_computed_tokens + num_new == seq.get_len()
        out.add(seq, num_new, samples, req.sampling_params)

    # ---- preemption --------------------------------------------------------------------------------
    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Recompute preemption: free every block of `req`, keep its tokens, requeue it first.
        When it returns, `allocate` looks its prefix up in the cache again."""
        self.running.remove(req)
        freed = {b for s in req.seqs for b in s.block_table}
        out.block_copies = [(src, dst) for src, dst in out.block_copies if dst not in freed]
        for seq in req.get_seqs():
            if not seq.is_finished():
                self.block_manager.deallocate(seq)
                seq.status, seq.is_prefill = SequenceStatus.WAITING, True
        for seq in req.get_seqs():
            self.pending_forks.pop(seq.seq_id, None)
        # Drop rows already scheduled for this request in the current step.
        keep = [i for i, s in enumerate(out.seqs) if s not in req.seqs]
        for name in ("seqs", "num_scheduled_tokens", "samples", "sampling_params"):
            setattr(out, name, [getattr(out, name)[i] for i in keep])
        self.waiting.appendleft(req)
        out.num_preempted += 1
        self.num_preemptions += 1

    # ---- after the step ------------------------------------------------------------------------
    def update_from_output(self, so: SchedulerOutput) -> None:
        bm = self.block_manager
        any_finished = False
        for seq, n in zip(so.seqs, so.num_scheduled_tokens):
            seq.data.num_computed_tokens += n
            computed, seq_len = seq.data.num_computed_tokens, seq.get_len()
            if seq.is_prefill and computed >= seq_len - (1 if seq.get_output_len() else 0):
                seq.is_prefill = False
            # A block is hashed from its token ids: a placeholder's id is not known yet.
            bm.cache_full_blocks(seq, min(computed, seq.data.get_num_known_tokens()))
            any_finished = any_finished or seq.is_finished()
        self._start_pending_forks()
        # Only a sequence that got a token this step can have finished in it: most steps skip the
        # walk over every running request.
        if any_finished:
            self._free_finished()

    def on_tokens_resolved(self, seqs: list[Sequence]) -> None:
        """m4's async scheduling: the real ids of `seqs`' oldest placeholders have just been
        appended (after `update_from_output` of their step ran). Hash the blocks those ids complete
        and free what finished, as `update_from_output` does for a synchronous step."""
        bm, any_finished = self.block_manager, False
        for seq in seqs:
            if seq.block_table:  # (a sequence preempted meanwhile holds no blocks)
                bm.cache_full_blocks(seq, min(seq.data.num_computed_tokens, seq.data.get_num_known_tokens()))
            any_finished = any_finished or seq.is_finished()
        if any_finished:
            self._free_finished()
            # A sequence preempted while its last token was in flight finishes in the waiting queue.
            for req in [r for r in self.waiting if r.is_finished()]:
                self.waiting.remove(req)
                self.finished.append(req)

    def _free_finished(self) -> None:
        """Free the blocks of finished sequences and move finished requests out of `running`, in
        running order (the order blocks join the free queue decides what is evicted first)."""
        for req in list(self.running):
            for seq in req.seqs:
                if seq.is_finished() and seq.block_table:
                    self.block_manager.deallocate(seq)
            if req.is_finished():
                self.running.remove(req)
                self.finished.append(req)

    def _start_pending_forks(self) -> None:
        """Children whose parent has computed its prompt share its blocks and recompute only the
        last prompt token (so each samples its own first token from the same logits)."""
        for parent_id in list(self.pending_forks):
            req = next((r for r in self.running if any(s.seq_id == parent_id for s in r.seqs)), None)
            if req is None:  # preempted or finished meanwhile: its forks are re-planned on admission
                continue
            parent = next(s for s in req.seqs if s.seq_id == parent_id)
            if parent.data.num_computed_tokens < parent.get_prompt_len():
                continue
            for child in self.pending_forks.pop(parent_id):
                self.block_manager.fork(parent, child)  # the parent's table holds just the prompt
                child.data.num_computed_tokens = child.get_len() - 1
                child.status, child.is_prefill = SequenceStatus.RUNNING, True

    def _finish_request(self, req: Request, status: SequenceStatus) -> None:
        for seq in req.seqs:
            if seq.block_table:
                self.block_manager.deallocate(seq)
            self.pending_forks.pop(seq.seq_id, None)
        super()._finish_request(req, status)
