"""What the driver sends the workers each step: the model-facing part of a SchedulerOutput.

The scheduler, the block manager and the sequences' full history live on the driver only. A
worker needs, per scheduled sequence, just the tokens it computes this step, how many tokens are
cached before them, and its block table; plus the step's copy-on-write block copies. These go as
plain lists (cheap to pickle: one token per sequence in a decode step), and the worker rebuilds a
SchedulerOutput from them, so that every rank runs the very same `ModelRunner.execute_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

from m0_config.sequence import Sequence, SequenceStatus
from m3_paged.scheduler import SchedulerOutput


@dataclass
class StepInput:
    seq_ids: list[int]
    num_computed_tokens: list[int]  # tokens of each sequence whose K/V are cached before this step
    token_ids: list[list[int]]  # the tokens each sequence computes this step
    block_tables: list[list[int]]
    is_prefill: list[bool]
    samples: list[bool]
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst): every rank copies its own cache

    @classmethod
    def from_scheduler_output(cls, so: SchedulerOutput) -> StepInput:
        starts = [seq.data.num_computed_tokens for seq in so.seqs]
        return cls(
            seq_ids=[seq.seq_id for seq in so.seqs],
            num_computed_tokens=starts,
            token_ids=[
                seq.get_token_ids()[s : s + n] for seq, s, n in zip(so.seqs, starts, so.num_scheduled_tokens)
            ],
            block_tables=[list(seq.block_table) for seq in so.seqs],
            is_prefill=[seq.is_prefill for seq in so.seqs],
            samples=list(so.samples),
            block_copies=list(so.block_copies),
        )

    def to_scheduler_output(self, known: dict[int, Sequence] | None = None) -> SchedulerOutput:
        """A SchedulerOutput whose sequences have the right lengths, block tables and new tokens.
        The cached tokens before the new ones are placeholders (0): the model never reads them,
        their K/V are in the cache already.

        `known` (the worker's sequences of the previous step, updated in place to this step's) saves
        rebuilding a sequence that only grew: a decode step appends one token per sequence instead
        of copying every sequence's whole length."""
        known = {} if known is None else known
        so = SchedulerOutput(block_copies=list(self.block_copies))
        rows = zip(
            self.seq_ids,
            self.num_computed_tokens,
            self.token_ids,
            self.block_tables,
            self.is_prefill,
            self.samples,
        )
        seqs = {}
        for seq_id, start, tokens, table, is_prefill, samples in rows:
            seq = known.get(seq_id)
            if seq is not None and seq.get_len() == start:  # it grew by what it computes now
                for token in tokens:
                    seq.data.append_token_id(token)
            else:  # new, preempted, or skipped a step: rebuild
                seq = Sequence(seq_id, None, [0] * start + tokens)
            seq.data.num_computed_tokens = start
            seq.block_table, seq.is_prefill, seq.status = table, is_prefill, SequenceStatus.RUNNING
            so.add(seq, len(tokens), samples, None)
            seqs[seq_id] = seq
        known.clear()
        known.update(seqs)
        return so
