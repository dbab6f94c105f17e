"""Attention backends and their per-step metadata: the contiguous KV cache of m2 and a no-cache path."""

from m2_kvcache.attention.contiguous import (
    ContiguousCacheBackend,
    ContiguousCacheRefBackend,
    contiguous_attention,
    contiguous_attention_ref,
    write_kv_cache,
)
from m2_kvcache.attention.kv_cache import KVCacheUsage, allocate_kv_cache, attention_layers, kv_cache_usage
from m2_kvcache.attention.metadata import AttentionMetadata
from m2_kvcache.attention.no_cache import NoCacheBackend, prefill_attention

__all__ = [
    "AttentionMetadata",
    "ContiguousCacheBackend",
    "ContiguousCacheRefBackend",
    "KVCacheUsage",
    "NoCacheBackend",
    "allocate_kv_cache",
    "attention_layers",
    "contiguous_attention",
    "contiguous_attention_ref",
    "kv_cache_usage",
    "prefill_attention",
    "write_kv_cache",
]
