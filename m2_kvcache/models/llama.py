"""The Llama-family decoder, shared by Llama 2/3/3.1/3.2, Qwen2/2.5 and Qwen3.

    embed_tokens -> N x [RMSNorm -> attention -> + residual -> RMSNorm -> MLP -> + residual] -> RMSNorm
    attention: fused QKV projection -> (Qwen3: per-head q/k RMSNorm) -> RoPE -> GQA over the KV cache -> o_proj
    MLP:       fused gate/up projection -> silu(gate) * up -> down_proj

The variants differ only in `DecoderOptions` (biases, q/k norm), which each model class derives
from its config, chosen by the checkpoint's architecture. Module and parameter names follow HF's
(model.layers.0.self_attn.qkv_proj.weight, ...) except for the fused projections, which
`packed_modules_mapping` maps back to the checkpoint's names.

Two extension points keep this code unique across milestones: `attn_backend` (the cache layout and
attention kernel: m3 passes a paged one) and `layers` (the weight-holding layer classes: m5 passes
tensor-parallel ones). A third keeps it unique across the model family: `make_mlp` builds each
layer's MLP block (dense here; Qwen3-MoE returns a mixture-of-experts block for its sparse layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m2_kvcache.attention import ContiguousCacheBackend
from m2_kvcache.layers.attention import Attention, AttentionBackend
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_config


@dataclass(frozen=True)
class DecoderOptions:
    """What distinguishes the variants of the decoder."""

    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2)
    o_bias: bool = False  # bias on o_proj (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False  # bias on the MLP projections (Llama with mlp_bias)
    qk_norm: bool = False  # RMSNorm on every q and k head before RoPE (Qwen3)


def config_head_dim(hf_config: Any) -> int:
    """head_dim from the config when present (Qwen3: 128 with hidden 1024 / 16 heads = 64), else
    hidden_size // num_attention_heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def check_hf_config(hf_config: Any) -> None:
    """Reject what this decoder would otherwise silently compute differently."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; this decoder implements 'silu' only")
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if getattr(hf_config, "use_sliding_window", False) or layer_types != {"full_attention"}:
        raise ValueError("sliding-window attention (use_sliding_window / layer_types) is not supported")


class LlamaAttention(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        attn_backend: AttentionBackend,
        layers: ModelLayers,
        options: DecoderOptions,
    ) -> None:
        super().__init__()
        hidden_size, total_num_heads = hf_config.hidden_size, hf_config.num_attention_heads
        total_num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or total_num_heads
        self.head_dim = config_head_dim(hf_config)
        self.qkv_proj = layers.qkv_linear(
            hidden_size, self.head_dim, total_num_heads, total_num_kv_heads, options.qkv_bias
        )
        # The QKV layer says how many heads run here: all of them, or under m5 this rank's share.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = layers.row_linear(total_num_heads * self.head_dim, hidden_size, options.o_bias)
        self.rotary_emb = rotary_emb
        self.qk_norm = options.qk_norm
        if self.qk_norm:
            self.q_norm = layers.rms_norm(self.head_dim, hf_config.rms_norm_eps)
            self.k_norm = layers.rms_norm(self.head_dim, hf_config.rms_norm_eps)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, layer_idx, attn_backend
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, attn_metadata: Any
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # (num_tokens, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (num_tokens, num_heads, head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (num_tokens, num_kv_heads, head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Qwen3 normalizes each head before the rotation (the rotary layer applies the norms, so
        # that m4 can do both in one kernel, and with the attention backend's cache write too).
        norms = (self.q_norm, self.k_norm) if self.qk_norm else ()
        attn_output = self.attn.rope_and_attend(self.rotary_emb, positions, q, k, v, attn_metadata, norms)
        return self.o_proj(attn_output)  # (num_tokens, hidden_size)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, layers: ModelLayers) -> None:
        super().__init__()
        self.gate_up_proj = layers.merged_linear(hidden_size, [intermediate_size, intermediate_size], bias)
        self.down_proj = layers.row_linear(intermediate_size, hidden_size, bias)
        self.act_fn = layers.activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


# (hf_config, layer_idx, layers, options) -> the layer's MLP block, (num_tokens, hidden) -> same shape.
MLPFactory = Callable[[Any, int, ModelLayers, DecoderOptions], nn.Module]


def dense_mlp(hf_config: Any, layer_idx: int, layers: ModelLayers, options: DecoderOptions) -> nn.Module:
    """The gated MLP of every layer of the dense models (hf_config.intermediate_size wide)."""
    return LlamaMLP(hf_config.hidden_size, hf_config.intermediate_size, options.mlp_bias, layers)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        attn_backend: AttentionBackend,
        layers: ModelLayers,
        options: DecoderOptions,
        make_mlp: MLPFactory = dense_mlp,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, layer_idx, rotary_emb, attn_backend, layers, options)
        self.mlp = make_mlp(hf_config, layer_idx, layers, options)
        self.input_layernorm = layers.rms_norm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = layers.rms_norm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        attn_metadata: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sublayer output, residual stream); the next norm adds them (fused add + norm)."""
        if residual is None:  # first layer: the embeddings are the residual stream
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        attn_backend: AttentionBackend,
        layers: ModelLayers,
        options: DecoderOptions,
        make_mlp: MLPFactory = dense_mlp,
    ) -> None:
        super().__init__()
        self.embed_tokens = layers.embedding(hf_config.vocab_size, hf_config.hidden_size)
        theta, scaling = rope_config(hf_config)
        # One table of cos/sin for all layers.
        rotary_emb = get_rope(
            config_head_dim(hf_config),
            hf_config.max_position_embeddings,
            theta,
            scaling,
            layers.rotary_embedding,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, i, rotary_emb, attn_backend, layers, options, make_mlp)
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = layers.rms_norm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None  # (num_tokens, hidden_size)
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama 2 / 3 / 3.1 / 3.2; the base class of the Qwen models.

    forward(input_ids (num_tokens,), positions (num_tokens,), attn_metadata) -> (num_tokens, hidden_size)
    over a flattened batch; compute_logits(hidden_states (num_seqs, hidden_size)) -> (num_seqs, vocab_size).
    """

    # checkpoint name -> (fused parameter name, shard id), for the weight loader.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Builds each layer's MLP block; a model with other MLPs (Qwen3-MoE) overrides it.
    make_mlp = staticmethod(dense_mlp)

    def __init__(
        self, hf_config: Any, attn_backend: AttentionBackend | None = None, layers: ModelLayers | None = None
    ) -> None:
        super().__init__()
        check_hf_config(hf_config)
        self.config = hf_config
        layers = layers or ModelLayers()
        attn_backend = attn_backend or ContiguousCacheBackend()
        options = self.decoder_options(hf_config)
        self.model = LlamaModel(hf_config, attn_backend, layers, options, self.make_mlp)
        self.lm_head = layers.lm_head(hf_config.vocab_size, hf_config.hidden_size, False)
        if getattr(hf_config, "tie_word_embeddings", False):
            self.lm_head.tie_weights(self.model.embed_tokens)

    @staticmethod
    def decoder_options(hf_config: Any) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False))
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(num_seqs, hidden_size) -> (num_seqs, vocab_size), into `out` when given. The runner passes
        only each sequence's last position: only the last position goes through the LM head, since it
        alone is sampled, and the head (hidden x vocab) is the largest matmul of the model."""
        return self.lm_head(hidden_states) if out is None else self.lm_head(hidden_states, out=out)
