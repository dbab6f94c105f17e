"""The experts of an MoE layer as two grouped matmuls (vLLM's `fused_experts`).

What it computes: exactly `fused_experts_ref` (moe_ref.py, the reference):

    out[t] = sum_k topk_weights[t, k] * W2[e] @ (silu(g) * u),  [g; u] = W13[e] @ x[t],  e = topk_ids[t, k]

How: `moe_align_block_size` sorts the num_tokens * top_k slots by expert and pads each expert's run
to whole blocks of BLOCK_M rows, so that every block of rows belongs to one expert. Then

    1. one launch of `fused_moe_kernel`:  cache1[slot] = W13[expert] @ x[slot // top_k]     (slot, 2I)
    2. silu-and-mul:                      cache2 = silu(cache1[:, :I]) * cache1[:, I:]     (slot, I)
    3. one launch of `fused_moe_kernel`:  cache3[slot] = topk_weight[slot] * W2[expert] @ cache2[slot]
    4. the weighted combine:              out[t] = sum_k cache3[t, k]                      (t, hidden)

Each program of the kernel computes one (BLOCK_M rows, BLOCK_N columns) tile of one expert's output:
it reads its block's expert id, gathers its rows of A through sorted_token_ids (a padding row reads
zeros and writes nothing) and multiplies by that expert's weight tile, BLOCK_K at a time. An expert
with no tokens owns no block, so its weights are never read: decode reads about top_k / num_experts
of the expert weights. The grid covers the padded upper bound; blocks past num_tokens_post_padded
return at once, so no size is read back to the host.

Left out for clarity (vLLM has them): grouped ordering of the programs for L2 reuse, tuned block
sizes per GPU and shape, fp8/int8 weights, and expert parallelism (expert id -1 = not on this GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from m2_kvcache.layers.activation import SiluAndMul
from m2_kvcache.layers.fused_moe.moe_align import moe_align_block_size
from m2_kvcache.layers.fused_moe.moe_ref import fused_experts_ref

__all__ = ["fused_experts", "fused_experts_ref", "fused_moe_kernel", "get_config", "invoke_fused_moe_kernel"]


@triton.jit
def fused_moe_kernel(
    a_ptr,  # (num_rows, K): the hidden states (one row per token) or cache2 (one row per slot)
    b_ptr,  # (num_experts, N, K): stacked expert weights
    c_ptr,  # (num_slots, N): one output row per slot
    topk_weights_ptr,  # (num_slots,)
    sorted_token_ids_ptr,  # (max_padded,) slot ids grouped by expert; num_slots marks padding
    expert_ids_ptr,  # (num_blocks,) the expert of each block of BLOCK_M rows
    num_tokens_post_padded_ptr,  # (1,)
    N,
    K,
    num_slots,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    TOP_K: tl.constexpr,  # slots per row of A: top_k when A holds one row per token, 1 per slot
    MUL_ROUTED_WEIGHT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" keeps float32 exact; "tf32" would round its inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):  # past the last expert's run
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)  # (BLOCK_M,)
    row_mask = slots < num_slots  # padding rows: load zeros, store nothing
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + (slots // TOP_K)[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # (K, N)
    # Builtins only (tl.full, not tl.zeros; no tl.cdiv): those helpers are @triton.jit functions of
    # triton.language, which the interpreter cannot call if triton was imported before TRITON_INTERPRET
    # was set (transformers may import it first), whatever the order of imports in a test session.
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_ROUTED_WEIGHT:  # scale in float32, before the cast
        weights = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0)
        acc = acc * weights.to(tl.float32)[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n[None, :] < N))


def get_config(num_slots: int, num_experts: int) -> dict[str, int]:
    """Block sizes: BLOCK_M near the average rows per expert (decode: a few; prefill: many), since
    each expert's run is padded to whole blocks; at least 16, the smallest tl.dot tile."""
    avg_rows = num_slots / num_experts
    block_m = 16 if avg_rows <= 16 else 32 if avg_rows <= 32 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 32}


def invoke_fused_moe_kernel(
    a: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    topk_weights: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    top_k: int,
    mul_routed_weight: bool,
    config: dict[str, int],
) -> None:
    """c[slot] = (topk_weights[slot] *) w[expert of slot] @ a[slot // top_k] for every slot; one launch.
    a (num_rows, K), w (num_experts, N, K), c (num_slots, N), topk_weights (num_slots,)."""
    num_experts, n, k = w.shape
    grid = (triton.cdiv(sorted_token_ids.numel(), config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    fused_moe_kernel[grid](
        a,
        w,
        c,
        topk_weights,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_padded,
        n,
        k,
        c.shape[0],
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        c.stride(0),
        c.stride(1),
        TOP_K=top_k,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # tf32 is ignored below fp32
        **config,
    )


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """The same contract as `fused_experts_ref`: hidden_states (num_tokens, hidden), w13
    (num_experts, 2 * intermediate, hidden), w2 (num_experts, hidden, intermediate), topk_weights /
    topk_ids (num_tokens, top_k) -> (num_tokens, hidden). `config` overrides the block sizes."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    num_slots = num_tokens * top_k
    config = config or get_config(num_slots, num_experts)
    sorted_token_ids, expert_ids, num_post_padded = moe_align_block_size(
        topk_ids, config["BLOCK_M"], num_experts
    )
    align = (sorted_token_ids, expert_ids, num_post_padded)
    weights = topk_weights.flatten()  # (num_slots,)
    cache1 = hidden_states.new_empty(num_slots, two_i)  # (num_slots, 2 * intermediate)
    invoke_fused_moe_kernel(hidden_states, w13, cache1, weights, *align, top_k, False, config)
    cache2 = SiluAndMul()(cache1)  # (num_slots, intermediate)
    cache3 = hidden_states.new_empty(num_tokens, top_k, hidden)
    invoke_fused_moe_kernel(cache2, w2, cache3.view(num_slots, hidden), weights, *align, 1, True, config)
    return cache3.sum(dim=1)  # (num_tokens, hidden): the weighted combine
