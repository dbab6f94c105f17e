"""Paged attention: the per-step metadata (block tables, slot mapping) and the backends."""

from m3_paged.attention.backends import (
    FlashAttnBackend,
    TorchPagedBackend,
    TritonPagedBackend,
    get_attn_backend,
    paged_attention_torch,
)
from m3_paged.attention.metadata import PagedAttentionMetadata

__all__ = [
    "FlashAttnBackend",
    "PagedAttentionMetadata",
    "TorchPagedBackend",
    "TritonPagedBackend",
    "get_attn_backend",
    "paged_attention_torch",
]
