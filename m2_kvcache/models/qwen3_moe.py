"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 decoder whose MLP is, in its sparse layers,
a mixture of experts. Attention, norms, RoPE and the dense MLP are the shared decoder's
(`m2_kvcache/models/llama.py`); only `make_mlp` differs.

    router_logits = gate(x)                                   (num_tokens, num_experts)
    topk_weights, topk_ids = top-k of softmax(router_logits)  renormalised iff config.norm_topk_prob
    y = sum_k topk_weights[:, k] * expert_{topk_ids[:, k]}(x), each expert a gated MLP of width
        moe_intermediate_size

Layer i is sparse iff num_experts > 0, i is not in mlp_only_layers and (i + 1) % decoder_sparse_step
== 0 (transformers' rule); the others keep a dense MLP of width intermediate_size. There is no shared
expert in Qwen3-MoE (Qwen2-MoE and Qwen3-Next have one): configs asking for one, or for another
routing scheme, are rejected rather than computed differently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from m2_kvcache.layers.attention import AttentionBackend
from m2_kvcache.layers.fused_moe import make_expert_params_mapping, select_experts
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.linear import ReplicatedLinear
from m2_kvcache.models.llama import DecoderOptions, dense_mlp
from m2_kvcache.models.qwen3 import Qwen3ForCausalLM


def is_sparse_layer(hf_config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has experts (else a dense MLP)."""
    mlp_only = getattr(hf_config, "mlp_only_layers", None) or []
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return hf_config.num_experts > 0 and layer_idx not in mlp_only and (layer_idx + 1) % step == 0


def check_moe_config(hf_config: Any) -> None:
    """ValueError for MoE variants this model would otherwise silently compute differently."""
    unsupported = {
        "shared_expert_intermediate_size": "a shared expert (Qwen2-MoE / Qwen3-Next style)",
        "n_shared_experts": "shared experts (DeepSeek style)",
        "n_group": "grouped (node-limited) routing",
        "topk_group": "grouped (node-limited) routing",
    }
    for key, what in unsupported.items():
        if getattr(hf_config, key, None):
            raise ValueError(f"{key}={getattr(hf_config, key)!r}: {what} is not supported by Qwen3-MoE")
    scoring = getattr(hf_config, "scoring_func", None) or "softmax"
    if scoring != "softmax":
        raise ValueError(f"scoring_func {scoring!r} is not supported; Qwen3-MoE routes with 'softmax'")
    scale = getattr(hf_config, "routed_scaling_factor", None)
    if scale not in (None, 1, 1.0):
        raise ValueError(f"routed_scaling_factor={scale!r} is not supported (Qwen3-MoE uses 1)")
    num_experts, top_k = hf_config.num_experts, hf_config.num_experts_per_tok
    if num_experts > 0 and not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok must be in 1..num_experts={num_experts}, got {top_k}")


class Qwen3MoeSparseMoeBlock(nn.Module):
    """(num_tokens, hidden) -> (num_tokens, hidden): the router (`gate`, whole on every device) and
    the experts (`experts`, from `layers.fused_moe`). Names follow the checkpoint's mlp.gate / mlp.experts."""

    def __init__(self, hf_config: Any, layers: ModelLayers) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hf_config.hidden_size, hf_config.num_experts, bias=False)
        self.experts = layers.fused_moe(
            hf_config.num_experts,
            hf_config.num_experts_per_tok,
            hf_config.hidden_size,
            hf_config.moe_intermediate_size,
            bool(getattr(hf_config, "norm_topk_prob", False)),
        )

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice for each token, (topk_weights, topk_ids), each (num_tokens, top_k), for
        inspection; the forward makes the same choice inside the experts layer."""
        return select_experts(self.gate(hidden_states), self.experts.top_k, self.experts.renormalize)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states)  # (num_tokens, num_experts)
        return self.experts(hidden_states, router_logits)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3 with mixture-of-experts MLPs; the interface of `LlamaForCausalLM`.

    `expert_params_mapping` tells the weight loader where each per-expert checkpoint tensor goes in
    the stacked expert weights (see `m2_kvcache/layers/fused_moe/layer.py::make_expert_params_mapping`)."""

    def __init__(
        self, hf_config: Any, attn_backend: AttentionBackend | None = None, layers: ModelLayers | None = None
    ) -> None:
        check_moe_config(hf_config)
        super().__init__(hf_config, attn_backend, layers)
        self.expert_params_mapping = make_expert_params_mapping(hf_config.num_experts)

    @staticmethod
    def make_mlp(hf_config: Any, layer_idx: int, layers: ModelLayers, options: DecoderOptions) -> nn.Module:
        if is_sparse_layer(hf_config, layer_idx):
            return Qwen3MoeSparseMoeBlock(hf_config, layers)
        return dense_mlp(hf_config, layer_idx, layers, options)
