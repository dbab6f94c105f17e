"""Rotary position embedding (rotate-half / NeoX layout) applied to q and k in place, in one kernel,
optionally after Qwen3's per-head RMSNorm of q and k.

What it computes (reference: m2's `RotaryEmbedding.forward`): for every token t at position
p = positions[t] and every head vector x of q[t] and k[t], split into halves x1, x2:

    x <- [x1 * cos[p] - x2 * sin[p],  x2 * cos[p] + x1 * sin[p]]

with cos/sin the float32 tables (max_position, head_dim // 2) that m2's RotaryEmbedding holds. In
torch this is ~20 kernels (two table lookups, casts, four products, two sums, a concatenation, for
q and again for k). Here one program per token reads its cos/sin row once and rotates all of its q
and k heads. It writes in place (q and k are views into the fused qkv projection or fresh norm
outputs, which nothing else reads), like vLLM's rotary_embedding op. The arithmetic is float32 with
one rounding at the end, where the torch reference rounds after every operation in bfloat16: the
two agree to bfloat16 rounding.

With norm weights (Qwen3), each head is first normalized, x <- w * x / sqrt(mean(x^2) + eps), in
the same program: the q/k norms and RoPE become one kernel instead of three, which saves two
launches per layer in every decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from m2_kvcache.layers.layernorm import rms_norm
from m2_kvcache.layers.rotary_embedding import apply_rotary


def rotary_embedding_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """m2's RoPE (returns new tensors): cos/sin rows gathered and cast to q's dtype, rotate-half;
    qk_norm = (q_weight, k_weight, eps) normalizes every head first, as m2's RMSNorm does."""
    if qk_norm is not None:
        q_weight, k_weight, eps = qk_norm
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)  # (num_tokens, 1, head_dim // 2)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


@triton.jit
def _rotate_heads(
    ptr,
    stride_h,
    num_heads,
    cos,
    sin,
    norm_weight_ptr,
    eps,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """(RMSNorm and) rotate the num_heads head vectors at ptr + h * stride_h in place."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    first = ptr + heads * stride_h + dims  # (BLOCK_H, BLOCK_D): x1; x2 lives HALF elements further
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:  # m2's RMSNorm per head: float32 statistics, cast back before the weight multiplies
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(norm_weight_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(norm_weight_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,  # (max_position, HALF) float32
    sin_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    num_q_heads,
    num_k_heads,
    q_norm_ptr,  # (head_dim,) weights of the per-head norms (HAS_NORM only)
    k_norm_ptr,
    eps,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_D: tl.constexpr,  # HALF rounded up to a power of two
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(cos_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)  # (1, BLOCK_D)
    sin = tl.load(sin_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)
    q_row, k_row = q_ptr + token * stride_q_t, k_ptr + token * stride_k_t
    _rotate_heads(
        q_row, stride_q_h, num_q_heads, cos, sin, q_norm_ptr, eps, HALF, BLOCK_HQ, BLOCK_D, HAS_NORM
    )
    _rotate_heads(
        k_row, stride_k_h, num_k_heads, cos, sin, k_norm_ptr, eps, HALF, BLOCK_HK, BLOCK_D, HAS_NORM
    )


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rotary_embedding_ref`, in place: q (num_tokens, num_heads, head_dim) and
    k (num_tokens, num_kv_heads, head_dim), last dimension contiguous; returns (q, k)."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0, (q.shape, k.shape)
    assert q.stride(-1) == k.stride(-1) == 1 and positions.shape == (num_tokens,)
    half = head_dim // 2
    assert cos_cache.shape[1] == half and cos_cache.is_contiguous() and sin_cache.is_contiguous()
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_cache, sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), num_q_heads, k.shape[1],
            *(qk_norm or (cos_cache, cos_cache, 0.0)),  # the weights are not read without a norm
            HALF=half, BLOCK_D=triton.next_power_of_2(half),
            BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            HAS_NORM=qk_norm is not None,
        )  # fmt: skip
    return q, k
