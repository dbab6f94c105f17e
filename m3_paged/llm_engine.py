"""m3's engine: m1's loop with the paged model runner and the token-budget scheduler plugged in."""

from __future__ import annotations

from m0_config.sequence import SequenceStatus
from m1_sampling.llm_engine import LLMEngine as BaseEngine
from m2_kvcache.attention.kv_cache import KVCacheUsage
from m3_paged.model_runner import ModelRunner
from m3_paged.scheduler import Scheduler


class LLMEngine(BaseEngine):
    scheduler_cls = Scheduler
    model_runner_cls = ModelRunner

    def make_scheduler(self) -> Scheduler:
        return self.scheduler_cls(self.config, self.model_runner.num_blocks)

    def kv_cache_usage(self) -> KVCacheUsage:
        """Bytes of the blocks in use versus bytes holding the running sequences' computed tokens. A
        block that forks or prefix hits share holds its tokens once, so they are counted once."""
        bm = self.scheduler.block_manager
        size = bm.block_size
        filled: dict[int, int] = {}  # block id -> computed tokens it holds
        for req in self.scheduler.running:
            for seq in req.get_seqs(SequenceStatus.RUNNING):
                computed = seq.data.num_computed_tokens
                for i, block_id in enumerate(seq.block_table[: bm.num_required_blocks(computed)]):
                    filled[block_id] = max(filled.get(block_id, 0), min(size, computed - i * size))
        used_blocks = bm.num_blocks - bm.get_num_free_blocks()
        return self.model_runner.kv_cache_usage(list(filled.values()), used_blocks)
