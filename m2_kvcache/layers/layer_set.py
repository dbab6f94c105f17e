"""The injectable set of layer classes a model is built from.

The model code never names a linear, embedding, norm, activation or RoPE class directly; it calls
the factories of a `ModelLayers`. m2 uses the plain-torch defaults below. m4 swaps the norm,
activation and RoPE for fused Triton kernels (subclasses with the same weights), and tensor
parallelism (m5_tp) passes parallel linear classes (`functools.partial`s binding a process group)
with the same constructor signatures, so the same model classes run fused or sharded without a
copy of their code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from m2_kvcache.layers.activation import SiluAndMul
from m2_kvcache.layers.embedding import LMHead, VocabEmbedding
from m2_kvcache.layers.fused_moe.layer import FusedMoE
from m2_kvcache.layers.layernorm import RMSNorm
from m2_kvcache.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from m2_kvcache.layers.rotary_embedding import RotaryEmbedding


@dataclass(frozen=True)
class ModelLayers:
    """Factories, each called with the dense class's constructor arguments:

    - qkv_linear(hidden_size, head_size, total_num_heads, total_num_kv_heads, bias) -> exposes
      .num_heads, .num_kv_heads, .q_size, .kv_size (the heads it computes)
    - merged_linear(input_size, output_sizes, bias)
    - row_linear(input_size, output_size, bias)
    - embedding(num_embeddings, embedding_dim)
    - lm_head(num_embeddings, embedding_dim, bias) -> has tie_weights(embedding); returns full-vocab logits
    - fused_moe(num_experts, top_k, hidden_size, intermediate_size, renormalize) -> the experts of an
      MoE layer, forward(hidden_states, router_logits) (m5 splits intermediate_size)
    - rms_norm(hidden_size, eps) -> forward(x) or forward(x, residual) (see RMSNorm)
    - activation() -> the MLP's gated activation, (num_tokens, 2 * d) -> (num_tokens, d)
    - rotary_embedding(head_dim, max_position, inv_freq) -> forward(positions, q, k) -> (q, k)
    """

    qkv_linear: Callable[..., nn.Module] = QKVLinear
    merged_linear: Callable[..., nn.Module] = MergedColumnLinear
    row_linear: Callable[..., nn.Module] = RowLinear
    embedding: Callable[..., nn.Module] = VocabEmbedding
    lm_head: Callable[..., nn.Module] = LMHead
    fused_moe: Callable[..., nn.Module] = FusedMoE
    rms_norm: Callable[..., nn.Module] = RMSNorm
    activation: Callable[..., nn.Module] = SiluAndMul
    rotary_embedding: Callable[..., nn.Module] = RotaryEmbedding
