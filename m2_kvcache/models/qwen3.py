"""Qwen3: the Llama decoder with an RMSNorm on every q and k head before RoPE (and no QKV bias unless
attention_bias says so). Chosen by the architecture name, never guessed from attention_bias."""

from __future__ import annotations

from typing import Any

from m2_kvcache.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(hf_config: Any) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
