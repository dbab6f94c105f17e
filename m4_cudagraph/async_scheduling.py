"""Async scheduling: the host schedules and prepares step n+1 while the GPU still runs step n.

A synchronous step is: schedule -> launch model + sampler -> wait for the sampled ids -> append
them, detokenize, check stops -> next step. While the host does its part the GPU has nothing to do;
with CUDA graphs the GPU part is short enough that this idle time is a large share of each step.

Async scheduling breaks the wait. After launching step n the host does not read its tokens;
every sampling row gets a *placeholder* token instead (`SequenceData.append_placeholder`): it counts
in every length, so the scheduler plans step n+1 as if the token were there (one more token to
decode, its KV slot allocated). Its id is a negative stand-in, `placeholder_id(row)`, naming the
sampler row the real id will come from; `fill_placeholders` swaps it for the real value on the GPU,
from step n's sampled ids that never left the device. Only after step n+1 is launched does the host
wait for step n's ids (copied to host memory while the GPU worked) and append them exactly as a
synchronous step would (`LLMEngine._resolve`): detokenize, check stops, hash full blocks, free
what finished.

The price is one wasted row: a sequence that stops at step n (an EOS id, a stop string) has already
been scheduled in step n+1; that row's result is dropped. A sequence that reaches max_tokens or
max_model_len is known to stop whatever its token, so the scheduler does not schedule it again
(`Scheduler._stops_by_length`). A batch whose sampling needs the previous token's *value*
(repetition, frequency or presence penalties count the output ids) waits for it first.

At most one step is in flight: step n's ids are read before step n+2 is scheduled, so a sequence
has at most one placeholder when it is scheduled, and it is its last token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence
from m1_sampling.sampler import SamplerOutput
from m1_sampling.sampling_metadata import uses_penalties


def placeholder_id(row: int) -> int:
    """The stand-in id of the token that sampler row `row` produces: -1, -2, ... (real ids are >= 0)."""
    return -1 - row


def fill_placeholders(input_ids: torch.Tensor, prev_sampled: torch.Tensor | None) -> torch.Tensor:
    """input_ids with every placeholder -1 - r replaced by prev_sampled[r], on the input's device
    (no host sync). (num_tokens,) int64 -> (num_tokens,) int64."""
    if prev_sampled is None:
        return input_ids
    rows = (-1 - input_ids).clamp_(min=0, max=prev_sampled.shape[0] - 1)  # (num_tokens,)
    return torch.where(input_ids < 0, prev_sampled[rows], input_ids)


def fill_placeholders_ref(input_ids: list[int], prev_sampled: list[int]) -> list[int]:
    """`fill_placeholders` one token at a time (the test reference)."""
    return [prev_sampled[-1 - t] if t < 0 else t for t in input_ids]


def needs_token_values(sp: SamplingParams) -> bool:
    """Whether sampling this request's next token reads its previous output ids (the penalties do:
    they count them), so the previous step's ids must be on the host first. (A request without
    penalties never reads them: its rows of the token-id matrices are left empty.)"""
    return uses_penalties(sp)


def copy_to_host(out: SamplerOutput) -> SamplerOutput:
    """Start copying every tensor of `out` to (pinned) host memory without waiting: the copies run
    on the stream after the sampler. Read the result only after `StepInFlight.wait`."""
    values = {f.name: getattr(out, f.name) for f in fields(out)}
    return SamplerOutput(
        **{k: None if v is None else v.to("cpu", non_blocking=True) for k, v in values.items()}
    )


def take_rows(out: SamplerOutput, rows: list[int]) -> SamplerOutput:
    """The rows `rows` of a host-side sampler output."""
    values = {f.name: getattr(out, f.name) for f in fields(out)}
    return SamplerOutput(**{k: None if v is None else v[rows] for k, v in values.items()})


@dataclass
class StepInFlight:
    """A launched step whose sampled ids the host has not read yet. Row i belongs to seqs[i], whose
    oldest placeholder is `placeholder_id(i)`."""

    seqs: list[Sequence]
    params: list[SamplingParams]
    sampled_token_ids: torch.Tensor  # (num_rows,) int64 on the device: the next step's inputs read it
    host_output: SamplerOutput  # the same output, being copied to host memory
    copied: torch.cuda.Event | None  # recorded after the copies; None on a CPU (copies are done)

    @classmethod
    def launch(cls, seqs: list[Sequence], params: list[SamplingParams], out: SamplerOutput) -> StepInFlight:
        """Queue the copies of `out` to the host and give every row its placeholder."""
        host = copy_to_host(out)
        copied = None
        if out.sampled_token_ids.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        for row, seq in enumerate(seqs):
            seq.data.append_placeholder(placeholder_id(row))
        return cls(seqs, params, out.sampled_token_ids, host, copied)

    def wait(self) -> SamplerOutput:
        """Block until the copies have landed; then the host output is safe to read."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_output
