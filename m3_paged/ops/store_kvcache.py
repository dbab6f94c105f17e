"""Write this step's keys and values into the paged KV cache.

What it computes: for every token t with ``slot = slot_mapping[t] >= 0``,

    k_cache[slot // block_size, slot % block_size] = key[t]
    v_cache[slot // block_size, slot % block_size] = value[t]

A slot is a flat index into the cache's token positions, ``block_id * block_size + offset``; the model
runner computes it from the block table. Slot -1 means "write nowhere": the padding rows of a CUDA
graph batch carry it, so they never touch a real block.

Layouts (vLLM's and flash-attn's):

    key, value        (num_tokens, num_kv_heads, head_dim)       may be strided views of a fused qkv
    k_cache, v_cache  (num_blocks, block_size, num_kv_heads, head_dim)
    slot_mapping      (num_tokens,) int32 or int64

The file reads top-down: the torch reference, the Triton kernel (one program per token), the wrapper.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_kvcache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Pure-torch reference: advanced-indexing assignment, rows with slot -1 dropped first."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    block_ids, offsets = slots // block_size, slots % block_size
    # Indexing the two leading dims (not a flat view) keeps this right for non-contiguous cache views.
    k_cache[block_ids, offsets] = key[keep].to(k_cache.dtype)
    v_cache[block_ids, offsets] = value[keep].to(v_cache.dtype)


@triton.jit
def _store_kvcache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_cache_b,  # the two caches share one layout (checked by the wrapper)
    stride_cache_o,
    stride_cache_h,
    block_size,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # NUM_KV_HEADS and HEAD_DIM rounded up to powers of two for tl.arange
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding row: nothing to write
        return
    block_id = slot // block_size
    offset = slot % block_size

    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    dims = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    # int64 offsets: a single layer's cache can exceed 2**31 elements on a large GPU.
    cache_offsets = block_id * stride_cache_b + offset * stride_cache_o + heads * stride_cache_h + dims

    k = tl.load(key_ptr + token * stride_key_t + heads * stride_key_h + dims, mask=mask)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + token * stride_value_t + heads * stride_value_h + dims, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of `store_kvcache_ref`: writes k_cache / v_cache in place, skips slot -1.

    Any head_dim and num_kv_heads work (the kernel masks the power-of-two padding of its tiles);
    the last dimension of every tensor must be contiguous.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, key.shape)
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert key.stride(-1) == value.stride(-1) == k_cache.stride(-1) == 1, "head_dim must be contiguous"
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
