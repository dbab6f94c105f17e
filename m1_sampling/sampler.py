"""The batched `Sampler`: logits -> one next token per row, each row under its own parameters.

Order of operations (vLLM V1's `Sampler.forward`):

1. raw logprobs = log_softmax(logits), before anything below touches the logits (what `logprobs=k`
   and the cumulative logprob report: vLLM's default "raw_logprobs" mode);
2. min_tokens: EOS and stop ids -> -inf for rows that may not stop yet;
3. penalties: repetition (prompt + output tokens), frequency and presence (output tokens only);
4. greedy rows: argmax now. Everything after this point changes the *distribution*, not its argmax
   (temperature, min-p, top-k and top-p all keep the most likely token), so greedy is unaffected;
5. temperature: logits / T (greedy rows divide by 1.0, never by 0);
6. min-p: drop tokens with p < min_p * max(p);
7. top-k, then top-p (one descending sort serves both);
8. sample: argmax(p / q) with q ~ Exp(1), one q per row from that row's generator if it has one.

Step 8 is the exponential race (equivalently the Gumbel-max trick): token i wins with probability
p_i / sum(p), exactly the categorical distribution, without a multinomial call and with the
randomness of each row drawn from a known source, so a seeded row is independent of its batch.

On a GPU every op below is a kernel launch over the (num_seqs, vocab_size) logits, so a step skips
what its batch does not use (the metadata's flags and None tensors). A batch that only sets
temperatures runs eight: log_softmax and a gather (the chosen token's logprob, for the cumulative
logprob), logits / T, softmax, the exponential draw and its clamp, p / q and argmax. Ranks and
top-k logprobs are computed only when a row asks for logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from m1_sampling.sampling_metadata import SamplingMetadata, host_to_device


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # (num_seqs,) int64
    logprobs: torch.Tensor  # (num_seqs,) float32: log p(chosen token) under log_softmax(raw logits)
    # (num_seqs,) int64: tokens with raw logprob >= the chosen one's (1 = the top); None when no row
    # asked for logprobs (max_num_logprobs is None): only logprob entries report a rank.
    ranks: torch.Tensor | None
    topk_token_ids: torch.Tensor | None  # (num_seqs, max_num_logprobs); None unless max_num_logprobs > 0
    topk_logprobs: torch.Tensor | None  # (num_seqs, max_num_logprobs), sorted descending


class Sampler(nn.Module):
    """Stateless: everything a step needs is in the `SamplingMetadata` passed to `forward`."""

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        # min_tokens masks in place; every other step makes a new tensor. So the caller's logits are
        # copied only when that masking happens (or to convert them to float32).
        logits = logits.to(torch.float32, copy=bool(metadata.min_tokens_stop_ids))  # (num_seqs, vocab_size)
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # (num_seqs, vocab_size)
        logits = apply_min_tokens(logits, metadata.min_tokens_stop_ids)
        if not metadata.no_penalties:
            logits = apply_penalties(logits, metadata)
        sampled = self.sample(logits, metadata)
        return make_output(raw_logprobs, sampled, metadata.max_num_logprobs)

    @staticmethod
    def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """(num_seqs, vocab_size) processed logits -> (num_seqs,) int64 token ids."""
        greedy = None if metadata.all_random else logits.argmax(dim=-1)
        if metadata.all_greedy:
            return greedy
        logits = apply_temperature(logits, metadata.temperatures, has_greedy_rows=greedy is not None)
        if not metadata.no_min_p:
            logits = apply_min_p(logits, metadata.min_ps)
        logits = apply_top_k_top_p(logits, metadata.top_ks, metadata.top_ps)  # None: that filter is off
        random = random_sample(logits.softmax(dim=-1), metadata.generators)
        if greedy is None:
            return random
        return torch.where(metadata.temperatures == 0.0, greedy, random)


def apply_min_tokens(logits: torch.Tensor, stop_ids: list[tuple[int, list[int]]]) -> torch.Tensor:
    """In place: logits[row, id] = -inf for every (row, ids) pair, one indexed write for the batch."""
    if not stop_ids:
        return logits
    rows = [row for row, ids in stop_ids for _ in ids]
    cols = [i for _, ids in stop_ids for i in ids]
    device = logits.device
    logits[host_to_device(rows, torch.int64, device), host_to_device(cols, torch.int64, device)] = -float(
        "inf"
    )
    return logits


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(num_seqs, L) ids padded with vocab_size -> (num_seqs, vocab_size) int64 occurrence counts."""
    counts = torch.zeros(
        (token_ids.shape[0], vocab_size + 1), dtype=torch.int64, device=token_ids.device
    )  # the extra column collects the padding id and is dropped
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty r on every token seen in prompt or output: a positive logit becomes x / r,
    a negative one x * r (both make the token less likely when r > 1; CTRL, Keskar et al. 2019).
    Then, over output tokens only (OpenAI's definition): x -= frequency * count + presence * [count > 0].
    """
    vocab_size = logits.shape[1]
    output_counts = token_counts(metadata.output_token_ids, vocab_size)  # (num_seqs, vocab_size)
    prompt_mask = token_counts(metadata.prompt_token_ids, vocab_size) > 0
    seen = prompt_mask | (output_counts > 0)  # (num_seqs, vocab_size)
    r = metadata.repetition_penalties.unsqueeze(1)  # (num_seqs, 1)
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalised, logits)
    logits = logits - metadata.frequency_penalties.unsqueeze(1) * output_counts
    return logits - metadata.presence_penalties.unsqueeze(1) * (output_counts > 0)


def apply_temperature(
    logits: torch.Tensor, temperatures: torch.Tensor, has_greedy_rows: bool = True
) -> torch.Tensor:
    """logits / T per row. Greedy rows (T = 0) divide by 1.0: their token was already chosen, and a
    division by zero would put inf/NaN into the batch. A batch without greedy rows
    (`has_greedy_rows=False`) divides directly: the same values, three kernels fewer."""
    if has_greedy_rows:
        temperatures = torch.where(temperatures == 0.0, torch.ones_like(temperatures), temperatures)
    return logits / temperatures.unsqueeze(1)


def apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Keep tokens with p >= min_p * max(p): a cut-off that scales with the model's confidence."""
    probs = logits.softmax(dim=-1)  # (num_seqs, vocab_size)
    threshold = min_ps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # (num_seqs, 1)
    return logits.masked_fill(probs < threshold, -float("inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None):
    """Top-k keeps exactly the k most likely tokens (ties broken by token id). Top-p, applied to the
    distribution top-k leaves, keeps the smallest prefix of tokens sorted by probability whose mass
    reaches p: a token is kept iff the mass strictly above it is < p, so the token that crosses p is
    kept and the most likely token always is. One descending sort serves both; None skips a filter.
    """
    if top_ks is None and top_ps is None:
        return logits
    # stable: equal logits keep their id order, so ties are broken the same way in any batch.
    logits_sort, logits_idx = logits.sort(dim=-1, descending=True, stable=True)  # (num_seqs, vocab_size)
    if top_ks is not None:
        positions = torch.arange(logits.shape[1], device=logits.device)  # (vocab_size,)
        logits_sort = logits_sort.masked_fill(positions >= top_ks.unsqueeze(1), -float("inf"))
    if top_ps is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        # Exclusive cumsum: mass of the tokens strictly more likely than each position.
        # (Shifting the cumsum, not subtracting, keeps exact masses exact: 0.25 + 0.25 is 0.5.)
        cumsum = probs_sort.cumsum(dim=-1)
        mass_above = torch.cat([torch.zeros_like(cumsum[:, :1]), cumsum[:, :-1]], dim=1)
        # top_p = 1 disables the filter (float round-off could push the cumsum to 1 early).
        drop = (mass_above >= top_ps.unsqueeze(1)) & (top_ps < 1.0).unsqueeze(1)
        logits_sort = logits_sort.masked_fill(drop, -float("inf"))
    return torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(p / q), q ~ Exp(1) i.i.d.: token i wins with probability p_i (the exponential race).
    Rows in `generators` draw their q from their own generator (a loop over seeded rows, never over
    the vocabulary); all other rows from the global torch RNG."""
    q = torch.empty_like(probs).exponential_()  # (num_seqs, vocab_size)
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    # q == 0 has probability ~0 but would give 0/0 = NaN, which argmax treats as the maximum.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div(q).argmax(dim=-1)


def make_output(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, max_num_logprobs: int | None
) -> SamplerOutput:
    """The chosen token's raw logprob (always: it feeds the cumulative logprob), and when a row
    asked for logprobs its rank, plus the top `max_num_logprobs` raw logprobs."""
    chosen = raw_logprobs.gather(1, sampled.unsqueeze(1))  # (num_seqs, 1)
    ranks = topk_logprobs = topk_token_ids = None
    if max_num_logprobs is not None:
        # vLLM's rank: how many tokens are at least as likely as the chosen one (1 = the most likely).
        ranks = (raw_logprobs >= chosen).sum(dim=-1)
    if max_num_logprobs:
        k = min(max_num_logprobs, raw_logprobs.shape[1])
        topk_logprobs, topk_token_ids = raw_logprobs.topk(k, dim=-1)  # sorted descending
    return SamplerOutput(
        sampled_token_ids=sampled,
        logprobs=chosen.squeeze(1),
        ranks=ranks,
        topk_token_ids=topk_token_ids,
        topk_logprobs=topk_logprobs,
    )
