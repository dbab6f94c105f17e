"""m4's `LLM`: m3's engine with decode steps replayed from CUDA graphs (`enforce_eager=True` turns
them off). On a CPU it runs eagerly, exactly like m3."""

from m3_paged.llm import LLM as PagedLLM
from m4_cudagraph.llm_engine import LLMEngine


class LLM(PagedLLM):
    engine_cls = LLMEngine
    milestone = "m4_cudagraph"
    supported_arguments = PagedLLM.supported_arguments | {"enforce_eager", "async_scheduling"}
