"""RMSNorm in one kernel, with the residual add fused in.

What it computes (the reference is m2's `rms_norm`, which rounds exactly as HF transformers does):

    without residual:  out = weight * (x / sqrt(mean(x^2) + eps))
    with residual:     s = x + residual (rounded to x's dtype);  out = weight * (s / sqrt(mean(s^2) + eps))

over the last dimension, statistics in float32. Rows may be strided in two levels, (token, head),
so the same kernel normalizes hidden states (num_tokens, hidden) and, for Qwen3, every head of a
(num_tokens, num_heads, head_dim) view into the fused qkv projection without copying it first.

`rms_norm_splitk` takes its input as the float32 partial products of a split-K linear
(`m4_cudagraph/ops/splitk_linear.py`) and sums them on the way in, in slice order, rounding the sum to
the model dtype as the linear's output would have been: the reduction costs no kernel of its own.

One program normalizes BLOCK_R rows at once (a (BLOCK_R, BLOCK_N) tile), so short rows such as
128-wide heads still give each program a few thousand elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from m2_kvcache.layers.layernorm import rms_norm as _m2_rms_norm
from m3_paged.ops.pdl import use_pdl as pdl_on

TILE_ELEMENTS = 4096  # elements one program normalizes at once (rows x padded row width)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """m2's RMSNorm: norm(x), or with `residual`: (norm(x + residual), x + residual)."""
    if residual is None:
        return _m2_rms_norm(x, weight, eps)
    residual = x + residual
    return _m2_rms_norm(residual, weight, eps), residual


def rms_norm_splitk_ref(
    partials: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """`rms_norm_ref` of the summed partials (num_splits, num_tokens, N), in the model dtype: the
    residual's dtype, or the weight's without one."""
    dtype = residual.dtype if residual is not None else weight.dtype
    return rms_norm_ref(partials.sum(0).to(dtype), weight, eps, residual)


@triton.jit(do_not_specialize=["num_rows"])  # one compiled variant for every batch size
def _rms_norm_kernel(
    out_ptr,  # (num_rows, N) contiguous
    residual_out_ptr,  # (num_rows, N) contiguous; the sum x + residual (HAS_RESIDUAL only)
    x_ptr,  # row r = (token r // num_heads, head r % num_heads) at token * stride_t + head * stride_h
    residual_ptr,  # (num_rows, N) contiguous (HAS_RESIDUAL only)
    weight_ptr,  # (N,)
    num_rows,
    num_heads,
    stride_t,
    stride_h,
    eps,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,  # N rounded up to a power of two
    BLOCK_R: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,  # > 0: x is (NUM_PARTIALS, num_rows, N) float32 split-K partials
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the producer first
):
    if USE_PDL:
        gdc_wait()
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)
    dense = rows[:, None] * N + cols[None, :]  # offsets in the contiguous outputs
    if NUM_PARTIALS > 0:
        dtype = out_ptr.dtype.element_ty
        plane = num_rows.to(tl.int64) * N  # elements per partial
        x = tl.load(x_ptr + dense, mask=mask, other=0.0)
        for s in tl.static_range(1, NUM_PARTIALS):  # fixed order: the same bits every replay
            x += tl.load(x_ptr + s * plane + dense, mask=mask, other=0.0)
        x = x.to(dtype)  # the linear's output, rounded as cuBLAS would have written it
    else:
        x_offsets = (rows // num_heads * stride_t + rows % num_heads * stride_h)[:, None] + cols[None, :]
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0)
        dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        # Round the sum to the model dtype before normalizing, as the separate torch add would.
        x = (x + tl.load(residual_ptr + dense, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + dense, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # (BLOCK_R,)
    w = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    # HF casts the normalized value back to the input dtype before the weight multiplies it.
    y = (x * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
    tl.store(out_ptr + dense, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_ref`. x: (num_tokens, N) or (num_tokens, num_heads, N) with a
    contiguous last dimension; residual (with the same shape, contiguous) only for 2-D x.
    Returns new contiguous tensors; x and residual are not modified."""
    assert x.stride(-1) == 1 and weight.shape == (x.shape[-1],), (x.stride(), weight.shape)
    assert x.dim() in (2, 3) and (residual is None or x.dim() == 2)
    num_tokens, n = x.shape[0], x.shape[-1]
    num_heads = x.shape[1] if x.dim() == 3 else 1
    stride_h = x.stride(1) if x.dim() == 3 else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = out
    if residual is not None:
        assert residual.shape == x.shape and residual.is_contiguous(), (residual.shape, x.shape)
        residual_out = torch.empty_like(out)
    num_rows = num_tokens * num_heads
    if num_rows:
        block_n = triton.next_power_of_2(n)
        block_r = min(max(1, TILE_ELEMENTS // block_n), triton.next_power_of_2(num_rows))
        _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
            out, residual_out, x, residual if residual is not None else out, weight,
            num_rows, num_heads, x.stride(0), stride_h, eps,
            N=n, BLOCK_N=block_n, BLOCK_R=block_r, HAS_RESIDUAL=residual is not None, NUM_PARTIALS=0,
            USE_PDL=False,
        )  # fmt: skip
    return out if residual is None else (out, residual_out)


def rms_norm_splitk(
    partials: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_splitk_ref`. partials: (num_splits, num_tokens, N) float32,
    contiguous (`splitk_linear`'s output); residual (num_tokens, N) contiguous in the model dtype.
    On Hopper GPUs it is launched with programmatic dependent launch (see splitk_linear.py): its programs
    may start while the split-K kernel runs and wait for it before reading anything."""
    num_splits, num_tokens, n = partials.shape
    use_pdl = pdl_on(partials.device)
    assert partials.dtype == torch.float32 and partials.is_contiguous() and weight.shape == (n,)
    dtype = residual.dtype if residual is not None else weight.dtype
    out = torch.empty(num_tokens, n, dtype=dtype, device=partials.device)
    residual_out = out
    if residual is not None:
        assert residual.shape == out.shape and residual.is_contiguous(), (residual.shape, out.shape)
        residual_out = torch.empty_like(out)
    if num_tokens:
        block_n = triton.next_power_of_2(n)
        block_r = min(max(1, TILE_ELEMENTS // block_n), triton.next_power_of_2(num_tokens))
        _rms_norm_kernel[(triton.cdiv(num_tokens, block_r),)](
            out, residual_out, partials, residual if residual is not None else out, weight,
            num_tokens, 1, n, 0, eps,
            N=n, BLOCK_N=block_n, BLOCK_R=block_r, HAS_RESIDUAL=residual is not None, NUM_PARTIALS=num_splits,
            USE_PDL=use_pdl, **({"launch_pdl": True} if use_pdl else {}),
        )  # fmt: skip
    return out if residual is None else (out, residual_out)
