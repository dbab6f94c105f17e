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
        """Bytes of the blocks in use versus bytes holding the running sequences' tokens."""
        bm = self.scheduler.block_manager
        running = [s for r in self.scheduler.running for s in r.get_seqs(SequenceStatus.RUNNING)]
        used_blocks = bm.num_blocks - bm.get_num_free_blocks()
        return self.model_runner.kv_cache_usage([s.data.num_computed_tokens for s in running], used_blocks)
