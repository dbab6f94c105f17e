"""The fused temperature sampler (m4_cudagraph/ops/sample.py) against its torch reference, its
Philox noise against the distribution it must sample, and m4's FusedSampler against m1's Sampler.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors; the `gpu` cases repeat the
comparisons at Qwen3's vocabulary size."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence
from m1_sampling.sampler import Sampler
from m1_sampling.sampling_metadata import SamplingMetadata
from m4_cudagraph.ops import sample_temperature, sample_temperature_ref
from m4_cudagraph.ops.sample import _philox_uniforms
from m4_cudagraph.sampler import FusedSampler, temperature_only

pytestmark = pytest.mark.m4

CASES = [  # (device, num_seqs, vocab_size)
    ("cpu", 5, 3000),
    ("cpu", 3, 17),
    pytest.param("cuda", 256, 151936, marks=pytest.mark.gpu),
    pytest.param("cuda", 7, 5000, marks=pytest.mark.gpu),
]


def _skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("device,num_seqs,vocab", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference(device, num_seqs, vocab, dtype):
    _skip_without(device)
    g = torch.Generator().manual_seed(num_seqs * vocab)
    # A strided view (rows wider than the vocabulary), as logits sliced out of a larger buffer are.
    wide = torch.randn(num_seqs, vocab + 3, generator=g).to(dtype)
    logits = wide[:, :vocab].to(device)
    temperatures = torch.tensor([[0.0, 0.6, 1.0, 1.7][i % 4] for i in range(num_seqs)]).to(device)
    uniforms = torch.rand(num_seqs, vocab, generator=g).to(device)
    ids, logprobs = sample_temperature(logits, temperatures, seed=0, uniforms=uniforms)
    ref_ids, ref_logprobs = sample_temperature_ref(logits, temperatures, uniforms)
    assert ids.tolist() == ref_ids.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-4, rtol=1e-5)


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
def test_philox_noise_samples_the_softmax(device, rows):
    """Many rows of the same logits at T = 0.7: the token frequencies must match softmax(x / T)
    (chi-square with 7 degrees of freedom; 24.3 is its 0.999 quantile; every expected count is
    >= 40), and another seed must give other draws."""
    _skip_without(device)
    x = torch.tensor([0.3, 0.0, -0.3, 0.5, 0.1, -0.2, 0.4, 0.2])
    t = 0.7
    logits = x.repeat(rows, 1).to(device)
    ids, logprobs = sample_temperature(logits, torch.full((rows,), t, device=device), seed=1234)
    counts = torch.bincount(ids.cpu(), minlength=8).double()
    expected = torch.softmax(x.double() / t, dim=0) * rows
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3, (counts.tolist(), expected.tolist())
    torch.testing.assert_close(logprobs.cpu(), torch.log_softmax(x, 0)[ids.cpu()])
    other, _ = sample_temperature(logits[:50], torch.full((50,), t, device=device), seed=99)
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


@triton.jit
def _write_uniforms(out_ptr, draws_ptr, seed, BLOCK: tl.constexpr):
    """The block _philox_uniforms builds, and the four draws of each of its counters, side by side."""
    tl.store(out_ptr + tl.arange(0, BLOCK), _philox_uniforms(seed, 10, BLOCK))
    j = tl.arange(0, BLOCK // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, 10 + j)
    tl.store(draws_ptr + 4 * j, u0)
    tl.store(draws_ptr + 4 * j + 1, u1)
    tl.store(draws_ptr + 4 * j + 2, u2)
    tl.store(draws_ptr + 4 * j + 3, u3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_philox_uniforms_use_each_draw_once(device):
    """Entries 4j .. 4j + 3 of a block are the four draws of Philox counter offset + j, each used
    exactly once: no vocabulary entry shares its noise with another."""
    _skip_without(device)
    block = torch.empty(64, device=device)
    draws = torch.empty(64, device=device)
    _write_uniforms[(1,)](block, draws, 1234, BLOCK=64)
    block, draws = block.cpu().view(16, 4), draws.cpu().view(16, 4)
    assert torch.equal(block.sort(dim=1).values, draws.sort(dim=1).values)
    assert block.unique().numel() == 64 and block.min() >= 0 and block.max() < 1


@pytest.mark.gpu
def test_gpu_one_compiled_variant_for_every_batch_size():
    """A run samples batches of every size; none may make Triton compile the sampler again (each new
    variant cost a compile inside the timed throughput run on a fresh machine)."""
    _skip_without("cuda")
    from m4_cudagraph.ops.sample import _combine_blocks_kernel, _sample_block_kernel

    def variants():
        return [
            sum(len(c[0]) for c in k.device_caches.values())
            for k in (_sample_block_kernel, _combine_blocks_kernel)
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
