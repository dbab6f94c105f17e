"""Sampling a batch that only sets temperatures, in one pass over the logits (the Gumbel-max trick).

What it computes, for row r with logits x (vocab_size,) and temperature T_r:

    token_r   = argmax_i x_i                          if T_r == 0 (greedy; the first maximum on ties)
    token_r   = argmax_i (x_i + T_r * g_i)            otherwise, g_i ~ Gumbel(0, 1) i.i.d.
    logprob_r = x[token_r] - logsumexp(x)             the raw logprob, for the cumulative logprob

The second line is a draw from softmax(x / T_r): argmax_i (x_i / T_r + g_i) is the Gumbel-max trick, and
multiplying every score by T_r > 0 changes no argmax (an FMA instead of a division per entry). It is
m1's exponential race (argmax p_i / q_i with q_i ~ Exp(1)) taken in log space: log p_i - log q_i, and
-log q_i = -log(-log u_i) for u_i ~ U(0, 1) is a Gumbel(0, 1) sample. m1 runs this as about eight
kernels, each reading or writing a (num_seqs, vocab_size) float32 matrix (log-softmax, the division by
T, softmax, the draw of q, the clamp, p / q, argmax); here the logits are read once: each program takes
a block of a row and writes four numbers (its max, sum of exponentials, best score and where), and a
second kernel (one program per row) combines the blocks. The uniforms come from Triton's Philox
generator: one call (ten rounds of multiplies) yields four 32-bit draws, so a block of B entries makes
B / 4 calls, each with its own counter (`_philox_uniforms`). A step draws one seed from torch's global CPU
generator, so a run is reproducible under `LLM(seed=...)` without any read-back from the GPU. (Drawing
one uniform per call, as `tl.rand` does, made the kernel compute-bound: 350 us per step at 256 rows on
an H100.)

The file reads top-down: the reference, the kernels, the wrapper. The kernel can also read its
uniforms from a tensor, which is how it is compared with the reference exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocabulary entries per program


def gumbel(uniforms: torch.Tensor) -> torch.Tensor:
    """-log(-log u): Gumbel(0, 1) noise from U(0, 1) samples (u = 0 gives -inf: that token never wins)."""
    return -torch.log(-torch.log(uniforms))


def sample_temperature_ref(
    logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (num_seqs,) int64, raw logprobs of those tokens (num_seqs,) float32), from logits
    (num_seqs, vocab_size), temperatures (num_seqs,) (0 = greedy) and uniforms like the logits."""
    x = logits.float()
    greedy = (temperatures == 0)[:, None]
    scores = torch.where(greedy, x, x + temperatures[:, None] * gumbel(uniforms))
    ids = scores.argmax(dim=-1)  # the first maximum, as torch.argmax does
    logprobs = x.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)
    return ids, logprobs


@triton.jit
def _philox_uniforms(seed, offset, BLOCK: tl.constexpr):
    """BLOCK uniforms in [0, 1) from the BLOCK // 4 Philox counters offset, offset + 1, ...: call j's
    four draws fill entries 4j .. 4j + 3 (in the order join/reshape lays them out)."""
    u0, u1, u2, u3 = tl.rand4x(seed, offset + tl.arange(0, BLOCK // 4))
    return tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK,))


# The seed changes every step: one compiled variant for all. The vocabulary size and row stride are
# fixed per model, and specializing on them (divisible by 16) lets Triton load the logits in 16-byte
# vectors (measured on an H100 at 256 rows: 214 -> 185 us for the whole sampler).
@triton.jit(do_not_specialize=["seed"])
def _sample_block_kernel(
    max_ptr,  # (num_seqs, num_blocks) float32 out: max of the raw logits in the block
    sumexp_ptr,  # (num_seqs, num_blocks) float32 out: sum of exp(x - that max)
    best_ptr,  # (num_seqs, num_blocks) float32 out: the block's best score
    best_idx_ptr,  # (num_seqs, num_blocks) int64 out: where (the first on ties)
    logits_ptr,  # (num_seqs, vocab_size), rows strided
    temperatures_ptr,  # (num_seqs,) float32
    uniforms_ptr,  # (num_seqs, vocab_size) float32, read only when UNIFORMS_FROM_TENSOR
    vocab_size,
    stride_row,
    seed,
    BLOCK: tl.constexpr,
    UNIFORMS_FROM_TENSOR: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    num_blocks = tl.num_programs(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab_size
    x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    tl.store(max_ptr + row * num_blocks + block, m)
    tl.store(sumexp_ptr + row * num_blocks + block, tl.sum(tl.where(mask, tl.exp(x - m), 0.0), axis=0))
    t = tl.load(temperatures_ptr + row)
    if t == 0.0:  # greedy: no noise to draw
        score = x
    else:
        if UNIFORMS_FROM_TENSOR:
            u = tl.load(uniforms_ptr + row * vocab_size + cols, mask=mask, other=0.5)
        else:  # every (row, block) owns BLOCK // 4 Philox counters
            u = _philox_uniforms(seed, (row * num_blocks + block) * (BLOCK // 4), BLOCK)
        score = tl.where(mask, x - t * tl.log(-tl.log(u)), -float("inf"))  # x + T * Gumbel
    tl.store(best_ptr + row * num_blocks + block, tl.max(score, axis=0))
    best_idx = block * BLOCK + tl.argmax(score, axis=0, tie_break_left=True)
    tl.store(best_idx_ptr + row * num_blocks + block, best_idx.to(tl.int64))


@triton.jit
def _combine_blocks_kernel(
    ids_ptr,  # (num_seqs,) int64 out
    logprobs_ptr,  # (num_seqs,) float32 out
    max_ptr, sumexp_ptr, best_ptr, best_idx_ptr,  # (num_seqs, NUM_BLOCKS) from _sample_block_kernel
    logits_ptr,
    stride_row,
    NUM_BLOCKS: tl.constexpr,
    BLOCK_B: tl.constexpr,  # NUM_BLOCKS rounded up to a power of two
):  # fmt: skip
    """Row r's token: where the first block holding the row's best score has it. Its logprob:
    x[token] - log Z, with log Z = M + log sum_b sumexp_b * exp(max_b - M) and M = max_b max_b."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK_B)
    mask = b < NUM_BLOCKS
    block_max = tl.load(max_ptr + row * NUM_BLOCKS + b, mask=mask, other=-float("inf"))
    sumexp = tl.load(sumexp_ptr + row * NUM_BLOCKS + b, mask=mask, other=0.0)
    row_max = tl.max(block_max, axis=0)
    log_z = row_max + tl.log(tl.sum(sumexp * tl.exp(block_max - row_max), axis=0))
    best = tl.load(best_ptr + row * NUM_BLOCKS + b, mask=mask, other=-float("inf"))
    winner = tl.argmax(best, axis=0, tie_break_left=True)  # the first block: the first maximum
    token = tl.load(best_idx_ptr + row * NUM_BLOCKS + winner)
    tl.store(ids_ptr + row, token)
    tl.store(logprobs_ptr + row, tl.load(logits_ptr + row * stride_row + token).to(tl.float32) - log_z)


def sample_temperature(
    logits: torch.Tensor, temperatures: torch.Tensor, seed: int, uniforms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `sample_temperature_ref`. Without `uniforms` the noise is Philox(seed, counter).

    Each program takes one block of one row (so even a single row spreads over the GPU) and writes
    its block's max, sum of exponentials and best score; `_combine_blocks_kernel` then turns each
    row's blocks into its token and logprob (it replaced ten small torch ops: 79 us per step at 256
    rows on an H100, 22 us at one row, almost all of it launch and drain)."""
    num_seqs, vocab_size = logits.shape
    assert logits.stride(1) == 1 and temperatures.shape == (num_seqs,), (logits.stride(), temperatures.shape)
    block = min(BLOCK, triton.next_power_of_2(vocab_size))
    num_blocks = triton.cdiv(vocab_size, block)
    # Four allocations, not views of one: Triton specializes a kernel on whether each pointer is
    # 16-byte aligned, and a view at offset num_seqs * num_blocks is aligned only for even batch
    # sizes: a run met new variants (compiled inside the timed run on a fresh machine) batch by batch.
    block_max, sumexp, best = (
        torch.empty(num_seqs, num_blocks, dtype=torch.float32, device=logits.device) for _ in range(3)
    )
    best_idx = torch.empty(num_seqs, num_blocks, dtype=torch.int64, device=logits.device)
    ids = torch.empty(num_seqs, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_seqs, dtype=torch.float32, device=logits.device)
    if num_seqs == 0:
        return ids, logprobs
    _sample_block_kernel[(num_seqs, num_blocks)](
        block_max, sumexp, best, best_idx, logits, temperatures.float(),
        block_max if uniforms is None else uniforms, vocab_size, logits.stride(0), seed,
        BLOCK=block, UNIFORMS_FROM_TENSOR=uniforms is not None,
    )  # fmt: skip
    _combine_blocks_kernel[(num_seqs,)](
        ids, logprobs, block_max, sumexp, best, best_idx, logits, logits.stride(0),
        NUM_BLOCKS=num_blocks, BLOCK_B=triton.next_power_of_2(num_blocks),
    )  # fmt: skip
    return ids, logprobs
