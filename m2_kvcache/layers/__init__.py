"""The building blocks of the Llama-family decoder, each with a weight_loader where it holds weights."""

from m2_kvcache.layers.activation import SiluAndMul
from m2_kvcache.layers.attention import Attention, AttentionBackend
from m2_kvcache.layers.embedding import LMHead, VocabEmbedding
from m2_kvcache.layers.fused_moe import FusedMoE, select_experts
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.layernorm import RMSNorm
from m2_kvcache.layers.linear import (
    ColumnLinear,
    LinearBase,
    MergedColumnLinear,
    QKVLinear,
    ReplicatedLinear,
    RowLinear,
    default_weight_loader,
)
from m2_kvcache.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_config

__all__ = [
    "Attention",
    "AttentionBackend",
    "ColumnLinear",
    "FusedMoE",
    "LMHead",
    "LinearBase",
    "MergedColumnLinear",
    "ModelLayers",
    "QKVLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowLinear",
    "SiluAndMul",
    "VocabEmbedding",
    "default_weight_loader",
    "get_rope",
    "rope_config",
    "select_experts",
]
