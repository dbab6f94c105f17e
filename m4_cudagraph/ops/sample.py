"""Sampling a batch that only sets temperatures, in one pass over the logits (the Gumbel-max trick).

What it computes, for row r with logits x (vocab_size,) and temperature T_r:

    token_r   = argmax_i x_i                          if T_r == 0 (greedy; the first maximum on ties)
    token_r   = argmax_i (x_i / T_r + g_i)            otherwise, g_i ~ Gumbel(0, 1) i.i.d.
    logprob_r = x[token_r] - logsumexp(x)             the raw logprob, for the cumulative logprob

The second line is a draw from softmax(x / T_r). It is m1's exponential race (argmax p_i / q_i with
q_i ~ Exp(1)) taken in log space: log p_i - log q_i, and -log q_i = -log(-log u_i) for u_i ~ U(0, 1)
is a Gumbel(0, 1) sample. m1 runs this as about eight kernels, each reading or writing a
(num_seqs, vocab_size) float32 matrix (log-softmax, the division by T, softmax, the draw of q, the
clamp, p / q, argmax); here one program per row reads the logits once, keeps a running logsumexp
and a running best score, and writes two numbers. The uniforms come from Triton's Philox generator
keyed by (seed, row * vocab_size + i): a step draws one seed from torch's global CPU generator, so a
run is reproducible under `LLM(seed=...)` without any read-back from the GPU.

The file reads top-down: the reference, the kernel, the wrapper. The kernel can also read its
uniforms from a tensor, which is how it is compared with the reference exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # vocabulary entries per loop iteration


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
    scores = torch.where(greedy, x, x / torch.where(greedy, 1.0, temperatures[:, None]) + gumbel(uniforms))
    ids = scores.argmax(dim=-1)  # the first maximum, as torch.argmax does
    logprobs = x.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)
    return ids, logprobs


@triton.jit
def _sample_kernel(
    ids_ptr,  # (num_seqs,) int64 out
    logprobs_ptr,  # (num_seqs,) float32 out
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
    t = tl.load(temperatures_ptr + row)
    greedy = t == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    m = -float("inf")  # running max of the raw logits
    s = 0.0  # running sum of exp(x - m)
    best = -float("inf")  # best score so far, and where
    best_idx = 0
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(x - m_new), 0.0), axis=0)
        m = m_new
        if UNIFORMS_FROM_TENSOR:
            u = tl.load(uniforms_ptr + row * vocab_size + cols, mask=mask, other=0.5)
        else:
            u = tl.rand(seed, row * vocab_size + cols)
        noise = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, x * inv_t + noise)
        score = tl.where(mask, score, -float("inf"))
        chunk_best = tl.max(score, axis=0)
        chunk_idx = tl.argmax(score, axis=0, tie_break_left=True)
        # Strictly greater: on ties the earlier block keeps the win, so the first maximum wins overall.
        best_idx = tl.where(chunk_best > best, start + chunk_idx, best_idx)
        best = tl.maximum(best, chunk_best)
    x_best = tl.load(logits_ptr + row * stride_row + best_idx).to(tl.float32)
    tl.store(ids_ptr + row, best_idx.to(tl.int64))
    tl.store(logprobs_ptr + row, x_best - (m + tl.log(s)))


def sample_temperature(
    logits: torch.Tensor, temperatures: torch.Tensor, seed: int, uniforms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `sample_temperature_ref`. Without `uniforms` the noise is Philox(seed, i)."""
    num_seqs, vocab_size = logits.shape
    assert logits.stride(1) == 1 and temperatures.shape == (num_seqs,), (logits.stride(), temperatures.shape)
    ids = torch.empty(num_seqs, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_seqs, dtype=torch.float32, device=logits.device)
    if num_seqs == 0:
        return ids, logprobs
    _sample_kernel[(num_seqs,)](
        ids, logprobs, logits, temperatures.float(), logprobs if uniforms is None else uniforms,
        vocab_size, logits.stride(0), seed, BLOCK=min(BLOCK, triton.next_power_of_2(vocab_size)),
        UNIFORMS_FROM_TENSOR=uniforms is not None, num_warps=8,
    )  # fmt: skip
    return ids, logprobs
