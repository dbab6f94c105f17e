"""The tensor-parallel `ModelLayers`: m2's injection point, filled with the parallel classes bound
to one rank's group. m2's model classes build themselves from it unchanged."""

from __future__ import annotations

import dataclasses
from functools import partial

from m2_kvcache.layers.layer_set import ModelLayers
from m5_tp.layers.fused_moe import FusedMoEParallel
from m5_tp.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from m5_tp.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from m5_tp.parallel_state import TensorParallelGroup


def tensor_parallel_layers(tp_group: TensorParallelGroup, base: ModelLayers | None = None) -> ModelLayers:
    """`base` (m2's defaults, or m4's fused layers) with parallel factories in place of the
    weight-sharded ones, with m2's constructor signatures; the group is bound, never global."""
    return dataclasses.replace(
        base or ModelLayers(),
        qkv_linear=partial(QKVParallelLinear, tp_group=tp_group),
        merged_linear=partial(MergedColumnParallelLinear, tp_group=tp_group),
        row_linear=partial(RowParallelLinear, tp_group=tp_group),
        embedding=partial(VocabParallelEmbedding, tp_group=tp_group),
        lm_head=partial(ParallelLMHead, tp_group=tp_group),
        fused_moe=partial(FusedMoEParallel, tp_group=tp_group),
    )
