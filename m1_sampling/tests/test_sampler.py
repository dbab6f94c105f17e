"""The batched Sampler against hand computations and brute-force, row-by-row references.

Deterministic checks (greedy, penalties, min_tokens, seeds, logprobs) first; then statistical checks
that sample one row thousands of times *in one batch* (each unseeded row draws its own noise from the
global RNG, so a batch of N identical rows is N independent draws) and compare the empirical
distribution with a float64 reference computed one row at a time, with plain Python loops.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence
from m1_sampling.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p
from m1_sampling.sampling_metadata import SamplingMetadata

pytestmark = pytest.mark.m1

CPU = torch.device("cpu")


def make_metadata(
    params: list[SamplingParams],
    vocab_size: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> SamplingMetadata:
    seqs = []
    for i in range(len(params)):
        seq = Sequence(i, None, prompts[i] if prompts else [0])
        for t in outputs[i] if outputs else []:
            seq.append_token_id(t)
        seqs.append(seq)
    gens = generators if generators is not None else [None] * len(params)
    return SamplingMetadata.from_sequences(seqs, params, gens, list(eos_token_ids), vocab_size, CPU)


def sample(logits: torch.Tensor, params: list[SamplingParams], **kwargs):
    return Sampler()(logits, make_metadata(params, logits.shape[1], **kwargs))


# ----------------------------------------------------------------------------------------------
# Greedy and temperature 0


def test_greedy_is_argmax_without_nan():
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    # Truncation settings on a greedy row must be harmless: T = 0 never divides by zero.
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, logprobs=3)] * 16
    out = sample(logits, params)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert torch.equal(out.ranks, torch.ones(16, dtype=torch.int64))
    for t in (out.logprobs, out.topk_logprobs):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_greedy_any_input_dtype(dtype):
    torch.manual_seed(1)
    logits = torch.randn(8, 40).to(dtype)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 8)
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.logprobs.dtype == torch.float32


def test_mixed_greedy_and_random_rows():
    """Greedy rows stay argmax while random rows in the same batch really sample."""
    torch.manual_seed(2)
    vocab, num_seqs = 8, 400
    logits = torch.zeros(num_seqs, vocab)  # flat rows: a random row hits every token
    logits[:, 5] = 0.1  # ...but the argmax is token 5
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * (num_seqs // 2)
    md = make_metadata(params, vocab)
    assert not md.all_greedy and not md.all_random
    tokens = Sampler()(logits, md).sampled_token_ids
    assert (tokens[0::2] == 5).all()
    assert len(torch.unique(tokens[1::2])) == vocab


# ----------------------------------------------------------------------------------------------
# Penalties and min_tokens: hand computations


def test_penalties_equal_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 3.0], [2.0, -1.0, 0.5, -0.5, 1.0, 3.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # no penalties: untouched, and its history is not even copied
    ]
    # Row 0: prompt {0, 1}; output 2 twice and 3 once. Row 1 has none: its rows are padding only.
    md = make_metadata(params, 6, prompts=[[0, 1], [0, 1, 2, 3, 4]], outputs=[[2, 3, 2], [5]])
    assert md.prompt_token_ids.tolist() == [[0, 1], [6, 6]]  # padded with vocab_size
    assert md.output_token_ids.tolist() == [[2, 3, 2], [6, 6, 6]]
    expected_row0 = [
        2.0 / 2,  # prompt, positive: divided by the repetition penalty
        -1.0 * 2,  # prompt, negative: multiplied
        0.5 / 2 - 0.5 * 2 - 0.25,  # output twice: repetition, then frequency * 2 and presence
        -0.5 * 2 - 0.5 * 1 - 0.25,  # output once
        1.0,  # never seen
        3.0,  # never seen
    ]
    got = apply_penalties(logits.clone(), md)
    torch.testing.assert_close(got[0], torch.tensor(expected_row0))
    torch.testing.assert_close(got[1], logits[1])


def test_frequency_and_presence_ignore_the_prompt():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)]
    md = make_metadata(params, 4, prompts=[[0, 0, 0, 3]], outputs=[[3, 3]])
    got = apply_penalties(logits.clone(), md)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0, 1.0, 1.0 - 2 * 1.0 - 0.5]]))


def test_penalties_change_the_greedy_choice():
    """Greedy is taken after the penalties: a repeated favourite loses to the runner-up."""
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    out = sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=0)], prompts=[[0]])
    assert out.sampled_token_ids.tolist() == [1]
    # ...while the reported logprob and rank are those of the raw distribution.
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[:, 1])
    assert out.ranks.tolist() == [2]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos = (7, 8)  # two EOS ids, as generation_config can give
    vocab = 10
    logits = torch.zeros(5, vocab)
    logits[:, 7], logits[:, 8], logits[:, 2], logits[:, 4] = 5.0, 4.0, 3.0, 1.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2]),  # under: all masked
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2]),  # reached min_tokens
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2], ignore_eos=True),
        SamplingParams(temperature=0.0),  # no min_tokens
        SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[99]),  # out-of-vocab stop id
    ]
    outputs = [[1, 1], [1, 1, 1], [], [], []]
    md = make_metadata(params, vocab, outputs=outputs, eos_token_ids=eos)
    assert md.min_tokens_stop_ids == [(0, [2, 7, 8]), (2, [2]), (4, [7, 8])]
    out = Sampler()(logits, md)
    assert out.sampled_token_ids.tolist() == [4, 7, 7, 7, 2]


# ----------------------------------------------------------------------------------------------
# Seeds: a seeded row is independent of its batch


def _seeded_run(logits_row, params, seed, position, batch_size, steps=6, global_seed=0):
    """Tokens of a seeded row placed at `position` in a batch of other (seeded/unseeded) rows."""
    torch.manual_seed(global_seed)
    gen = torch.Generator().manual_seed(seed)
    others = [torch.Generator().manual_seed(1000 + i) if i % 2 else None for i in range(batch_size)]
    tokens = []
    for _ in range(steps):
        logits = torch.randn(batch_size, logits_row.shape[0])
        logits[position] = logits_row
        all_params = [SamplingParams(top_k=10 + i) for i in range(batch_size)]
        all_params[position] = params
        gens = list(others)
        gens[position] = gen
        out = Sampler()(logits, make_metadata(all_params, logits_row.shape[0], generators=gens))
        tokens.append(out.sampled_token_ids[position].item())
    return tokens


@pytest.mark.parametrize(
    "params",
    [SamplingParams(seed=7), SamplingParams(seed=7, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01)],
)
def test_seeded_row_is_independent_of_batch(params):
    logits_row = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.5
    alone = _seeded_run(logits_row, params, seed=7, position=0, batch_size=1)
    assert len(set(alone)) > 1  # really random, so the equalities below mean something
    for position, batch_size, global_seed in [(0, 5, 1), (3, 5, 2), (6, 7, 3)]:
        assert _seeded_run(logits_row, params, 7, position, batch_size, global_seed=global_seed) == alone
    assert _seeded_run(logits_row, params, 8, 0, 1) != alone  # another seed, other tokens


def test_unseeded_rows_follow_the_global_rng():
    logits = torch.zeros(4, 100)
    md = make_metadata([SamplingParams()] * 4, 100)
    torch.manual_seed(5)
    a = Sampler()(logits, md).sampled_token_ids
    torch.manual_seed(5)
    b = Sampler()(logits, md).sampled_token_ids
    c = Sampler()(logits, md).sampled_token_ids
    assert torch.equal(a, b) and not torch.equal(b, c)


# ----------------------------------------------------------------------------------------------
# Logprobs: raw distribution, ranks, top-k


def test_logprobs_ranks_and_topk_are_raw():
    torch.manual_seed(4)
    vocab = 30
    logits = torch.randn(6, vocab) * 2
    params = [
        SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.5),
        SamplingParams(logprobs=2, top_k=3),
        SamplingParams(temperature=1.3, presence_penalty=1.0),  # logprobs None: still gets top-5 columns
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(min_p=0.1, top_p=0.7, seed=3),
        SamplingParams(frequency_penalty=2.0),
    ]
    gens = [None] * 4 + [torch.Generator().manual_seed(3), None]
    out = sample(logits, params, outputs=[[1, 2, 2]] * 6, generators=gens)
    raw = torch.log_softmax(logits.double(), -1)
    for row in range(6):
        tok = out.sampled_token_ids[row].item()
        assert math.isclose(out.logprobs[row].item(), raw[row, tok].item(), abs_tol=1e-5)
        assert out.ranks[row].item() == 1 + sum(raw[row, j] > raw[row, tok] for j in range(vocab))
        ref = sorted(range(vocab), key=lambda j: -raw[row, j].item())[:5]
        assert out.topk_token_ids[row].tolist() == ref
        torch.testing.assert_close(out.topk_logprobs[row].double(), raw[row, ref], atol=1e-5, rtol=0)
    assert out.topk_token_ids.shape == (6, 5)


def test_no_topk_when_no_row_asks_for_logprobs():
    out = sample(torch.randn(3, 10), [SamplingParams(logprobs=0), SamplingParams(), SamplingParams()])
    assert out.topk_token_ids is None and out.topk_logprobs is None
    assert out.logprobs.shape == (3,) and out.ranks.shape == (3,)


def test_no_ranks_when_no_row_asks_for_logprobs():
    """Ranks are reported only in logprob entries; the chosen logprob (cumulative logprob) always is."""
    logits = torch.randn(3, 10)
    out = sample(logits, [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_p=0.5)])
    assert out.ranks is None and out.topk_token_ids is None and out.topk_logprobs is None
    torch.testing.assert_close(
        out.logprobs, torch.log_softmax(logits, -1).gather(1, out.sampled_token_ids[:, None])[:, 0]
    )


def test_caller_logits_are_not_modified():
    logits = torch.randn(2, 10)
    before = logits.clone()
    sample(logits, [SamplingParams(min_tokens=2, repetition_penalty=2.0)] * 2, eos_token_ids=(3,))
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------------------------
# The fast path: rows that set nothing but a temperature


@pytest.mark.parametrize(
    "temperatures",
    [[0.0] * 5, [0.6] * 5, [0.0, 0.5, 1.3, 1e-6, 2.0]],  # all greedy, all random, mixed (1e-6 is greedy)
    ids=["greedy", "random", "mixed"],
)
def test_temperature_only_fast_path_equals_general_path(temperatures, monkeypatch):
    """Same metadata and the same tokens, step after step, as the general path; the general path
    is forced by top_k = vocab_size, a real setting that filters nothing."""
    vocab = 40
    fast_calls = []
    build = SamplingMetadata._from_temperatures.__func__
    monkeypatch.setattr(
        SamplingMetadata,
        "_from_temperatures",
        classmethod(lambda cls, *a: fast_calls.append(1) or build(cls, *a)),
    )
    fast = make_metadata([SamplingParams(temperature=t) for t in temperatures], vocab)
    general = make_metadata([SamplingParams(temperature=t, top_k=vocab) for t in temperatures], vocab)
    assert len(fast_calls) == 1  # only the first batch took the fast path
    for f in dataclasses.fields(SamplingMetadata):
        a, b = getattr(fast, f.name), getattr(general, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    gen = torch.Generator().manual_seed(8)
    for step in range(4):
        logits = torch.randn(len(temperatures), vocab, generator=gen)
        torch.manual_seed(step)
        a = Sampler()(logits, fast)
        torch.manual_seed(step)
        b = Sampler()(logits, general)
        assert torch.equal(a.sampled_token_ids, b.sampled_token_ids)
        assert torch.equal(a.logprobs, b.logprobs)


def test_seeded_rows_leave_the_fast_path_and_stay_independent_of_the_batch():
    """A seeded row needs its generator, so its batch takes the general path; its tokens are the
    same whether its neighbours are temperature-only rows or it runs alone."""
    vocab = 30
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(temperature=0.9, seed=42)
    alone = make_metadata([seeded], vocab, generators=[torch.Generator().manual_seed(42)])
    batch = make_metadata(
        [SamplingParams(temperature=0.7)] * 2 + [seeded] + [SamplingParams(temperature=0.0)] * 3,
        vocab,
        generators=[None, None, torch.Generator().manual_seed(42), None, None, None],
    )
    assert list(batch.generators) == [2]
    torch.manual_seed(0)
    in_batch = Sampler()(logits, batch).sampled_token_ids[2]
    torch.manual_seed(1)  # another global state: the seeded row must not care
    assert Sampler()(logits[2:3], alone).sampled_token_ids[0] == in_batch


class _CountKernels(TorchDispatchMode):
    """Names of the aten ops that are not views: on a GPU, one kernel launch each."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_temperature_only_batch_launches_few_kernels():
    """The throughput workload's batch (temperature only, no logprobs): log_softmax for the
    cumulative logprob, one gather, the division by T, softmax, the exponential race, argmax.
    No copy of the logits, no rank or top-k pass, no per-row work."""
    md = make_metadata([SamplingParams(temperature=0.6)] * 8, 50)
    logits = torch.randn(8, 50)
    with _CountKernels() as counter:
        Sampler()(logits, md)
    assert len(counter.names) <= 9, counter.names
    assert not any(n.startswith(("ge", "topk", "sum", "_to_copy", "clone", "where")) for n in counter.names)


# ----------------------------------------------------------------------------------------------
# Top-k / top-p: vectorised op against a row-by-row reference


def reference_keep_set(logits_row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Brute force, float64: the k most likely tokens (ties by id), then the smallest prefix by
    probability (renormalised over those k) whose mass reaches p."""
    order = sorted(range(len(logits_row)), key=lambda i: (-logits_row[i].item(), i))
    kept = [i for i in order[:top_k] if logits_row[i] > -math.inf]
    probs = torch.softmax(logits_row.double()[kept], -1).tolist()
    mass, result = 0.0, []
    for token, p in zip(kept, probs):
        result.append(token)
        mass += p
        if top_p < 1.0 and mass >= top_p:
            break
    return set(result)


@pytest.mark.parametrize("vocab", [8, 33])
def test_top_k_top_p_matches_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    num_seqs = 40
    logits = torch.randn(num_seqs, vocab, generator=gen) * 2
    logits[5, :] = 0.0  # all ties
    logits[6, 2:] = -math.inf  # already masked tokens
    top_ks = torch.randint(1, vocab + 1, (num_seqs,), generator=gen)
    top_ps = torch.rand(num_seqs, generator=gen).clamp_min(0.05)
    top_ps[::4] = 1.0
    got = apply_top_k_top_p(logits, top_ks, top_ps)
    for row in range(num_seqs):
        kept = {i for i in range(vocab) if got[row, i] > -math.inf}
        assert kept == reference_keep_set(logits[row], top_ks[row].item(), top_ps[row].item()), row
        assert torch.equal(got[row, sorted(kept)], logits[row, sorted(kept)])  # kept logits untouched


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.25, {0, 1}),  # exactly the mass of two tokens: two are enough
        (0.25 + 1e-4, {0, 1, 2}),  # just above: the third token crosses p and is kept
        (0.375, {0, 1, 2}),
        (0.01, {0}),  # at least one token always
        (1.0, set(range(8))),
    ],
)
def test_top_p_exact_boundary(top_p, expected):
    """Eight equal logits: each p is 1/8 exactly in float32, so cumulative masses are exact."""
    got = apply_top_k_top_p(torch.zeros(1, 8), None, torch.tensor([top_p]))
    assert {i for i in range(8) if got[0, i] > -math.inf} == expected


@pytest.mark.parametrize(("min_p", "expected"), [(1.0, {0, 1}), (0.5, {0, 1, 2}), (0.0, {0, 1, 2, 3})])
def test_min_p_keeps_tokens_at_the_threshold(min_p, expected):
    """p >= min_p * max(p) is kept: with min_p = 1 the tokens tied at the top survive."""
    logits = torch.tensor([[0.0, 0.0, -0.5, -3.0]])
    got = apply_min_p(logits, torch.tensor([min_p]))
    assert {i for i in range(4) if got[0, i] > -math.inf} == expected


# ----------------------------------------------------------------------------------------------
# Statistical: empirical distribution over many draws vs a float64 reference


def reference_probs(logits_row, params: SamplingParams, prompt=(), output=()) -> torch.Tensor:
    """The distribution the sampler draws from, one row, float64, plain loops."""
    x = logits_row.double().clone()
    for t in set(prompt) | set(output):
        r = params.repetition_penalty
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t in set(output):
        x[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    x = x / params.temperature
    probs = torch.softmax(x, -1)
    x[probs < params.min_p * probs.max()] = -math.inf
    keep = reference_keep_set(x, params.top_k if params.top_k > 0 else len(x), params.top_p)
    x[[i for i in range(len(x)) if i not in keep]] = -math.inf
    return torch.softmax(x, -1)


def empirical(logits_row, params, num_draws=20000, **kwargs) -> torch.Tensor:
    """Frequencies of num_draws independent draws: one batch of identical, unseeded rows."""
    logits = logits_row.expand(num_draws, -1).contiguous()
    kwargs = {k: [v] * num_draws for k, v in kwargs.items()}
    tokens = sample(logits, [params] * num_draws, **kwargs).sampled_token_ids
    return torch.bincount(tokens, minlength=logits.shape[1]).double() / num_draws


ROW = torch.tensor([1.5, 0.2, -0.3, 1.1, 0.8, -1.0, 0.0, 0.6])  # vocab 8, no ties, no tiny probs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.5),
        SamplingParams(top_k=3),
        SamplingParams(top_k=1),
        SamplingParams(top_p=0.5),
        SamplingParams(top_p=0.8, temperature=0.9),
        SamplingParams(min_p=0.3),
        SamplingParams(min_p=0.2, top_k=4, top_p=0.9, temperature=1.2),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-minp{p.min_p}",
)
def test_distribution_matches_reference(params):
    torch.manual_seed(11)
    ref = reference_probs(ROW, params)
    freq = empirical(ROW, params)
    # The support is exactly the reference's (top-k / top-p / min-p never leak, every kept token
    # shows up), and the frequencies agree: 0.02 is > 5 standard errors at 20k draws.
    assert set(freq.nonzero().flatten().tolist()) == set(ref.nonzero().flatten().tolist())
    assert (freq - ref).abs().max() < 0.02


def test_distribution_with_penalties_matches_reference():
    torch.manual_seed(12)
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, top_p=0.95)
    prompt, output = [0, 1], [3, 3, 4]
    ref = reference_probs(ROW, params, prompt, output)
    freq = empirical(ROW, params, prompts=prompt, outputs=output)
    assert (freq - ref).abs().max() < 0.02


def test_top_p_support_includes_the_crossing_token():
    """p = 0.6 on ROW: the top two tokens hold 0.50 < 0.6, so the third (which crosses 0.6) is sampled."""
    probs = torch.softmax(ROW.double(), -1)
    top = probs.sort(descending=True).values
    assert top[:2].sum() < 0.6 <= top[:3].sum()  # the setting this test relies on
    torch.manual_seed(13)
    assert (empirical(ROW, SamplingParams(top_p=0.6)) > 0).sum() == 3


def test_low_temperature_concentrates_on_argmax():
    torch.manual_seed(14)
    argmax_share = [empirical(ROW, SamplingParams(temperature=t), 5000)[0].item() for t in (2.0, 1.0, 0.5)]
    assert argmax_share[0] < argmax_share[1] < argmax_share[2]
    assert empirical(ROW, SamplingParams(temperature=0.02), 5000)[0] == 1.0
