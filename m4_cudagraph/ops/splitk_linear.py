"""Split-K linear for small batches: y = x W^T as float32 partial products that the next kernel sums.

What it computes (`splitk_linear_ref`): K (the input features) is cut into contiguous slices of
k_per_split features (the last may be shorter), and slice s gives

    partials[s] = x[:, K_s] @ W[:, K_s]^T          (num_splits, num_tokens, N), float32

so that sum_s partials[s] = x @ W^T. Nothing here sums them: the consumer does, for free.

Why. A decode step's GEMMs have few rows (one per sequence). The attention output projection and
the MLP's down projection of Qwen3-0.6B have N = 1,024 outputs: with the usual tiling that is a few
dozen output tiles for 132 SMs, each walking all of K in a long dependent loop, and cuBLAS streams
their weights at 0.6-0.8 TB/s (H100; docs/benchmarks.md). Splitting K gives every SM work, but the
slices must then be added up; a separate reduction kernel (or cuBLAS's own) costs about what
splitting saved. Both projections feed straight into the residual add + RMSNorm of the decoder
(`m4_cudagraph/ops/rms_norm.py::rms_norm_splitk`), which reads its input once anyway: reading
num_splits float32 rows instead is a few hundred extra kilobytes at decode batch sizes.

One program = one (BLOCK_M x BLOCK_N) output tile x one K slice of BLOCK_K features: a single
tl.dot, no K loop. The weight is read exactly once over the grid (per row block of x; at <= 64 rows,
once).

Overlap with the previous kernel (programmatic dependent launch, PDL, on CUDA): the weight tile does
not depend on anything the step computes, so each program loads it first and only then waits
(`gdc_wait`) for the previous kernel's output x. Launched with `launch_pdl=True`, the programs start
as soon as every program of the previous kernel has started and called `gdc_launch_dependents` (the
SiLU-and-mul and the attention's split merge do so first thing), so the weight read overlaps the
previous kernel and the launch gap. The norm that sums the partials is launched the same way.
Measured in place on an H100 (Qwen3-0.6B shape, decode graph, 1,024-token contexts, together with
PDL for the attention kernels): batch 1 1.24 -> 1.08 ms, 8 1.59 -> 1.48, 16 1.97 -> 1.85, 32
2.73 -> 2.70; from 48 rows on this kernel lost to cuBLAS (hence SPLITK_MAX_TOKENS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from m3_paged.ops.pdl import use_pdl as pdl_on

SPLITK_MAX_TOKENS = 32  # larger batches go to cuBLAS: from 48 rows on it was slower in place (H100)
MAX_BLOCK_K = 256  # K features per program (and so per partial): Qwen3-0.6B's o_proj 8, down_proj 12


def splitk_linear_ref(x: torch.Tensor, weight: torch.Tensor, k_per_split: int) -> torch.Tensor:
    """(num_tokens, K) x (N, K) -> (ceil(K / k_per_split), num_tokens, N) float32 partial products."""
    k = x.shape[1]
    slices = [slice(lo, min(lo + k_per_split, k)) for lo in range(0, k, k_per_split)]
    return torch.stack([x[:, ks].double() @ weight[:, ks].double().t() for ks in slices]).float()


@triton.jit(do_not_specialize=["num_tokens"])  # one compiled variant for every batch size
def _splitk_linear_kernel(
    partials_ptr,  # (cdiv(K, BLOCK_K), num_tokens, N) float32, contiguous
    x_ptr,  # (num_tokens, K), rows strided by stride_x
    w_ptr,  # (N, K) contiguous
    num_tokens,
    stride_x,
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # the K slice of this program: one partial
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    if USE_PDL:
        gdc_launch_dependents()  # the norm that sums our partials may launch now (it waits for us)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    ks = split * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,) input features of this slice
    col_mask, k_mask = cols < N, ks < K
    # The weights are not written by the step: read them before waiting for the previous kernel.
    w_mask = col_mask[:, None] & k_mask[None, :]  # masked lanes must be 0: they enter the dot
    w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=w_mask, other=0.0)  # (BLOCK_N, BLOCK_K)
    if USE_PDL:
        gdc_wait()  # x is the previous kernel's output
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) tokens
    row_mask = rows < num_tokens
    x_mask = row_mask[:, None] & k_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=x_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
    acc = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    offsets = (split * num_tokens + rows[:, None]) * N + cols[None, :]
    tl.store(partials_ptr + offsets, acc, mask=row_mask[:, None] & col_mask[None, :])


def splitk_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    block_k: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    num_warps: int = 4,
    use_pdl: bool | None = None,
) -> torch.Tensor:
    """Triton version of `splitk_linear_ref` with k_per_split = block_k: (num_tokens, K) x (N, K) ->
    (cdiv(K, block_k), num_tokens, N) float32. block_k (a power of two; default: K rounded up to one,
    at most MAX_BLOCK_K) sets the number of partials; block_m defaults to the batch rounded up to
    16 / 32 / 64 rows, block_n to 64 columns up to 16 rows and 32 above (an H100 decode step of 16 rows
    took 1.875 ms with 64 columns, 1.947 with 32; at 32 rows 32 columns were best). use_pdl (default:
    `m3_paged/ops/pdl.py::use_pdl`, i.e. on Hopper GPUs) launches with programmatic dependent launch."""
    num_tokens, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.is_contiguous() and x.stride(1) == 1, (x.shape, weight.shape)
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    block_k = block_k or min(MAX_BLOCK_K, max(16, triton.next_power_of_2(k)))
    block_m = block_m or (16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 64)
    block_n = block_n or (64 if num_tokens <= 16 else 32)
    use_pdl = pdl_on(x.device) if use_pdl is None else use_pdl
    num_splits = triton.cdiv(k, block_k)
    partials = torch.empty(num_splits, num_tokens, n, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return partials
    grid = (triton.cdiv(n, block_n), num_splits, triton.cdiv(num_tokens, block_m))
    _splitk_linear_kernel[grid](
        partials, x, weight, num_tokens, x.stride(0),
        N=n, K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_PDL=use_pdl,
        num_warps=num_warps, **({"launch_pdl": True} if use_pdl else {}),
    )  # fmt: skip
    return partials
