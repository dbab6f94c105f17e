"""m4's engine: m3's with the CUDA-graph model runner."""

from m3_paged.llm_engine import LLMEngine as PagedEngine
from m4_cudagraph.model_runner import ModelRunner


class LLMEngine(PagedEngine):
    model_runner_cls = ModelRunner
