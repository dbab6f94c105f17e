"""Tensor-parallel versions of m2's weight-holding layers, and the `ModelLayers` that injects them."""

from m5_tp.layers.fused_moe import FusedMoEParallel
from m5_tp.layers.layer_set import tensor_parallel_layers
from m5_tp.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from m5_tp.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

__all__ = [
    "ColumnParallelLinear",
    "FusedMoEParallel",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "tensor_parallel_layers",
]
