"""`SamplingMetadata`: every row's sampling parameters as batched tensors, built once per step.

The sampler never looks at a `SamplingParams` object: it reads one tensor per parameter, one entry
per row (sequence), so a batch mixing greedy, top-k, top-p and penalised requests is sampled with a
handful of vectorised ops instead of a Python loop over the rows.

Conventions (the sampler relies on them):

- greedy rows have temperature 0 (any temperature below `SAMPLING_EPS` counts as greedy, as in vLLM);
- a disabled top-k (0 or -1) is stored as `vocab_size`, a disabled top-p as 1.0, a disabled min-p as 0.0;
- token-id matrices are right-padded with `vocab_size`, an id no real token has: the penalty code
  scatters into a `vocab_size + 1` wide buffer and drops the last column, so padding counts nothing.
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


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one batch; row i is `seqs[i]` of `from_sequences`."""

    temperatures: torch.Tensor  # (num_seqs,) float32; 0 for greedy rows
    top_ps: torch.Tensor  # (num_seqs,) float32; 1.0 where disabled
    top_ks: torch.Tensor  # (num_seqs,) int64; vocab_size where disabled
    min_ps: torch.Tensor  # (num_seqs,) float32; 0.0 where disabled
    presence_penalties: torch.Tensor  # (num_seqs,) float32
    frequency_penalties: torch.Tensor  # (num_seqs,) float32
    repetition_penalties: torch.Tensor  # (num_seqs,) float32
    # (num_seqs, max_prompt_len) / (num_seqs, max_output_len) int64, padded with vocab_size.
    # Width 0 when no row has a penalty: the sampler does not read them then.
    prompt_token_ids: torch.Tensor
    output_token_ids: torch.Tensor
    min_tokens_stop_ids: list[tuple[int, list[int]]]  # (row, ids to mask) for rows under min_tokens
    generators: dict[int, torch.Generator]  # row -> the request's own generator (seeded rows)
    max_num_logprobs: int  # the largest `logprobs` asked for in the batch; 0 when none
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_p: bool
    no_top_k: bool
    no_min_p: bool

    @property
    def num_seqs(self) -> int:
        return self.temperatures.shape[0]

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
        greedy = [p.temperature < SAMPLING_EPS for p in params]
        temperatures = [0.0 if g else p.temperature for g, p in zip(greedy, params)]
        top_ks = [vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
        no_penalties = all(
            p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0
            for p in params
        )
        prompt_ids, output_ids = _token_id_matrices(seqs, vocab_size, device, no_penalties)

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            temperatures=f32(temperatures),
            top_ps=f32([p.top_p for p in params]),
            top_ks=torch.tensor(top_ks, dtype=torch.int64, device=device),
            min_ps=f32([p.min_p for p in params]),
            presence_penalties=f32([p.presence_penalty for p in params]),
            frequency_penalties=f32([p.frequency_penalty for p in params]),
            repetition_penalties=f32([p.repetition_penalty for p in params]),
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            min_tokens_stop_ids=_min_tokens_stop_ids(seqs, params, eos_token_ids, vocab_size),
            generators={i: g for i, g in enumerate(generators) if g is not None and not greedy[i]},
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_penalties=no_penalties,
            no_top_p=all(p.top_p >= 1.0 for p in params),
            no_top_k=all(k == vocab_size for k in top_ks),
            no_min_p=all(p.min_p <= 0.0 for p in params),
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


def _token_id_matrices(
    seqs: list[Sequence], vocab_size: int, device: torch.device, no_penalties: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and output ids as two right-padded matrices (padding = vocab_size)."""
    if no_penalties:
        # Penalties are the only reader; skip the O(total tokens) copy when no row has one.
        empty = torch.empty((len(seqs), 0), dtype=torch.int64, device=device)
        return empty, empty
    return (
        _pad([seq.data.prompt_token_ids for seq in seqs], vocab_size, device),
        _pad([seq.data.output_token_ids for seq in seqs], vocab_size, device),
    )


def _pad(rows: list, pad_id: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [[*r, *([pad_id] * (width - len(r)))] for r in rows]
    return torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(rows), width)
