"""`SamplingMetadata`: every row's sampling parameters as batched tensors, built once per step.

The sampler never looks at a `SamplingParams` object: it reads one tensor per parameter, one entry
per row (sequence), so a batch mixing greedy, top-k, top-p and penalised requests is sampled with a
handful of vectorised ops instead of a Python loop over the rows.

Conventions (the sampler relies on them):

- greedy rows have temperature 0 (any temperature below `SAMPLING_EPS` counts as greedy, as in vLLM);
- a disabled top-k (0 or -1) is stored as `vocab_size`, a disabled top-p as 1.0, a disabled min-p as 0.0;
- a parameter tensor is None when no row of the batch uses that parameter (the sampler skips the
  filter then); so is every penalty tensor when no row has any penalty;
- token-id matrices are right-padded with `vocab_size`, an id no real token has: the penalty code
  scatters into a `vocab_size + 1` wide buffer and drops the last column, so padding counts nothing.

Building it is per-step host work, so the common batch takes a fast path: when every row only sets
a temperature (no top-k/top-p/min-p, penalties, seed, logprobs or min_tokens), the metadata is one
tensor of temperatures (`_from_temperatures`); the general path gives the same sampler result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# vLLM's threshold: a temperature this small is treated as greedy (dividing by it would overflow).
from m0_config.sampling_params import (
    SAMPLING_EPS,  # noqa: E402  (one threshold for m0 and the sampler)
    SamplingParams,
)
from m0_config.sequence import Sequence


def to_device(cpu: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """A host tensor on `device` without making the host wait for the GPU. PyTorch's blocking copy
    synchronises the stream, and even a non-blocking copy from ordinary (pageable) memory waits in
    practice while the driver stages it; so on CUDA the tensor first goes to pinned memory (PyTorch's
    caching host allocator, which keeps that block until the copy has run) and is then copied
    asynchronously. m4 relies on this to prepare step n+1 while the GPU runs step n."""
    if device is None or torch.device(device).type != "cuda":
        return cpu.to(device) if device is not None else cpu
    return cpu.pin_memory().to(device, non_blocking=True)


def host_to_device(values: list, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` without waiting for the GPU (`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one batch; row i is `seqs[i]` of `from_sequences`."""

    temperatures: torch.Tensor  # (num_seqs,) float32; 0 for greedy rows
    top_ps: torch.Tensor | None  # (num_seqs,) float32; 1.0 where disabled; None: no row uses top-p
    top_ks: torch.Tensor | None  # (num_seqs,) int64; vocab_size where disabled; None: no row uses top-k
    min_ps: torch.Tensor | None  # (num_seqs,) float32; 0.0 where disabled; None: no row uses min-p
    # (num_seqs,) float32 each; None when no row has a penalty.
    presence_penalties: torch.Tensor | None
    frequency_penalties: torch.Tensor | None
    repetition_penalties: torch.Tensor | None
    # (num_seqs, max_prompt_len) / (num_seqs, max_output_len) int64, padded with vocab_size; None
    # when no row has a penalty (they are the only reader).
    prompt_token_ids: torch.Tensor | None
    output_token_ids: torch.Tensor | None
    min_tokens_stop_ids: list[tuple[int, list[int]]]  # (row, ids to mask) for rows under min_tokens
    generators: dict[int, torch.Generator]  # row -> the request's own generator (seeded rows)
    # vLLM's convention: the largest `logprobs` asked for in the batch; None when no row asked
    # (then neither ranks nor top-k logprobs are computed). 0 asks for the chosen token's only.
    max_num_logprobs: int | None
    all_greedy: bool
    all_random: bool

    @property
    def num_seqs(self) -> int:
        return self.temperatures.shape[0]

    @property
    def no_penalties(self) -> bool:
        return self.repetition_penalties is None

    @property
    def no_top_p(self) -> bool:
        return self.top_ps is None

    @property
    def no_top_k(self) -> bool:
        return self.top_ks is None

    @property
    def no_min_p(self) -> bool:
        return self.min_ps is None

    @classmethod
    def from_sequences(
        cls,
        seqs: list[Sequence],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        eos_token_ids: list[int],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingMetadata:
        """Row i samples the next token of `seqs[i]` under `params[i]`, drawing its randomness from
        `generators[i]` when that is not None (a seeded request), else from the global torch RNG."""
        if not (len(seqs) == len(params) == len(generators)):
            raise ValueError(
                f"seqs, params and generators must have one entry per row, got "
                f"{len(seqs)}, {len(params)}, {len(generators)}"
            )
        if generators.count(None) == len(generators) and all(map(_only_temperature, params)):
            return cls._from_temperatures([p.temperature for p in params], device)
        greedy = [p.temperature < SAMPLING_EPS for p in params]
        temperatures = [0.0 if g else p.temperature for g, p in zip(greedy, params)]
        top_ks = [vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
        has_penalty = [uses_penalties(p) for p in params]
        penalised = any(has_penalty)
        prompt_ids, output_ids = _token_id_matrices(seqs, has_penalty, vocab_size, device)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]

        def tensor(values: list, used: bool, dtype=torch.float32) -> torch.Tensor | None:
            return host_to_device(values, dtype, device) if used else None

        return cls(
            temperatures=tensor(temperatures, True),
            top_ps=tensor([p.top_p for p in params], any(p.top_p < 1.0 for p in params)),
            top_ks=tensor(top_ks, any(k != vocab_size for k in top_ks), torch.int64),
            min_ps=tensor([p.min_p for p in params], any(p.min_p > 0.0 for p in params)),
            presence_penalties=tensor([p.presence_penalty for p in params], penalised),
            frequency_penalties=tensor([p.frequency_penalty for p in params], penalised),
            repetition_penalties=tensor([p.repetition_penalty for p in params], penalised),
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            min_tokens_stop_ids=_min_tokens_stop_ids(seqs, params, eos_token_ids, vocab_size),
            generators={i: g for i, g in enumerate(generators) if g is not None and not greedy[i]},
            max_num_logprobs=max(logprobs) if logprobs else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
        )

    @classmethod
    def _from_temperatures(cls, temperatures: list[float], device: torch.device) -> SamplingMetadata:
        """The metadata of rows that set nothing but a temperature: every filter, penalty,
        generator and logprob field is empty, as `from_sequences` would leave it."""
        temperatures = [0.0 if t < SAMPLING_EPS else t for t in temperatures]
        num_greedy = temperatures.count(0.0)
        return cls(
            temperatures=host_to_device(temperatures, torch.float32, device),
            top_ps=None,
            top_ks=None,
            min_ps=None,
            presence_penalties=None,
            frequency_penalties=None,
            repetition_penalties=None,
            prompt_token_ids=None,
            output_token_ids=None,
            min_tokens_stop_ids=[],
            generators={},
            max_num_logprobs=None,
            all_greedy=num_greedy == len(temperatures),
            all_random=num_greedy == 0,
        )


def _only_temperature(p: SamplingParams) -> bool:
    """Whether the row's distribution depends on its temperature alone (every other sampling
    field at its neutral value; `min_tokens == 0` never masks anything)."""
    return (
        p.top_p >= 1.0
        and p.top_k <= 0
        and p.min_p <= 0.0
        and not uses_penalties(p)
        and p.logprobs is None
        and p.min_tokens == 0
    )


def _min_tokens_stop_ids(
    seqs: list[Sequence], params: list[SamplingParams], eos_token_ids: list[int], vocab_size: int
) -> list[tuple[int, list[int]]]:
    """Rows that have produced fewer than `min_tokens` tokens may not stop yet: their stop token ids
    and (unless `ignore_eos`, which makes EOS an ordinary token anyway) every EOS id get masked."""
    result = []
    for row, (seq, p) in enumerate(zip(seqs, params)):
        if seq.get_output_len() >= p.min_tokens:
            continue
        ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            ids.update(eos_token_ids)
        # An id outside the vocabulary can never be sampled, so there is nothing to mask.
        ids = sorted(i for i in ids if 0 <= i < vocab_size)
        if ids:
            result.append((row, ids))
    return result


def uses_penalties(p: SamplingParams) -> bool:
    """Whether the row's logits depend on the token ids seen so far (a non-neutral penalty)."""
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _token_id_matrices(
    seqs: list[Sequence], has_penalty: list[bool], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Prompt and output ids as two right-padded matrices (padding = vocab_size). Only rows with a
    penalty read them, so the other rows are left empty: no O(tokens) copy for them, and no read of
    ids the host may not know yet (m4's async scheduling keeps placeholders in unpenalised rows)."""
    if not any(has_penalty):
        return None, None  # penalties are the only reader: skip the copy entirely
    return (
        _pad([s.data.prompt_token_ids if h else () for s, h in zip(seqs, has_penalty)], vocab_size, device),
        _pad([s.data.output_token_ids if h else () for s, h in zip(seqs, has_penalty)], vocab_size, device),
    )


def _pad(rows: list, pad_id: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [[*r, *([pad_id] * (width - len(r)))] for r in rows]
    return host_to_device(padded, torch.int64, device).reshape(len(rows), width)
