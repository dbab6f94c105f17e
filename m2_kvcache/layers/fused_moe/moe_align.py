"""The bookkeeping of the grouped matmul: slots sorted by expert, each expert's run padded to whole
blocks of BLOCK_M rows, and the expert of every block (vLLM's `moe_align_block_size`).

Example: top_k = 2, 3 tokens, topk_ids = [[2, 0], [2, 1], [0, 2]] (slots 0..5), 4 experts,
block_size = 2; slots per expert: 0 -> [1, 4], 1 -> [3], 2 -> [0, 2, 5], 3 -> none.

    sorted_token_ids  [1, 4 | 3, 6 | 0, 2, 5, 6 | 6 6 ...]   6 (= num slots) marks a padding row
    expert_ids        [0,     1,     2,  2,       ...]        one entry per block of 2 rows
    num_tokens_post_padded = 8

An expert with no slot (3) gets no block at all: the kernel never loads its weights. Every tensor
here has a size fixed by (num_tokens, top_k, num_experts, block_size) and nothing is read back to
the host, so the whole MoE path can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch


def max_num_tokens_padded(num_slots: int, num_experts: int, block_size: int) -> int:
    """An upper bound on the padded length: each expert wastes at most block_size - 1 rows."""
    return num_slots + num_experts * (block_size - 1)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids (num_tokens, top_k) -> (sorted_token_ids (max_padded,) int32, expert_ids
    (cdiv(max_padded, block_size),) int32, num_tokens_post_padded (1,) int32).

    Rows past num_tokens_post_padded are padding; their blocks' expert ids are clamped to a valid
    expert and the kernel skips them."""
    flat = topk_ids.flatten()  # (num_slots,): the expert of every slot
    num_slots, device = flat.numel(), flat.device
    max_padded = max_num_tokens_padded(num_slots, num_experts, block_size)
    # Not torch.bincount: its output size depends on the values, which costs a device->host sync.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )  # (num_experts,) slots per expert
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = torch.cumsum(padded, 0)  # where each expert's padded run ends
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    sorted_experts = flat[order]
    # A slot's destination: its expert's padded start + its rank among that expert's slots.
    rank = torch.arange(num_slots, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank
    sorted_token_ids = torch.full((max_padded,), num_slots, dtype=torch.int32, device=device)
    sorted_token_ids[dest] = order.to(torch.int32)
    # Block b starts at row b * block_size and belongs to the first expert whose run ends after it
    # (an expert with an empty run ends where the previous one does, so it is never picked).
    block_starts = torch.arange(0, max_padded, block_size, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_token_ids, expert_ids.to(torch.int32), padded_end[-1:].to(torch.int32)
