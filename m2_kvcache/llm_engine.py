"""m2's engine: m1's loop with a slot scheduler and a KV-cache model runner plugged in."""

from __future__ import annotations

from m0_config.sequence import SequenceStatus
from m1_sampling.llm_engine import LLMEngine as StaticBatchEngine
from m2_kvcache.attention.kv_cache import KVCacheUsage
from m2_kvcache.model_runner import ModelRunner
from m2_kvcache.scheduler import Scheduler


class LLMEngine(StaticBatchEngine):
    scheduler_cls = Scheduler
    model_runner_cls = ModelRunner

    def kv_cache_usage(self) -> KVCacheUsage:
        """Bytes the slots reserve versus bytes holding the running sequences' tokens."""
        running = [s for r in self.scheduler.running for s in r.get_seqs(SequenceStatus.RUNNING)]
        return self.model_runner.kv_cache_usage([s.data.num_computed_tokens for s in running])
