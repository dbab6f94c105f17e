"""m3's model runner: m2's runner with a paged KV cache.

The cache is a pool of `num_blocks` blocks per layer, sized from the memory left after a profiling
run (CUDA) or a byte budget (CPU). Inputs are prepared from each sequence's block table: the slot
mapping says where each new token's K/V goes; the block tables say where each sequence's history is.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from m0_config.config import EngineConfig
from m0_config.logger import init_logger
from m1_sampling.sampling_metadata import host_to_device, to_device
from m2_kvcache.attention.kv_cache import KVCacheUsage, attention_layers
from m2_kvcache.attention.metadata import AttentionMetadata
from m2_kvcache.attention.no_cache import NoCacheBackend
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.model_loader import load_model
from m2_kvcache.model_runner import ModelRunner as SlotModelRunner
from m3_paged.attention.backends import get_attn_backend
from m3_paged.attention.metadata import PagedAttentionMetadata, longest_first
from m3_paged.kv_cache_sizing import block_bytes, cpu_budget, cuda_budget, num_blocks_for
from m3_paged.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from m0_config.sequence import Sequence

logger = init_logger(__name__)


@dataclass
class HostPagedInputs:
    """One step's inputs in host memory, as `PagedAttentionMetadata.build_paged` (the reference) would
    lay them out; numpy, so that each field is a handful of vectorised ops over all tokens."""

    input_ids: np.ndarray  # (num_tokens,) int64
    token_seq_ids: np.ndarray  # (num_tokens,) int64
    positions: np.ndarray  # (num_tokens,) int64
    slot_mapping: np.ndarray  # (num_tokens,) int64
    cu_seqlens_q: np.ndarray  # (num_seqs + 1,) int32
    seq_lens: np.ndarray  # (num_seqs,) int32
    block_tables: np.ndarray  # (num_seqs, max_num_blocks) int32, padded with 0

    @classmethod
    def build(cls, seqs: list[Sequence], query_lens: list[int], block_size: int) -> HostPagedInputs:
        """Sequence b computes its tokens num_computed_tokens ... + query_lens[b] - 1. One Python pass
        over the sequences gathers token ids and block tables; everything per token is numpy."""
        input_ids, starts, table_lens = [], [], []
        for seq, n in zip(seqs, query_lens):
            start = seq.data.num_computed_tokens
            input_ids.extend(seq.get_token_ids()[start : start + n])
            starts.append(start)
            table_lens.append(len(seq.block_table))
        q, first = np.array(query_lens, dtype=np.int64), np.array(starts, dtype=np.int64)  # (num_seqs,)
        if len(q) == 0 or q.min() < 1:
            raise ValueError(f"need at least one sequence and 1 <= query_len, got {query_lens}")
        cu = np.zeros(len(q) + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:])
        token_seq_ids = np.repeat(np.arange(len(q), dtype=np.int64), q)  # (num_tokens,)
        # a token's position: its sequence's first new position + its row - the sequence's first row
        positions = np.repeat(first - cu[:-1], q) + np.arange(cu[-1])
        lens = np.array(table_lens)
        tables = np.zeros((len(q), lens.max()), dtype=np.int32)
        flat = np.fromiter(chain.from_iterable(s.block_table for s in seqs), np.int32, int(lens.sum()))
        tables[np.arange(tables.shape[1]) < lens[:, None]] = flat  # row b's first lens[b] entries
        slot_mapping = (
            tables[token_seq_ids, positions // block_size] * np.int64(block_size) + positions % block_size
        )
        return cls(
            input_ids=np.array(input_ids, dtype=np.int64),
            token_seq_ids=token_seq_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            cu_seqlens_q=cu.astype(np.int32),
            seq_lens=(first + q).astype(np.int32),
            block_tables=tables,
        )


class ModelRunner(SlotModelRunner):
    def __init__(self, config: EngineConfig):
        self.block_size = config.cache_config.block_size
        self.attn_backend = self.make_attn_backend(config)
        super().__init__(config)  # loads the model, then allocate_kv_cache()
        if self.device.type == "cuda":
            self.warm_up()

    def load_model(self) -> torch.nn.Module:
        return load_model(
            self.config.model_config, attn_backend=self.attn_backend, layers=self.model_layers()
        )

    def make_attn_backend(self, config: EngineConfig):
        """The backend every attention layer uses ("auto" or the `attention_backend` option).
        Extension point: m4 fuses RoPE with the Triton backend's cache write."""
        return get_attn_backend(
            config.model_config.attention_backend, config.model_config.device, self.block_size
        )

    def model_layers(self) -> ModelLayers:
        """The layer classes the model is built from. Extension point: m4 swaps in fused kernels,
        m5 tensor-parallel linears."""
        return ModelLayers()

    # ---- KV-cache sizing -----------------------------------------------------------------------
    def allocate_kv_cache(self) -> torch.Tensor:
        self.num_blocks = self.determine_num_blocks()
        mc = self.config.model_config
        layers = self._attention_layers()
        kv = torch.zeros(
            2, len(layers), self.num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim,
            dtype=mc.torch_dtype, device=self.device,
        )  # fmt: skip
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = kv[0, i], kv[1, i]  # (num_blocks, block_size, kv_heads, head_dim)
        tokens = self.num_blocks * self.block_size
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s backend); maximum concurrency for "
            "%d-token requests: %.2fx",
            self.num_blocks, self.block_size, tokens, self.num_blocks * self.block_bytes() / 2**30,
            self.attn_backend.name, mc.max_model_len, tokens / mc.max_model_len,
        )  # fmt: skip
        return kv

    def determine_num_blocks(self) -> int:
        """Blocks that fit the budget: what a profiling run leaves on CUDA, a byte budget on a CPU.
        Extension point: m5's ranks agree on the minimum."""
        if self.device.type == "cuda":
            self.profile_run()
            budget = cuda_budget(self.config, self.device)
        else:
            budget = cpu_budget(self.config)
        return num_blocks_for(self.config, budget, self.block_bytes())

    def block_bytes(self) -> int:
        """Bytes of one KV block on this device. Extension point: under m5 a rank holds only its
        share of the KV heads."""
        return block_bytes(self.config)

    def _attention_layers(self):
        return attention_layers(self.model)

    @torch.inference_mode()
    def profile_run(self) -> None:
        """A forward pass of the largest batch (max_num_batched_tokens tokens, sequences of at most
        max_model_len) without a cache, so the peak memory of activations is known before the cache
        takes the rest. The layers use m2's no-cache backend for this one pass."""
        sc = self.config.scheduler_config
        total, seq_len = sc.max_num_batched_tokens, min(sc.max_model_len, sc.max_num_batched_tokens)
        lens = [seq_len] * (total // seq_len) + ([total % seq_len] if total % seq_len else [])
        lens = lens[: sc.max_num_seqs]
        md = AttentionMetadata.build(lens, lens, device=self.device)
        input_ids = torch.zeros(md.num_tokens, dtype=torch.long, device=self.device)
        layers = self._attention_layers()
        no_cache = NoCacheBackend()
        for layer in layers:
            layer.backend = no_cache
        try:
            torch.cuda.reset_peak_memory_stats(self.device)
            hidden = self.model(input_ids, md.positions, md)
            # The worst step samples one row per sequence: (rows, vocab) logits and their float32 copy
            # (m2's execute_model) belong to the peak, 233 MB for 256 rows of Qwen3's vocabulary.
            self.model.compute_logits(hidden[-self._max_logits_rows(md.num_tokens) :]).float()
            torch.cuda.synchronize(self.device)
            del hidden
            # Hand the activations' memory back to the driver: otherwise it counts once as "used"
            # (reserved by PyTorch's caching allocator) and once more as this process's peak.
            torch.cuda.empty_cache()
        finally:
            for layer in layers:
                layer.backend = self.attn_backend

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One eager step of dummy tokens through the real paged kernels. The sizing pass above used
        no cache, so otherwise the prefill path's kernels would be compiled by Triton (seconds each,
        the first time on a machine) and loaded by CUDA inside the first requests that need them.
        The dummy K/V land in blocks that no sequence owns yet; a sequence writes a slot before it
        reads it."""
        sc = self.config.scheduler_config
        n = min(sc.max_num_batched_tokens, sc.max_model_len, self.num_blocks * self.block_size)
        blocks = list(range(-(-n // self.block_size)))
        md = PagedAttentionMetadata.build_paged([n], [n], [blocks], self.block_size, self.device)
        hidden = self.model(torch.zeros(n, dtype=torch.long, device=self.device), md.positions, md)
        self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)

    def _max_logits_rows(self, num_tokens: int) -> int:
        """The most logits rows a step of num_tokens tokens can have: one per sequence."""
        return min(self.config.scheduler_config.max_num_seqs, num_tokens)

    # ---- inputs ----------------------------------------------------------------------------------
    def prepare_inputs(self, so: SchedulerOutput) -> tuple[torch.Tensor, PagedAttentionMetadata]:
        """input_ids (num_tokens,) of the tokens scheduled for each sequence (from its
        num_computed_tokens on), and the paged metadata of the step: what `build_paged` makes from
        the same lists, computed in numpy (`HostPagedInputs`) at a fraction of the host time."""
        host = HostPagedInputs.build(so.seqs, so.num_scheduled_tokens, self.block_size)
        device = self.device

        def on_device(array: np.ndarray) -> torch.Tensor:
            return to_device(torch.from_numpy(array), device)

        md = PagedAttentionMetadata(
            cu_seqlens_q=on_device(host.cu_seqlens_q),
            seq_lens=on_device(host.seq_lens),
            slot_ids=torch.arange(len(so.seqs), device=device),
            max_seqlen_q=max(so.num_scheduled_tokens),
            max_seqlen_k=int(host.seq_lens.max()),
            token_seq_ids=on_device(host.token_seq_ids),
            positions=on_device(host.positions),
            block_tables=on_device(host.block_tables),
            slot_mapping=on_device(host.slot_mapping),
            block_size=self.block_size,
            seq_order=on_device(longest_first(host.seq_lens)) if max(so.num_scheduled_tokens) == 1 else None,
        )
        return on_device(host.input_ids), md

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> torch.Tensor:
        self.copy_blocks(so.block_copies)
        return super().execute_model(so)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> dst in every layer's K and V before the step writes dst."""
        if copies:
            src, dst = (host_to_device(list(x), torch.int64, self.device) for x in zip(*copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def kv_cache_usage(self, num_tokens_held: list[int], num_used_blocks: int) -> KVCacheUsage:
        """Bytes of the blocks in use versus bytes holding tokens (`num_tokens_held`: the tokens in
        each used block): the waste is at most one partial block per sequence (m2 wastes
        max_model_len - len per slot)."""
        per_token = self.config.model_config.kv_cache_bytes_per_token()
        return KVCacheUsage(num_used_blocks * block_bytes(self.config), sum(num_tokens_held) * per_token)
