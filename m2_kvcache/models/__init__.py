"""The project's own model code: Qwen3, Qwen3-MoE, Qwen2/2.5 and Llama 2/3/3.1/3.2 on one shared decoder."""

from m2_kvcache.models.llama import DecoderOptions, LlamaForCausalLM
from m2_kvcache.models.qwen2 import Qwen2ForCausalLM
from m2_kvcache.models.qwen3 import Qwen3ForCausalLM
from m2_kvcache.models.qwen3_moe import Qwen3MoeForCausalLM
from m2_kvcache.models.registry import MODEL_REGISTRY, get_model_class

__all__ = [
    "MODEL_REGISTRY",
    "DecoderOptions",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "get_model_class",
]
