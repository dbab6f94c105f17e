"""The router of a Qwen3-MoE layer: which experts each token goes to, and with which weights.

    probs = softmax(router_logits)                    over all num_experts, in float32
    topk_weights, topk_ids = top-k of probs           (num_tokens, top_k) each
    topk_weights /= topk_weights.sum(-1)              only when renormalize (config.norm_topk_prob)

Renormalised, a token's k weights sum to 1 (Qwen3-30B-A3B); otherwise they keep their share of the
softmax mass, so a token whose router is unsure gets a smaller MoE output (Qwen1.5/2-MoE style).
Training adds a load-balancing loss on these probabilities; inference ignores it.
"""

from __future__ import annotations

import torch


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (num_tokens, num_experts) -> (topk_weights, topk_ids), each (num_tokens, top_k);
    the weights in the logits' dtype, the ids int64, both in descending order of probability.

    The operations and their order are HF transformers' (softmax in float32, divide in place, cast
    last), so the same logits choose the same experts with the same weights."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # (num_tokens, num_experts)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # (num_tokens, top_k)
    if renormalize:
        topk_weights /= topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(router_logits.dtype), topk_ids
