"""m3's `LLM`: paged KV blocks, prefix caching, chunked prefill and preemption."""

from __future__ import annotations

from typing import Any

from m2_kvcache.llm import LLM as SlotLLM
from m3_paged.llm_engine import LLMEngine


class LLM(SlotLLM):
    engine_cls = LLMEngine
    milestone = "m3_paged"
    supported_arguments = SlotLLM.supported_arguments | {
        "block_size",
        "gpu_memory_utilization",
        "num_gpu_blocks_override",
        "kv_cache_memory_bytes",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "attention_backend",
    }
    fixed_arguments: dict[str, Any] = {}  # chunked prefill is the user's choice from here on

    def _check_request(self, index: int, prompt_token_ids: list[int], sp) -> None:
        super()._check_request(index, prompt_token_ids, sp)
        bm = self.llm_engine.scheduler.block_manager
        need = bm.num_required_blocks(len(prompt_token_ids))
        if need > bm.num_blocks:
            raise ValueError(
                f"prompt {index} has {len(prompt_token_ids)} tokens: {need} KV blocks of {bm.block_size}, but the "
                f"cache holds {bm.num_blocks} blocks; give the cache more memory or shorten the prompt"
            )
