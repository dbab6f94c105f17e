"""Attention backends over the paged cache. Each layer's cache is k_cache, v_cache:
(num_blocks, block_size, num_kv_heads, head_dim), the layout of vLLM and flash-attn.

- `TorchPagedBackend`: the CPU path. Gathers each sequence's blocks into a contiguous
  (num_seqs, max_seqlen_k) view and reuses m2's masked attention on it: simple, and its own
  reference (m2's is tested against an explicit softmax).
- `TritonPagedBackend`: the project's Triton kernels (store_kvcache + paged_attention with split-K).
- `FlashAttnBackend`: flash-attn's varlen kernel with a block table, when flash-attn is installed
  (it needs block_size % 256 == 0).
`get_attn_backend` picks one ("auto") or honours the `attention_backend` option.
"""

from __future__ import annotations

import importlib.util

import torch

from m2_kvcache.attention.contiguous import contiguous_attention
from m3_paged.attention.metadata import PagedAttentionMetadata


def paged_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: PagedAttentionMetadata, scale: float
) -> torch.Tensor:
    """q (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim), reading K/V through
    the block tables. Blocks past a sequence's length (or padding entries) are gathered but masked."""
    num_blocks = -(-md.max_seqlen_k // md.block_size)
    tables = md.block_tables[:, :num_blocks].long()  # (num_seqs, num_blocks)
    keys = k_cache[tables].flatten(1, 2)  # (num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    values = v_cache[tables].flatten(1, 2)
    return contiguous_attention(q, keys, values, md, scale)  # md.slot_ids == arange(num_seqs)


def _write_kv(k, v, layer, md: PagedAttentionMetadata) -> None:
    # (num_tokens, num_kv_heads, head_dim) into cache slots; -1 means "write nowhere" (graph padding)
    valid = md.slot_mapping >= 0
    flat_k = layer.k_cache.view(-1, *layer.k_cache.shape[2:])  # (num_blocks * block_size, kv_heads, head_dim)
    flat_v = layer.v_cache.view(-1, *layer.v_cache.shape[2:])
    flat_k[md.slot_mapping[valid]] = k[valid]
    flat_v[md.slot_mapping[valid]] = v[valid]


class TorchPagedBackend:
    name = "torch"

    def forward(self, layer, q, k, v, attn_metadata: PagedAttentionMetadata) -> torch.Tensor:
        _write_kv(k, v, layer, attn_metadata)
        out = paged_attention_torch(q, layer.k_cache, layer.v_cache, attn_metadata, layer.scale)
        return out.reshape(q.shape[0], -1)  # (num_tokens, num_heads * head_dim)


class TritonPagedBackend:
    name = "triton"

    def forward(self, layer, q, k, v, attn_metadata: PagedAttentionMetadata) -> torch.Tensor:
        from m3_paged.ops import store_kvcache

        store_kvcache(k, v, layer.k_cache, layer.v_cache, attn_metadata.slot_mapping)
        return self.attend(layer, q, attn_metadata)

    def attend(self, layer, q, attn_metadata: PagedAttentionMetadata) -> torch.Tensor:
        """The attention alone, over a cache that already holds this step's K/V (m4 writes them in
        its RoPE kernel)."""
        from m3_paged.ops import paged_attention

        md = attn_metadata
        out = paged_attention(
            q, layer.k_cache, layer.v_cache, md.cu_seqlens_q, md.seq_lens, md.block_tables, layer.scale,
            max_seqlen_k=md.max_seqlen_k, num_splits=md.num_splits, seq_order=md.seq_order,
        )  # fmt: skip
        return out.reshape(q.shape[0], -1)


class FlashAttnBackend:
    """flash-attn 2's varlen kernel reads the paged cache through `block_table` directly."""

    name = "flash_attn"

    def forward(self, layer, q, k, v, attn_metadata: PagedAttentionMetadata) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        from m3_paged.ops import store_kvcache

        md = attn_metadata
        store_kvcache(k, v, layer.k_cache, layer.v_cache, md.slot_mapping)
        cu_seqlens_k = torch.nn.functional.pad(md.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        out = flash_attn_varlen_func(
            q, layer.k_cache, layer.v_cache, cu_seqlens_q=md.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=md.max_seqlen_q, max_seqlen_k=md.max_seqlen_k, softmax_scale=layer.scale,
            causal=True, block_table=md.block_tables,
        )  # fmt: skip
        return out.reshape(q.shape[0], -1)


_BACKENDS = {"torch": TorchPagedBackend, "triton": TritonPagedBackend, "flash_attn": FlashAttnBackend}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def get_attn_backend(name: str, device: torch.device, block_size: int):
    """ "auto": flash-attn on CUDA when installed and block_size % 256 == 0, else Triton on CUDA,
    else the torch path. A forced choice that cannot run is a clear error."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif flash_attn_available() and block_size % 256 == 0:
            name = "flash_attn"
        else:
            name = "triton"
    if name == "flash_attn":
        if not flash_attn_available():
            raise ValueError(
                "attention_backend='flash_attn' needs the flash-attn package (pip install '.[flash]')"
            )
        if block_size % 256:
            raise ValueError(f"flash-attn's paged kernel needs block_size % 256 == 0, got {block_size}")
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend must be one of {['auto', *_BACKENDS]}, got {name!r}")
    return _BACKENDS[name]()
