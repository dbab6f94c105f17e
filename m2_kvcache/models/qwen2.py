"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q, k and v projections (not on o_proj)."""

from __future__ import annotations

from typing import Any

from m2_kvcache.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(hf_config: Any) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)
