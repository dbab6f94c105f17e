"""One rank's model runner: the previous milestone's runner on this rank's shard of the model.

Three things change, all small:

- the model is built from the tensor-parallel `ModelLayers`, so each rank loads only its slice of
  every weight straight from the checkpoint;
- a KV block holds only this rank's KV heads, so it is smaller, and more of them fit;
- every rank must have the same number of blocks (the driver's block tables index every rank's
  cache), so the ranks agree on the minimum.

Everything else (inputs, attention metadata, copy-on-write, CUDA graphs) is inherited: the ranks
run identical code on identical inputs, and the collectives inside the layers keep them in step.
One addition: the graphs hold on to the NCCL communicator they captured collectives of, so they
must be released before it is shut down (`release_cudagraphs`).
"""

from __future__ import annotations

import torch

from m0_config.config import EngineConfig
from m2_kvcache.attention.kv_cache import attention_layers
from m2_kvcache.layers.layer_set import ModelLayers
from m4_cudagraph.model_runner import ModelRunner as BaseModelRunner
from m5_tp.layers import tensor_parallel_layers
from m5_tp.parallel_state import TensorParallelGroup


class ModelRunner(BaseModelRunner):
    def __init__(self, config: EngineConfig, tp_group: TensorParallelGroup):
        self.tp_group = tp_group
        super().__init__(config)

    def model_layers(self) -> ModelLayers:
        """m4's layers (fused kernels on CUDA) with the linears and embeddings made parallel."""
        return tensor_parallel_layers(self.tp_group, base=super().model_layers())

    def block_bytes(self) -> int:
        """2 (K and V) * layers * block_size * this rank's KV heads * head_dim * element size."""
        layer = attention_layers(self.model)[0]
        mc = self.config.model_config
        elem = torch.tensor([], dtype=mc.torch_dtype).element_size()
        return 2 * mc.num_layers * self.block_size * layer.num_kv_heads * layer.head_dim * elem

    def determine_num_blocks(self) -> int:
        """The smallest number of blocks any rank can hold (ranks may differ in free memory)."""
        return self.tp_group.all_reduce_min(super().determine_num_blocks())

    def capture_cudagraphs(self) -> None:
        """m4's capture; if it fails part-way, the graphs already captured are released before the
        error leaves (the driver then aborts NCCL, which would wait for them)."""
        try:
            super().capture_cudagraphs()
        except BaseException:
            self.release_cudagraphs()
            raise

    def release_cudagraphs(self) -> None:
        """Destroy this rank's CUDA graphs now; later steps run eagerly. Call it before the
        communicators are shut down: from NCCL 2.26 on, finalizing and even aborting a communicator
        waits until every graph that captured one of its collectives has been destroyed, so one
        still alive then (in a runner that garbage collection has not reached yet) hangs the
        process for good."""
        for graphs in (self.graphs, getattr(self, "mixed_graphs", {})):
            for graph in graphs.values():
                graph.reset()
            graphs.clear()
        self.graph_pool = None
        self.use_static_decode = False
