"""The fused temperature sampler (m4_cudagraph/ops/sample.py) against its torch reference, its
Philox draws against the distribution it must sample, and m4's FusedSampler against m1's Sampler.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors; the `gpu` cases repeat the
comparisons at Qwen3's vocabulary size."""

from __future__ import annotations

import pytest
import torch

from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence
from m1_sampling.sampler import Sampler
from m1_sampling.sampling_metadata import SamplingMetadata
from m4_cudagraph.ops import sample_temperature, sample_temperature_ref
from m4_cudagraph.sampler import FusedSampler, temperature_only

pytestmark = pytest.mark.m4

CASES = [  # (device, num_seqs, vocab_size): one block (3000, 17) and several with a partial last (9000)
    ("cpu", 5, 3000),
    ("cpu", 3, 17),
    ("cpu", 5, 9000),
    pytest.param("cuda", 256, 151936, marks=pytest.mark.gpu),
    pytest.param("cuda", 7, 5000, marks=pytest.mark.gpu),
]
TEMPERATURES = [0.0, 0.6, 1.0, 1.7, 0.05]  # row i takes TEMPERATURES[i % 5]: greedy and sampled rows mixed
NEAR = 1e-5  # how close (relative to the total) the target must be to a CDF boundary to excuse a neighbour


def _skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def assert_same_draws(ids, logits, temperatures, uniforms):
    """The kernel's ids equal the float64 reference's, except that where the target u * total lies
    within NEAR (relative) of every CDF boundary between the two ids, a neighbour is float32 rounding.
    Either way the kernel's token must have positive probability."""
    ref_ids, _ = sample_temperature_ref(logits, temperatures, uniforms)
    x = logits.cpu().double()
    for r, (k, ref) in enumerate(zip(ids.tolist(), ref_ids.tolist())):
        t = temperatures[r].item()
        if t == 0:
            assert k == ref, (r, k, ref)
            continue
        probs = torch.softmax(x[r] / t, dim=0)
        assert probs[k] > 0, (r, k)
        if k != ref:
            cdf = probs.cumsum(0)
            target = uniforms[r].item() * cdf[-1].item()
            lo, hi = min(k, ref), max(k, ref)
            gaps = (cdf[[lo, hi - 1]] - target).abs() / cdf[-1]
            assert gaps.max() <= NEAR, (r, k, ref, gaps.tolist())


@pytest.mark.parametrize("device,num_seqs,vocab", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_reference(device, num_seqs, vocab, dtype):
    _skip_without(device)
    g = torch.Generator().manual_seed(num_seqs * vocab)
    # A strided view (rows wider than the vocabulary), as logits sliced out of a larger buffer are.
    wide = torch.randn(num_seqs, vocab + 3, generator=g) * 3
    wide[torch.rand(num_seqs, vocab + 3, generator=g) < 0.1] = -float("inf")  # masked tokens
    if vocab > 8192:
        wide[1, 4096:8192] = -float("inf")  # a whole block masked: its max is -inf
    logits = wide.to(dtype)[:, :vocab].to(device)
    temperatures = torch.tensor([TEMPERATURES[i % 5] for i in range(num_seqs)]).to(device)
    uniforms = torch.rand(num_seqs, generator=g).to(device)
    ids, logprobs = sample_temperature(logits, temperatures, seed=0, uniforms=uniforms)
    assert_same_draws(ids, logits, temperatures, uniforms)
    _, ref_logprobs = sample_temperature_ref(logits, temperatures, uniforms)
    # The logprob of the token the kernel chose (the reference's, up to boundary neighbours above).
    x = logits.cpu().double()
    own = (x.gather(1, ids.cpu()[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)).float()
    torch.testing.assert_close(logprobs.cpu(), own, atol=1e-4, rtol=1e-5)
    same = ids.cpu() == sample_temperature_ref(logits, temperatures, uniforms)[0].cpu()
    torch.testing.assert_close(logprobs.cpu()[same], ref_logprobs.cpu()[same], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rounding_never_draws_a_masked_token(device):
    """At u = 0 the first token of positive probability; at u = 1 (a target at the total, which no
    running sum exceeds: the rounding fallback) and at the largest float32 below 1 the last one,
    whatever -inf logits lie before and after them, in the same block or in whole blocks."""
    _skip_without(device)
    logits = torch.randn(4, 9000, generator=torch.Generator().manual_seed(0))
    logits[:, :4200] = -float("inf")  # the first block and part of the second masked
    logits[:, 8500:] = -float("inf")  # the tail of the last block masked
    logits[1, 5000:] = -float("inf")  # row 1: only 4200 .. 4999 left, the last block all masked
    logits = logits.to(device)
    u = torch.tensor([0.0, 1.0, 1.0, 1 - 2**-24], device=device)
    ids, _ = sample_temperature(logits, torch.full((4,), 0.8, device=device), seed=0, uniforms=u)
    assert ids.tolist() == [4200, 4999, 8499, 8499]
    ref_ids, _ = sample_temperature_ref(logits, torch.full((4,), 0.8, device=device), u)
    assert ref_ids.tolist() == ids.tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_takes_the_first_maximum_across_blocks(device):
    """Ties resolve to the lowest index, as torch.argmax does, also when the copies of the maximum
    lie in different blocks (a program reads 4,096 entries)."""
    _skip_without(device)
    logits = torch.zeros(2, 9000)
    logits[0, [8200, 100, 4500]] = 3.0  # first maximum at 100 (first block)
    logits[1, [8999, 4097]] = 1.0  # first maximum at 4097 (second block)
    logits = logits.to(device)
    ids, _ = sample_temperature(logits, torch.zeros(2, device=device), seed=0)
    assert ids.tolist() == [100, 4097] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("device,rows", [("cpu", 500), pytest.param("cuda", 20000, marks=pytest.mark.gpu)])
def test_philox_draws_sample_the_softmax(device, rows):
    """Many rows of the same logits at T = 0.7, one Philox uniform each: the token frequencies must
    match softmax(x / T) (chi-square with 7 degrees of freedom; 24.3 is its 0.999 quantile; every
    expected count is >= 40) and the masked token never comes up; the same seed gives the same
    tokens, another seed other ones."""
    _skip_without(device)
    x = torch.tensor([0.3, 0.0, -0.3, 0.5, -float("inf"), 0.1, -0.2, 0.4, 0.2])
    t = 0.7
    logits = x.repeat(rows, 1).to(device)
    temperatures = torch.full((rows,), t, device=device)
    ids, logprobs = sample_temperature(logits, temperatures, seed=1234)
    counts = torch.bincount(ids.cpu(), minlength=9).double()
    assert counts[4] == 0
    expected = torch.softmax(x.double() / t, dim=0) * rows
    keep = expected > 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 24.3, (counts.tolist(), expected.tolist())
    torch.testing.assert_close(logprobs.cpu(), torch.log_softmax(x, 0)[ids.cpu()])
    # Row r's uniform is Philox(seed, r): the same seed repeats its tokens, in a smaller batch too.
    assert sample_temperature(logits[:50], temperatures[:50], seed=1234)[0].tolist() == ids[:50].tolist()
    other, _ = sample_temperature(logits[:50], temperatures[:50], seed=99)
    assert other.tolist() != ids[:50].tolist()


def _metadata(params, device="cpu", vocab=64):
    seqs = [Sequence(i, None, [1, 2, 3]) for i in range(len(params))]
    return SamplingMetadata.from_sequences(seqs, params, [None] * len(params), [0], vocab, device)


def test_only_temperature_batches_take_the_fused_path():
    plain = _metadata([SamplingParams(temperature=0.8), SamplingParams(temperature=0)])
    assert temperature_only(plain)
    for special in (dict(top_k=5), dict(top_p=0.9), dict(logprobs=2), dict(repetition_penalty=1.2),
                    dict(min_p=0.1), dict(min_tokens=2)):  # fmt: skip
        assert not temperature_only(_metadata([SamplingParams(temperature=0.8, **special)])), special
    seeded = SamplingMetadata.from_sequences(
        [Sequence(0, None, [1])], [SamplingParams(temperature=0.8, seed=1)],
        [torch.Generator().manual_seed(1)], [0], 64, "cpu",
    )  # fmt: skip
    assert not temperature_only(seeded)


def test_fused_sampler_equals_m1_on_greedy_rows_and_falls_back_otherwise(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=g)
    calls = []
    import m4_cudagraph.sampler as fused_module

    kernel = fused_module.sample_temperature
    monkeypatch.setattr(fused_module, "sample_temperature", lambda *a: calls.append(1) or kernel(*a))
    # Greedy rows in a batch that also samples take the kernel and equal m1's argmax and logprob.
    mixed = _metadata([SamplingParams(temperature=0), SamplingParams(temperature=0.9)] * 2)
    fused, plain = FusedSampler()(logits, mixed), Sampler()(logits, mixed)
    assert calls == [1]
    assert fused.sampled_token_ids[::2].tolist() == plain.sampled_token_ids[::2].tolist()
    torch.testing.assert_close(fused.logprobs[::2], plain.logprobs[::2])
    # An all-greedy batch stays on m1's three-kernel path.
    greedy = _metadata([SamplingParams(temperature=0)] * 4)
    assert FusedSampler()(logits, greedy).sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert calls == [1]
    # A batch asking for logprobs is m1's path: ranks and top-k come back.
    with_logprobs = _metadata([SamplingParams(temperature=0, logprobs=3)] * 4)
    out = FusedSampler()(logits, with_logprobs)
    assert out.ranks is not None and out.topk_token_ids.shape == (4, 3)


@pytest.mark.gpu
def test_gpu_one_compiled_variant_for_every_batch_size():
    """A run samples batches of every size; none may make Triton compile the sampler again (each new
    variant cost a compile inside the timed throughput run on a fresh machine)."""
    _skip_without("cuda")
    from m4_cudagraph.ops.sample import _block_partials_kernel, _select_token_kernel

    def variants():
        return [
            sum(len(c[0]) for c in k.device_caches.values())
            for k in (_block_partials_kernel, _select_token_kernel)
        ]

    logits = torch.randn(9, 5000, device="cuda").bfloat16()
    sample_temperature(logits[:1], torch.full((1,), 0.7, device="cuda"), seed=1)
    try:
        first = variants()
    except (AttributeError, TypeError, IndexError):
        pytest.skip("this Triton version keeps its compiled variants elsewhere")
    for n in range(2, 10):
        sample_temperature(logits[:n], torch.full((n,), 0.7, device="cuda"), seed=n)
    assert min(first) > 0, first  # the count really sees the compiled kernels
    assert variants() == first
