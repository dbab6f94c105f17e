"""The experts' computation in pure torch, tokens grouped by expert: the reference of the Triton path
and the CPU implementation.

For each token t with chosen experts topk_ids[t] and weights topk_weights[t]:

    out[t] = sum_k  topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])
    expert_e(x) = W2[e] @ (silu(g) * u),   [g; u] = W13[e] @ x

with W13 = gate_up_proj (num_experts, 2 * intermediate, hidden), rows [gate | up], and
W2 = down_proj (num_experts, hidden, intermediate). A (token, k) pair is a *slot*, numbered
t * top_k + k. Sorting the slots by expert turns the sparse sum into one dense matmul per expert
over exactly the tokens it received; an expert no token chose is skipped and its weights are never
read, which is why a decode step reads only the chosen experts' weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m2_kvcache.layers.activation import SiluAndMul


def sort_slots_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot ids grouped by expert, ascending within an expert (num_tokens * top_k,), tokens per
    expert (num_experts,)). Slot s belongs to token s // top_k."""
    flat = topk_ids.flatten()  # (num_tokens * top_k,): the expert of every slot
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


def fused_experts_ref(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """hidden_states (num_tokens, hidden), w13 (num_experts, 2 * intermediate, hidden),
    w2 (num_experts, hidden, intermediate), topk_weights / topk_ids (num_tokens, top_k)
    -> (num_tokens, hidden) in hidden_states' dtype."""
    top_k = topk_ids.shape[1]
    slots, counts = sort_slots_by_expert(topk_ids, w13.shape[0])
    weights = topk_weights.flatten()  # (num_tokens * top_k,)
    act = SiluAndMul()
    out = torch.zeros_like(hidden_states)  # (num_tokens, hidden)
    # .tolist() syncs with the device: fine for a reference and for the CPU, not for a CUDA graph.
    for expert, expert_slots in enumerate(slots.split(counts.tolist())):
        if expert_slots.numel() == 0:  # nobody chose this expert: skip it, its weights stay unread
            continue
        tokens = expert_slots // top_k
        x = hidden_states[tokens]  # (n, hidden): this expert's tokens, gathered
        y = F.linear(act(F.linear(x, w13[expert])), w2[expert])  # (n, hidden)
        out.index_add_(0, tokens, y * weights[expert_slots, None].to(y.dtype))
    return out
