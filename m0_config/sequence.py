"""The three-level data model: `Request` -> `Sequence` -> `SequenceData`.

- `SequenceData` holds token ids and the cumulative logprob: plain data, cheap to copy and send.
- `Sequence` is one generation stream: its status, its data, its decoded text and (from m3 on)
  its KV-cache block table. `fork()` makes an independent copy for n / best_of / beam search.
- `Request` (vLLM's SequenceGroup) is what the user asked for: one prompt, one `SamplingParams`,
  and the one or more sequences generated for it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence as Seq

from m0_config.sampling_params import SamplingParams


class SequenceStatus(enum.IntEnum):
    """WAITING -> RUNNING -> FINISHED_*; RUNNING -> WAITING on preemption (m3), -> SWAPPED if swapped."""

    WAITING = 0
    RUNNING = 1
    SWAPPED = 2
    # Everything above SWAPPED is finished; keep the finished states last.
    FINISHED_STOPPED = 3  # EOS, a stop token id or a stop string
    FINISHED_LENGTH_CAPPED = 4  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 5  # the user cancelled it
    FINISHED_IGNORED = 6  # could never be scheduled (e.g. prompt longer than the cache)

    @staticmethod
    def is_finished(status: SequenceStatus) -> bool:
        return status > _LAST_UNFINISHED

    @staticmethod
    def get_finished_reason(status: SequenceStatus) -> str | None:
        """The `finish_reason` vLLM reports for a finished status ("stop", "length", "abort")."""
        return _FINISH_REASON.get(status)


# A module constant, read in the engine's per-sequence loops: looking a member up on the enum class
# (`SequenceStatus.SWAPPED`) costs several times more than comparing two ints.
_LAST_UNFINISHED = SequenceStatus.SWAPPED

_FINISH_REASON = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_IGNORED: "length",
}


class SequenceData:
    """Token ids of one sequence. Appending is O(1); `get_token_ids()` returns a list kept up to
    date on every append, so reading it never rebuilds prompt + output."""

    __slots__ = (
        "_prompt_token_ids",
        "_output_token_ids",
        "_token_ids",
        "cumulative_logprob",
        "num_computed_tokens",
        "num_placeholders",
    )

    def __init__(
        self, prompt_token_ids: Seq[int], output_token_ids: Seq[int] = (), cumulative_logprob: float = 0.0
    ):
        self._prompt_token_ids: tuple[int, ...] = tuple(prompt_token_ids)
        self._output_token_ids: list[int] = list(output_token_ids)
        self._token_ids: list[int] = [*self._prompt_token_ids, *self._output_token_ids]
        self.cumulative_logprob = cumulative_logprob
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (used from m2 on)
        self.num_placeholders = 0  # trailing output tokens sampled on the GPU, value not known yet (m4)

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self._prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self._output_token_ids

    def append_token_id(self, token_id: int, logprob: float = 0.0) -> None:
        self._output_token_ids.append(token_id)
        self._token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def append_placeholder(self, placeholder_id: int) -> None:
        """A token the GPU has sampled but the host has not read yet (m4's async scheduling). It
        counts in every length, so the scheduler can plan the next step around it; its id is a
        negative stand-in (`placeholder_id < 0`) that the model runner swaps for the real value on the
        GPU. Placeholders are always the newest tokens."""
        if placeholder_id >= 0:
            raise ValueError(f"a placeholder id must be negative, got {placeholder_id}")
        self._output_token_ids.append(placeholder_id)
        self._token_ids.append(placeholder_id)
        self.num_placeholders += 1

    def pop_placeholder(self) -> int:
        """Remove the newest placeholder and return its stand-in id."""
        if self.num_placeholders == 0:
            raise ValueError("the sequence has no placeholder token")
        self.num_placeholders -= 1
        self._token_ids.pop()
        return self._output_token_ids.pop()

    def get_num_known_tokens(self) -> int:
        """Tokens whose ids the host knows: every token but the placeholders."""
        return len(self._token_ids) - self.num_placeholders

    def get_token_ids(self) -> list[int]:
        """Prompt + output. The list is shared with this object: read it, do not mutate it."""
        return self._token_ids

    def get_len(self) -> int:
        return len(self._token_ids)

    def get_prompt_len(self) -> int:
        return len(self._prompt_token_ids)

    def get_output_len(self) -> int:
        return len(self._output_token_ids)

    def get_last_token_id(self) -> int:
        return self._token_ids[-1]

    def copy(self) -> SequenceData:
        """A deep copy: the new object shares no mutable list with this one."""
        new = SequenceData(self._prompt_token_ids, self._output_token_ids, self.cumulative_logprob)
        new.num_computed_tokens = self.num_computed_tokens
        new.num_placeholders = self.num_placeholders
        return new

    def __repr__(self) -> str:
        return (
            f"SequenceData(prompt_len={self.get_prompt_len()}, output={self._output_token_ids}, "
            f"cumulative_logprob={self.cumulative_logprob:.4f})"
        )


class Sequence:
    """One generation stream of a request."""

    def __init__(
        self, seq_id: int, prompt: str | None, prompt_token_ids: Seq[int], *, data: SequenceData | None = None
    ):
        self.seq_id = seq_id
        self.prompt = prompt
        self.data = data if data is not None else SequenceData(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []  # physical KV-cache block ids, one per block_size tokens (m3)
        self.num_cached_tokens = 0  # leading tokens found in the prefix cache at allocation (m3)
        # Prefix-cache hashes of the leading full blocks of known tokens, computed once and kept by
        # the block manager that allocates this sequence (m3). Tokens are only appended, so a full
        # block's hash never changes: preemption keeps them, only the lookup is redone.
        self.block_hashes: list[int] = []
        # Explicit, never inferred from lengths: True until every current token's K/V is computed
        # (a prompt spread over chunks stays in prefill; a preempted sequence re-enters it).
        self.is_prefill = True
        # Decoded output and its incremental-detokenization state (m1).
        self.output_text = ""
        self.tokens: list[str] | None = None
        self.prefix_offset = 0
        self.read_offset = 0
        self.output_logprobs: list[dict] = []  # one {token_id: Logprob} per output token
        self.stop_reason: int | str | None = None

    # Token-id access, forwarded to the data. The hot ones read its lists directly (one call, not
    # two): the scheduler, the input preparation and the stop checker call them for every sequence
    # in every step.
    def get_token_ids(self) -> list[int]:
        return self.data.get_token_ids()

    def get_len(self) -> int:
        return len(self.data._token_ids)

    def get_prompt_len(self) -> int:
        return self.data.get_prompt_len()

    def get_output_len(self) -> int:
        return len(self.data._output_token_ids)

    def get_last_token_id(self) -> int:
        return self.data._token_ids[-1]

    def append_token_id(self, token_id: int, logprob: float = 0.0, logprobs: dict | None = None) -> None:
        self.data.append_token_id(token_id, logprob)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    @property
    def cumulative_logprob(self) -> float:
        return self.data.cumulative_logprob

    def is_finished(self) -> bool:
        return self.status > _LAST_UNFINISHED  # SequenceStatus.is_finished, without the extra call

    def fork(self, new_seq_id: int) -> Sequence:
        """An independent copy: data, text, logprobs and block table are copied, never shared, so
        appending to the fork leaves this sequence untouched. (m3 makes the *KV blocks* shared by
        reference count; the block-id list itself is still each sequence's own.)"""
        child = Sequence(new_seq_id, self.prompt, (), data=self.data.copy())
        child.status = self.status
        child.block_table = list(self.block_table)
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = list(self.block_hashes)
        child.is_prefill = self.is_prefill
        child.output_text = self.output_text
        child.tokens = None if self.tokens is None else list(self.tokens)
        child.prefix_offset, child.read_offset = self.prefix_offset, self.read_offset
        child.output_logprobs = [dict(d) for d in self.output_logprobs]
        child.stop_reason = self.stop_reason
        return child

    def __repr__(self) -> str:
        return f"Sequence(seq_id={self.seq_id}, status={self.status.name}, num_tokens={self.get_len()})"


class Request:
    """One user request (vLLM's SequenceGroup): a prompt, its SamplingParams, and its sequences."""

    def __init__(
        self,
        request_id: str,
        seqs: list[Sequence],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
    ):
        if not seqs:
            raise ValueError("a Request needs at least one Sequence")
        self.request_id = request_id
        self.seqs = seqs
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time

    @property
    def prompt(self) -> str | None:
        return self.seqs[0].prompt

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self.seqs[0].data.prompt_token_ids

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        if status is None:
            return list(self.seqs)
        return [s for s in self.seqs if s.status == status]

    def num_seqs(self, status: SequenceStatus | None = None) -> int:
        return len(self.get_seqs(status))

    def add(self, seq: Sequence) -> None:
        self.seqs.append(seq)

    def remove(self, seq_id: int) -> None:
        self.seqs = [s for s in self.seqs if s.seq_id != seq_id]

    def is_finished(self) -> bool:
        return all(s.is_finished() for s in self.seqs)

    def __repr__(self) -> str:
        return f"Request(request_id={self.request_id!r}, num_seqs={len(self.seqs)})"
