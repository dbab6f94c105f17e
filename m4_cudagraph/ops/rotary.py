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

`rotary_embedding_and_cache` goes one step further: the same program writes the rotated key and the
value straight into the paged KV cache at the token's slot (m3's `store_kvcache`, slot -1 = nowhere),
instead of back into k, so the attention backend no longer launches a store kernel of its own: one
kernel fewer per layer, and k is read once instead of three times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from m2_kvcache.layers.layernorm import rms_norm
from m2_kvcache.layers.rotary_embedding import apply_rotary
from m3_paged.ops import store_kvcache_ref
from m3_paged.ops.pdl import use_pdl


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


def rotary_embedding_and_cache_ref(
    positions, q, k, v, cos_cache, sin_cache, k_cache, v_cache, slot_mapping, qk_norm=None
) -> torch.Tensor:
    """`rotary_embedding_ref`, then m3's `store_kvcache_ref` of the rotated k and of v; returns the
    rotated q (a new tensor; the caches are written in place)."""
    q, k = rotary_embedding_ref(positions, q, k, cos_cache, sin_cache, qk_norm)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _rotate_heads(
    ptr,
    stride_h,
    num_heads,
    cos,
    sin,
    norm_weight_ptr,
    eps,
    dst_ptr,
    dst_stride_h,
    dst_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """(RMSNorm and) rotate the num_heads head vectors at ptr + h * stride_h; write the first
    dst_heads of them (all, or 0 = none) to dst_ptr + h * dst_stride_h (in place: dst = ptr)."""
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
    dst, dst_mask = dst_ptr + heads * dst_stride_h + dims, (heads < dst_heads) & (dims < HALF)
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=dst_mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=dst_mask)


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
    v_ptr,  # the rest is read only WITH_CACHE: v, the paged caches, each token's slot
    stride_v_t,
    stride_v_h,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    block_size,
    stride_cache_b,  # k_cache and v_cache share one layout (checked by the wrapper)
    stride_cache_o,
    stride_cache_h,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_D: tl.constexpr,  # HALF rounded up to a power of two
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HAS_NORM: tl.constexpr,
    WITH_CACHE: tl.constexpr,
    TRIGGER: tl.constexpr,  # let a PDL-launched successor (attention) start its prologue now
):
    if TRIGGER:
        gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(cos_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)  # (1, BLOCK_D)
    sin = tl.load(sin_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)
    q_row, k_row = q_ptr + token * stride_q_t, k_ptr + token * stride_k_t
    _rotate_heads(
        q_row, stride_q_h, num_q_heads, cos, sin, q_norm_ptr, eps, q_row, stride_q_h, num_q_heads,
        HALF, BLOCK_HQ, BLOCK_D, HAS_NORM,
    )  # fmt: skip
    if WITH_CACHE:  # the rotated key and the value go to the token's cache slot, not back into k
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        row = (slot // block_size) * stride_cache_b + (slot % block_size) * stride_cache_o
        write_heads = tl.where(slot >= 0, num_k_heads, 0)  # slot -1 (graph padding): write nothing
        _rotate_heads(
            k_row, stride_k_h, num_k_heads, cos, sin, k_norm_ptr, eps, k_cache_ptr + row, stride_cache_h,
            write_heads, HALF, BLOCK_HK, BLOCK_D, HAS_NORM,
        )  # fmt: skip
        heads = tl.arange(0, BLOCK_HK)[:, None]
        full = tl.arange(0, 2 * BLOCK_D)[None, :]  # the whole head_dim (2 * HALF)
        mask = (heads < write_heads) & (full < 2 * HALF)
        v = tl.load(v_ptr + token * stride_v_t + heads * stride_v_h + full, mask=mask)
        tl.store(
            v_cache_ptr + row + heads * stride_cache_h + full, v.to(v_cache_ptr.dtype.element_ty), mask=mask
        )
    else:
        _rotate_heads(
            k_row, stride_k_h, num_k_heads, cos, sin, k_norm_ptr, eps, k_row, stride_k_h, num_k_heads,
            HALF, BLOCK_HK, BLOCK_D, HAS_NORM,
        )  # fmt: skip


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
        _launch(positions, q, k, cos_cache, sin_cache, qk_norm, None)
    return q, k


def rotary_embedding_and_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Triton version of `rotary_embedding_and_cache_ref`: q rotated in place (and returned), the
    rotated k and v written to k_cache / v_cache (num_blocks, block_size, num_kv_heads, head_dim) at
    slot_mapping (-1: nowhere); k itself is left as it was."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and v.stride(-1) == 1, (v.shape, k.shape)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and k_cache.stride(-1) == 1, k_cache.shape
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert q.shape[0] == num_tokens and q.shape[2] == head_dim and head_dim % 2 == 0, (q.shape, k.shape)
    assert q.stride(-1) == k.stride(-1) == 1 and positions.shape == (num_tokens,)
    assert cos_cache.shape[1] == head_dim // 2 and cos_cache.is_contiguous() and sin_cache.is_contiguous()
    if num_tokens:
        _launch(positions, q, k, cos_cache, sin_cache, qk_norm, (v, k_cache, v_cache, slot_mapping))
    return q


def _launch(positions, q, k, cos_cache, sin_cache, qk_norm, cache) -> None:
    """One program per token; `cache` = (v, k_cache, v_cache, slot_mapping) or None (k in place)."""
    num_tokens, num_q_heads, head_dim = q.shape
    v, k_cache, v_cache, slot_mapping = cache or (k, k, k, positions)  # placeholders: not read
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_cache, sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), num_q_heads, k.shape[1],
        *(qk_norm or (cos_cache, cos_cache, 0.0)),  # the weights are not read without a norm
        v, v.stride(0), v.stride(1), k_cache, v_cache, slot_mapping,
        k_cache.shape[1] if cache else 1,
        *(k_cache.stride()[:3] if cache else (0, 0, 0)),
        HALF=head_dim // 2, BLOCK_D=triton.next_power_of_2(head_dim // 2),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        HAS_NORM=qk_norm is not None, WITH_CACHE=cache is not None, TRIGGER=use_pdl(q.device),
    )  # fmt: skip
