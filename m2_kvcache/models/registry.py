"""config.json "architectures" name -> model class."""

from __future__ import annotations

from torch import nn

from m2_kvcache.models.llama import LlamaForCausalLM
from m2_kvcache.models.qwen2 import Qwen2ForCausalLM
from m2_kvcache.models.qwen3 import Qwen3ForCausalLM
from m2_kvcache.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class for an architecture name; ValueError listing the supported ones otherwise."""
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported architectures: {', '.join(MODEL_REGISTRY)}"
        )
    return MODEL_REGISTRY[architecture]
