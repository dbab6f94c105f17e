"""How a model's dimensions split over `tp` ranks, and the errors for what does not split.

Megatron-style tensor parallelism cuts every weight matrix along one dimension:

- attention: the query heads split evenly; the KV heads split evenly when there are at least as
  many as ranks (`total_kv % tp == 0`), else every group of `tp // total_kv` ranks shares (a copy
  of) one KV head (`tp % total_kv == 0`): rank r keeps exactly the KV head its query heads read;
- the MLP: `intermediate_size` splits evenly (gate and up by rows, down by columns); so does every
  expert's `moe_intermediate_size` in a mixture-of-experts layer (all experts on every rank);
- the vocabulary splits into `ceil(vocab / tp)` rows per rank; the last rank's tail is padding.

Everything here is pure arithmetic on the config, so it is checked on the driver before any
worker process starts.
"""

from __future__ import annotations

from typing import Any


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, or a ValueError naming `what` when it does not divide."""
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator}); "
            f"choose a tensor_parallel_size that divides it"
        )
    return numerator // denominator


def kv_heads_per_rank(total_num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(KV heads each rank holds, how many ranks hold a copy of each of them).

    8 KV heads, tp 4 -> (2, 1): split. 2 KV heads, tp 4 -> (1, 2): each head replicated on 2 ranks.
    """
    if total_num_kv_heads % tp_size == 0:
        return total_num_kv_heads // tp_size, 1
    if tp_size % total_num_kv_heads == 0:
        return 1, tp_size // total_num_kv_heads
    raise ValueError(
        f"num_key_value_heads ({total_num_kv_heads}) and tensor_parallel_size ({tp_size}) must divide "
        "one another: the KV heads are split when there are more heads than ranks and replicated when "
        "there are fewer"
    )


def kv_head_start(tp_rank: int, total_num_kv_heads: int, tp_size: int) -> int:
    """Index of the first KV head rank `tp_rank` holds. With replication, ranks r*R .. r*R+R-1 share
    KV head r (R = tp // total_kv), which is the head their query heads are grouped with."""
    num_kv_heads, replicas = kv_heads_per_rank(total_num_kv_heads, tp_size)
    return (tp_rank // replicas) * num_kv_heads


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int, int]:
    """(first token id, one past the last real token id, rows per rank) of rank `tp_rank`'s shard.

    Every rank holds `ceil(vocab / tp)` rows, so a vocabulary that does not divide is padded rather
    than refused; the padding rows are zero and their logits are cut off after the gather."""
    per_rank = -(-vocab_size // tp_size)
    start = min(tp_rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


def check_tensor_parallel(hf_config: Any, tp_size: int) -> None:
    """ValueError for a model that cannot be split over `tp_size` ranks (heads, KV heads, MLP, experts)."""
    if tp_size == 1:
        return
    num_heads = hf_config.num_attention_heads
    divide(num_heads, tp_size, "num_attention_heads")
    kv_heads_per_rank(getattr(hf_config, "num_key_value_heads", None) or num_heads, tp_size)
    divide(hf_config.intermediate_size, tp_size, "intermediate_size")
    if getattr(hf_config, "num_experts", None):  # every expert is split like a dense MLP
        divide(hf_config.moe_intermediate_size, tp_size, "moe_intermediate_size")


def check_devices(device_type: str, num_ranks_here: int, num_devices: int) -> None:
    """On CUDA every rank of this machine needs a GPU of its own."""
    if device_type == "cuda" and num_ranks_here > num_devices:
        raise ValueError(
            f"{num_ranks_here} tensor-parallel ranks on this machine need {num_ranks_here} CUDA devices, "
            f"but {num_devices} are visible; lower tensor_parallel_size or set CUDA_VISIBLE_DEVICES"
        )
