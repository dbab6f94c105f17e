"""Mixture of experts: the router, the experts' layer with stacked weights, the torch reference
(tokens grouped by expert) and, in `ops/`, the fused Triton path used on CUDA.

    router_logits = gate(x)                               (num_tokens, num_experts)
    topk_weights, topk_ids = select_experts(...)          softmax -> top-k -> (renormalise)
    out = fused_experts(x, W13, W2, topk_weights, topk_ids)

Only this package's torch parts are imported here; `ops` (Triton) is imported on first use on CUDA.
"""

from m2_kvcache.layers.fused_moe.layer import FusedMoE, fused_experts_for, make_expert_params_mapping
from m2_kvcache.layers.fused_moe.moe_align import max_num_tokens_padded, moe_align_block_size
from m2_kvcache.layers.fused_moe.moe_ref import fused_experts_ref, sort_slots_by_expert
from m2_kvcache.layers.fused_moe.router import select_experts

__all__ = [
    "FusedMoE",
    "fused_experts_for",
    "fused_experts_ref",
    "make_expert_params_mapping",
    "max_num_tokens_padded",
    "moe_align_block_size",
    "select_experts",
    "sort_slots_by_expert",
]
