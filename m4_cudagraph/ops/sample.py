"""Sampling a batch that only sets temperatures, by inverse-CDF sampling: one uniform per row.

What it computes, for row r with logits x (vocab_size,), temperature T_r and a uniform u_r ~ U(0, 1):

    token_r   = argmax_i x_i                          if T_r == 0 (greedy; the first maximum on ties)
    token_r   = min { i : P_i > u_r * P_V }           otherwise, P_i = sum_{j <= i} exp(x_j / T_r)
    logprob_r = x[token_r] - logsumexp(x)             the raw logprob, for the cumulative logprob

The second line is the inverse of the CDF of softmax(x / T_r) evaluated at u_r: token i is chosen
when u_r falls in [P_{i-1}, P_i) / P_V, an interval of length p_i. Any common factor of the
exp(x_j / T_r) cancels, so the kernels scale by the row's max and never normalise. It draws from the
same distribution as m1's exponential race (argmax p_i / q_i, q_i ~ Exp(1)), with other random
numbers: one uniform per row instead of one per vocabulary entry. That is the point: the Gumbel-max
kernel that came before spent most of its time on a Philox call and two accurate logarithms per
entry (175 us per step at 256 rows x 151,936 on an H100, against ~37 us for a pass with no noise);
here the per-entry work is two exponentials and the random numbers cost one Philox call per row.

Two kernels share the work:

1. `_block_partials_kernel`, grid (num_seqs, num_blocks): block b of row r reads its BLOCK logits
   once and writes m_b = max x, the first index of that max, z_b = sum exp(x - m_b) and, for a
   sampled row, s_b = sum exp((x - m_b) / T). Nothing random; every block of a row is its own
   program, so even one row spreads over the GPU.
2. `_select_token_kernel`, one program per row: M = max_b m_b, logsumexp = M + log sum_b z_b
   exp(m_b - M). A greedy row takes the first block holding M and that block's index. A sampled row
   weighs block b by W_b = s_b exp((m_b - M) / T) (its share of P_V), draws u (Philox, counter = row),
   finds the first block where the running sum of W passes u * sum W, then reloads that one block
   and walks its entries with a cumulative sum, starting from the earlier blocks' sum.

Rounding: the sums are float32, so the walk inside the chosen block can end a hair below the target
that the block sums said it would pass (or, at u close to 1, no block may pass it). Then the last
block (entry) with positive weight is taken, and an entry of weight 0 (a -inf logit, or one whose
exponential underflows) is never chosen. Near a CDF boundary the kernel and a float64 reference can
thus pick neighbouring tokens; elsewhere they agree exactly.

A step draws one seed from torch's global CPU generator, so a run is reproducible under
`LLM(seed=...)` without any read-back from the GPU. The kernel can also read its uniforms from a
tensor, which is how it is compared with the reference exactly. The file reads top-down: the
reference, the kernels, the wrapper.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocabulary entries per program
# exp(y) = exp2(y * log2(e)); the kernels fold log2(e) / T into one multiplier. A constexpr: a Triton
# kernel may read only constexpr globals (the CPU interpreter does not enforce this; the compiler does).
LOG2E = tl.constexpr(1.4426950408889634)


def sample_temperature_ref(
    logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (num_seqs,) int64, raw logprobs of those tokens (num_seqs,) float32), from logits
    (num_seqs, vocab_size), temperatures (num_seqs,) (0 = greedy) and uniforms (num_seqs,) in [0, 1),
    in float64: the first index whose CDF of softmax(x / T) exceeds u * (the CDF's last value), never
    an entry of probability 0."""
    x = logits.double()
    greedy = temperatures == 0
    probs = torch.softmax(x / torch.where(greedy, 1.0, temperatures.double())[:, None], dim=-1)
    cdf = probs.cumsum(dim=-1)  # (num_seqs, vocab_size)
    target = uniforms.double() * cdf[:, -1]
    first = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # first cdf > target
    positive = torch.arange(x.shape[-1], device=x.device).where(probs > 0, -1)
    sampled = torch.minimum(first, positive.amax(dim=-1))
    ids = torch.where(greedy, x.argmax(dim=-1), sampled)  # argmax: the first maximum
    logprobs = x.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)
    return ids, logprobs.float()


# The vocabulary size and row stride are fixed per model, and specializing on them (divisible by 16)
# lets Triton load the logits in 16-byte vectors (measured on an H100 at 256 rows: 214 -> 185 us for
# the Gumbel-max sampler this file used to hold).
@triton.jit
def _block_partials_kernel(
    max_ptr,  # (num_seqs, num_blocks) float32 out: m_b, max of the raw logits in the block
    argmax_ptr,  # (num_seqs, num_blocks) int32 out: its first index in the row
    sumexp_ptr,  # (num_seqs, num_blocks) float32 out: z_b = sum exp(x - m_b)
    sumexp_t_ptr,  # (num_seqs, num_blocks) float32 out: s_b = sum exp((x - m_b) / T), sampled rows only
    logits_ptr,  # (num_seqs, vocab_size), rows strided
    temperatures_ptr,  # (num_seqs,) float32
    vocab_size,
    stride_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    out = row * tl.num_programs(1) + block
    cols = block * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab_size, other=-float("inf"))
    x = x.to(tl.float32)
    m = tl.max(x, axis=0)
    tl.store(max_ptr + out, m)
    tl.store(argmax_ptr + out, block * BLOCK + tl.argmax(x, axis=0, tie_break_left=True))
    # A block of masked tokens only has m = -inf; shifting by 0 instead keeps -inf - m from being nan
    # and gives sums of 0 (exp(-inf) = 0).
    y = x - tl.where(m > -float("inf"), m, 0.0)
    tl.store(sumexp_ptr + out, tl.sum(tl.exp2(y * LOG2E), axis=0))
    t = tl.load(temperatures_ptr + row)
    if t != 0.0:  # a greedy row needs no tempered sum
        tl.store(sumexp_t_ptr + out, tl.sum(tl.exp2(y * (LOG2E / t)), axis=0))


# The seed changes every step: one compiled variant for all of them.
@triton.jit(do_not_specialize=["seed"])
def _select_token_kernel(
    ids_ptr,  # (num_seqs,) int64 out
    logprobs_ptr,  # (num_seqs,) float32 out
    max_ptr, argmax_ptr, sumexp_ptr, sumexp_t_ptr,  # (num_seqs, NUM_BLOCKS) from _block_partials_kernel
    logits_ptr,  # (num_seqs, vocab_size), rows strided
    temperatures_ptr,  # (num_seqs,) float32
    uniforms_ptr,  # (num_seqs,) float32, read only when UNIFORMS_FROM_TENSOR
    vocab_size,
    stride_row,
    seed,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    BLOCK_B: tl.constexpr,  # NUM_BLOCKS rounded up to a power of two
    UNIFORMS_FROM_TENSOR: tl.constexpr,
):  # fmt: skip
    """Row r's token (greedy, or the inverse CDF at one uniform) and its raw logprob x[token] - log Z,
    log Z = M + log sum_b z_b exp(m_b - M)."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK_B)
    partials = row * NUM_BLOCKS + b
    block_max = tl.load(max_ptr + partials, mask=b < NUM_BLOCKS, other=-float("inf"))
    sumexp = tl.load(sumexp_ptr + partials, mask=b < NUM_BLOCKS, other=0.0)
    row_max = tl.max(block_max, axis=0)
    log_z = row_max + tl.log(tl.sum(sumexp * tl.exp(block_max - row_max), axis=0))
    t = tl.load(temperatures_ptr + row)
    if t == 0.0:  # the first block holding the row's max, and its first index: the first maximum
        winner = tl.argmax(block_max, axis=0, tie_break_left=True)
        token = tl.load(argmax_ptr + row * NUM_BLOCKS + winner).to(tl.int64)
    else:
        scale = LOG2E / t
        if UNIFORMS_FROM_TENSOR:
            u = tl.load(uniforms_ptr + row)
        else:
            u = tl.rand(seed, tl.program_id(0))  # one Philox counter per row
        # Block b's share of the row's unnormalised CDF: W_b = s_b exp((m_b - M) / T).
        s = tl.load(sumexp_t_ptr + partials, mask=b < NUM_BLOCKS, other=0.0)
        weight = s * tl.exp2((block_max - row_max) * scale)  # 0 for padding and all -inf blocks
        cdf = tl.cumsum(weight, axis=0)
        target = u * tl.max(cdf, axis=0)  # the cumsum's own total: the crossing is then consistent
        chosen = _first_crossing(cdf, weight, target, b, BLOCK_B)
        before = tl.sum(tl.where(b == chosen - 1, cdf, 0.0), axis=0)  # the earlier blocks' weight
        # Walk the chosen block's entries: p_i = exp((x_i - m_b) / T) exp((m_b - M) / T).
        m_b = tl.load(max_ptr + row * NUM_BLOCKS + chosen)
        i = tl.arange(0, BLOCK)
        cols = chosen * BLOCK + i
        x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab_size, other=-float("inf"))
        p = tl.exp2((x.to(tl.float32) - m_b) * scale) * tl.exp2((m_b - row_max) * scale)  # 0 where x = -inf
        entry = _first_crossing(before + tl.cumsum(p, axis=0), p, target, i, BLOCK)
        token = (chosen * BLOCK + entry).to(tl.int64)
    tl.store(ids_ptr + row, token)
    tl.store(logprobs_ptr + row, tl.load(logits_ptr + row * stride_row + token).to(tl.float32) - log_z)


@triton.jit
def _first_crossing(cdf, weight, target, idx, N: tl.constexpr):
    """The first idx of positive weight whose cdf exceeds target; if float32 rounding left every cdf
    at or below target, the last idx of positive weight. A weight of 0 is never chosen (a float32
    scan need not be monotone, so cdf > target alone could land on one) unless none is positive
    (a row of -inf only): then 0, an index that is safe to load."""
    positive = weight > 0.0
    first = tl.min(tl.where(positive & (cdf > target), idx, N), axis=0)
    last = tl.max(tl.where(positive, idx, -1), axis=0)
    return tl.maximum(tl.minimum(first, last), 0)


def sample_temperature(
    logits: torch.Tensor, temperatures: torch.Tensor, seed: int, uniforms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `sample_temperature_ref`. Without `uniforms` row r's uniform is Philox(seed, r).

    One program per block of a row writes the block's partials (so even a single row spreads over
    the GPU); `_select_token_kernel` then turns each row's partials into its token and logprob."""
    num_seqs, vocab_size = logits.shape
    assert logits.stride(1) == 1 and temperatures.shape == (num_seqs,), (logits.stride(), temperatures.shape)
    assert uniforms is None or uniforms.shape == (num_seqs,), uniforms.shape
    block = min(BLOCK, triton.next_power_of_2(vocab_size))
    num_blocks = triton.cdiv(vocab_size, block)
    # Four allocations, not views of one: Triton specializes a kernel on whether each pointer is
    # 16-byte aligned, and a view at offset num_seqs * num_blocks is aligned only for even batch
    # sizes: a run met new variants (compiled inside the timed run on a fresh machine) batch by batch.
    block_max, sumexp, sumexp_t = (
        torch.empty(num_seqs, num_blocks, dtype=torch.float32, device=logits.device) for _ in range(3)
    )
    block_argmax = torch.empty(num_seqs, num_blocks, dtype=torch.int32, device=logits.device)
    ids = torch.empty(num_seqs, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_seqs, dtype=torch.float32, device=logits.device)
    if num_seqs == 0:
        return ids, logprobs
    temperatures = temperatures.float()
    _block_partials_kernel[(num_seqs, num_blocks)](
        block_max, block_argmax, sumexp, sumexp_t, logits, temperatures, vocab_size, logits.stride(0),
        BLOCK=block,
    )  # fmt: skip
    _select_token_kernel[(num_seqs,)](
        ids, logprobs, block_max, block_argmax, sumexp, sumexp_t, logits, temperatures,
        temperatures if uniforms is None else uniforms.float(), vocab_size, logits.stride(0), seed,
        BLOCK=block, NUM_BLOCKS=num_blocks, BLOCK_B=triton.next_power_of_2(num_blocks),
        UNIFORMS_FROM_TENSOR=uniforms is not None,
    )  # fmt: skip
    return ids, logprobs
