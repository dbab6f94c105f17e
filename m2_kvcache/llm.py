"""m2's `LLM`: m1's API on the project's own model with a KV cache and continuous batching."""

from __future__ import annotations

from m1_sampling.llm import LLM as HFModelLLM
from m2_kvcache.llm_engine import LLMEngine


class LLM(HFModelLLM):
    engine_cls = LLMEngine
    milestone = "m2_kvcache"
    supported_arguments = HFModelLLM.supported_arguments | {"max_num_batched_tokens"}
