"""Allocating the contiguous KV cache, and how much of it actually holds tokens."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from m2_kvcache.layers.attention import Attention


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's Attention layers, in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_idx)


def allocate_kv_cache(
    model: nn.Module,
    num_slots: int,
    max_model_len: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One zeroed tensor (2, num_layers, num_slots, max_model_len, num_kv_heads, head_dim), and each
    Attention layer's k_cache / v_cache set to its view (num_slots, max_model_len, num_kv_heads, head_dim).

    dtype/device default to the model's parameters. Zeros, not empty: masked cache positions still
    enter the attention matmul, and uninitialized memory could hold NaN (see contiguous_attention)."""
    layers = attention_layers(model)
    param = next(model.parameters())
    kv = torch.zeros(
        2, len(layers), num_slots, max_model_len, layers[0].num_kv_heads, layers[0].head_dim,
        dtype=dtype or param.dtype, device=device or param.device,
    )  # fmt: skip
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = kv[0, i], kv[1, i]
    return kv


@dataclass(frozen=True)
class KVCacheUsage:
    """Bytes the cache reserves versus bytes holding a live sequence's tokens."""

    reserved_bytes: int
    used_bytes: int

    @property
    def wasted_bytes(self) -> int:
        return self.reserved_bytes - self.used_bytes

    @property
    def used_fraction(self) -> float:
        return self.used_bytes / self.reserved_bytes if self.reserved_bytes else 0.0


def kv_cache_usage(
    seq_lens: Iterable[int], num_slots: int, max_model_len: int, bytes_per_token: int
) -> KVCacheUsage:
    """seq_lens: the cached length of every occupied slot. Reserved = num_slots * max_model_len tokens.

    bytes_per_token = 2 (K and V) * num_layers * num_kv_heads * head_dim * element size, e.g.
    `ModelConfig.kv_cache_bytes_per_token()`."""
    seq_lens = list(seq_lens)
    if len(seq_lens) > num_slots or any(not 0 <= n <= max_model_len for n in seq_lens):
        raise ValueError(
            f"{len(seq_lens)} lengths {seq_lens} do not fit {num_slots} slots of {max_model_len}"
        )
    return KVCacheUsage(num_slots * max_model_len * bytes_per_token, sum(seq_lens) * bytes_per_token)
