"""m2's model runner: the project's own model over a contiguous KV cache of `max_num_seqs` slots.

Each step feeds only the tokens whose K/V are not cached yet: the whole prompt in a prefill step,
one token per sequence in a decode step. Inputs are flattened ("varlen"): all scheduled tokens in
one (num_tokens,) tensor, with an AttentionMetadata saying which rows belong to which sequence.
"""

from __future__ import annotations

import os

import torch

from m0_config.config import EngineConfig
from m2_kvcache.attention.kv_cache import KVCacheUsage, allocate_kv_cache, kv_cache_usage
from m2_kvcache.attention.metadata import AttentionMetadata
from m2_kvcache.model_loader import load_model
from m2_kvcache.scheduler import SchedulerOutput


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (for a CPU: the machine's available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache; free RAM alone would be too pessimistic
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    """Loads the model, allocates the KV cache, and turns a SchedulerOutput into logits."""

    def __init__(self, config: EngineConfig):
        self.config = config
        mc = config.model_config
        self.device = mc.device
        self.model = self.load_model()
        self.kv_cache = self.allocate_kv_cache()

    def load_model(self) -> torch.nn.Module:
        return load_model(self.config.model_config)

    def allocate_kv_cache(self) -> torch.Tensor:
        """max_num_seqs slots of max_model_len tokens: reserved up front, used or not."""
        mc = self.config.model_config
        num_slots = self.config.scheduler_config.max_num_seqs
        need = num_slots * mc.max_model_len * mc.kv_cache_bytes_per_token()
        free = available_memory(self.device)
        if need > 0.9 * free:
            raise ValueError(
                f"the contiguous KV cache needs {need / 2**30:.2f} GiB (max_num_seqs={num_slots} slots x "
                f"max_model_len={mc.max_model_len} tokens x {mc.kv_cache_bytes_per_token()} bytes) but only "
                f"{free / 2**30:.2f} GiB is free; lower max_num_seqs or max_model_len "
                "(m3_paged's block cache only reserves what sequences use)"
            )
        return allocate_kv_cache(self.model, num_slots, mc.max_model_len)

    @property
    def vocab_size(self) -> int:
        return self.config.model_config.vocab_size

    def prepare_inputs(self, so: SchedulerOutput) -> tuple[torch.Tensor, AttentionMetadata]:
        """input_ids (num_tokens,) of the not-yet-cached tokens, and the step's metadata."""
        input_ids, seq_lens = [], []
        for seq, n in zip(so.seqs, so.num_scheduled_tokens):
            start = seq.data.num_computed_tokens
            input_ids.extend(seq.get_token_ids()[start : start + n])
            seq_lens.append(start + n)
        md = AttentionMetadata.build(so.num_scheduled_tokens, seq_lens, so.slot_ids, self.device)
        return torch.tensor(input_ids, dtype=torch.long, device=self.device), md

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> torch.Tensor:
        """Logits (num_seqs, vocab_size) in float32 at each sequence's last scheduled token."""
        input_ids, md = self.prepare_inputs(so)
        hidden = self.model(input_ids, md.positions, md)  # (num_tokens, hidden_size)
        # Only each sequence's last token needs logits: the LM head is the largest matmul of a step.
        return self.model.compute_logits(hidden[md.last_token_indices]).float()

    def kv_cache_usage(self, seq_lens: list[int]) -> KVCacheUsage:
        mc = self.config.model_config
        return kv_cache_usage(
            seq_lens,
            self.config.scheduler_config.max_num_seqs,
            mc.max_model_len,
            mc.kv_cache_bytes_per_token(),
        )
