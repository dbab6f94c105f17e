"""m4's model runner: m3's, with the decode step captured as CUDA graphs and replayed.

Decode steps of small models are bound by kernel-launch overhead: one step launches a few
hundred small kernels, each costing several microseconds of CPU time, while the GPU work per
kernel is tiny. A CUDA graph records the whole step once (per batch-size bucket) and replays it
with a single launch. Steps with prefill work replay a "mixed" graph keyed by their padded token
count when they are small (mixed_batch.py: the few new tokens of a prefix-cache hit, say); large
prefills run eagerly, where the matmuls, not the launches, take the time.
"""

from __future__ import annotations

import time

import torch

from m0_config.config import EngineConfig
from m0_config.logger import init_logger
from m2_kvcache.layers.layer_set import ModelLayers
from m3_paged.attention.backends import TritonPagedBackend
from m3_paged.attention.metadata import PagedAttentionMetadata
from m3_paged.model_runner import HostPagedInputs
from m3_paged.model_runner import ModelRunner as PagedModelRunner
from m3_paged.scheduler import SchedulerOutput
from m4_cudagraph.async_scheduling import fill_placeholders
from m4_cudagraph.buckets import capture_sizes, pick_bucket
from m4_cudagraph.fused_attention import RopeCacheTritonBackend
from m4_cudagraph.fused_layers import fused_layers_for
from m4_cudagraph.mixed_batch import MixedBuffers, mixed_capture_sizes
from m4_cudagraph.static_buffers import DecodeBuffers, host_decode_inputs

logger = init_logger(__name__)


class ModelRunner(PagedModelRunner):
    def __init__(self, config: EngineConfig):
        super().__init__(config)  # model, KV cache
        mc = config.model_config
        self.capture_sizes = capture_sizes(config.scheduler_config.max_num_seqs)
        self.buffers = DecodeBuffers.allocate(
            self.capture_sizes[-1], mc.max_model_len, self.block_size, self.device
        )
        sc = config.scheduler_config
        self.mixed_sizes = mixed_capture_sizes(sc.max_num_batched_tokens)
        self.mixed_buffers = MixedBuffers.allocate(
            max(self.mixed_sizes, default=0),
            self.mixed_num_seqs(max(self.mixed_sizes, default=0)),
            self.buffers.max_blocks_per_seq,
            self.device,
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (num_tokens, num_seqs)
        # (max_bs, vocab) in the model's dtype: every graph's LM head writes its rows here (no copy:
        # 49 us per step at 256 rows when it was one, on an H100). Steps hand the sampler
        # a view, not a copy: the next replay overwrites it only after this step's sampler kernels ran
        # (one stream), and the sampler keeps nothing that points into it. (The float32 copy it
        # replaced cost 120 us per step at 256 rows; m1's sampler converts what it needs itself.)
        self.graph_logits: torch.Tensor | None = None
        self.graph_pool = None
        # Static (padded, fixed-address) decode: always with graphs; tests may turn it on on a CPU.
        self.use_static_decode = self.device.type == "cuda" and not config.enforce_eager
        if self.use_static_decode and self.attn_backend.name == "torch":
            # The torch path indexes with boolean masks (a host sync), which a capture forbids.
            logger.info("attention_backend='torch' cannot be captured: decode runs eagerly")
            self.use_static_decode = False
        if self.use_static_decode:
            self.capture_cudagraphs()

    def prepare_inputs(self, so: SchedulerOutput) -> tuple[torch.Tensor, PagedAttentionMetadata]:
        """m3's inputs, with async scheduling's placeholder tokens filled in on the device."""
        input_ids, md = super().prepare_inputs(so)
        return fill_placeholders(input_ids, so.prev_sampled_token_ids), md

    def model_layers(self) -> ModelLayers:
        """m3's layers with the norms, activation and RoPE as single fused kernels on CUDA."""
        return fused_layers_for(self.device, super().model_layers())

    def make_attn_backend(self, config: EngineConfig):
        """m3's choice; its Triton backend with RoPE and the cache write in one kernel."""
        backend = super().make_attn_backend(config)
        return RopeCacheTritonBackend() if type(backend) is TritonPagedBackend else backend

    # ---- capture ---------------------------------------------------------------------------------
    def decode_metadata(self, bs: int) -> PagedAttentionMetadata:
        """Metadata whose tensors are views of the static buffers (the graph reads these addresses).
        max_seqlen_k is the worst case, so nothing in the kernels depends on this step's lengths."""
        b = self.buffers
        return PagedAttentionMetadata(
            cu_seqlens_q=b.cu_seqlens_q[: bs + 1],
            seq_lens=b.seq_lens[:bs],
            slot_ids=b.token_seq_ids[:bs],
            max_seqlen_q=1,
            max_seqlen_k=self.config.model_config.max_model_len,
            token_seq_ids=b.token_seq_ids[:bs],
            positions=b.positions[:bs],
            block_tables=b.block_tables[:bs],
            slot_mapping=b.slot_mapping[:bs],
            block_size=self.block_size,
            seq_order=b.seq_order[:bs],
        )

    def forward_decode_static(self, bs: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of `bs` rows read from the static buffers: (bs, vocab) logits (in `out`
        when given)."""
        md = self.decode_metadata(bs)
        hidden = self.model(self.buffers.input_ids[:bs], md.positions, md)  # (bs, hidden_size)
        return self.model.compute_logits(hidden, out=out)  # every row is its sequence's last token

    def mixed_num_seqs(self, num_tokens: int) -> int:
        """Sequences a mixed graph of num_tokens tokens has room for (each brings >= 1 token)."""
        return min(num_tokens, self.config.scheduler_config.max_num_seqs)

    def mixed_graph_seqs(self, num_tokens: int, batch_seqs: int) -> int:
        """The sequence slots of the mixed graph a step of batch_seqs sequences replays. A lone
        sequence (a prompt whose prefix is cached: the time to first token) gets a graph of its own:
        the attention grid of a graph grows with its sequence slots, and with 32 padding sequences the
        programs that find no work cost more than the one sequence's attention (H100, 32 new tokens
        after a 2,048-token prefix: 521 us of attention per step)."""
        return 1 if batch_seqs == 1 else self.mixed_num_seqs(num_tokens)

    def forward_mixed_static(
        self, num_tokens: int, out: torch.Tensor | None = None, num_seqs: int | None = None
    ) -> torch.Tensor:
        """One step of `num_tokens` (padded) tokens with prefill work, read from the mixed buffers:
        (num_seqs, vocab) logits at each sequence's last token (in `out` when given); num_seqs
        defaults to mixed_num_seqs(num_tokens)."""
        num_seqs, b = num_seqs or self.mixed_num_seqs(num_tokens), self.mixed_buffers
        md = b.metadata(num_tokens, num_seqs, self.config.model_config.max_model_len, self.block_size)
        hidden = self.model(b.input_ids[:num_tokens], md.positions, md)  # (num_tokens, hidden_size)
        return self.model.compute_logits(hidden[b.last_token_indices[:num_seqs]], out=out)

    def _capture(self, forward, rows: int) -> torch.cuda.CUDAGraph:
        forward(self.graph_logits[:rows])  # warm-up: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            forward(self.graph_logits[:rows])  # the LM head writes straight into the shared buffer
        self.graph_pool = self.graph_pool or graph.pool()
        return graph

    @torch.inference_mode()
    def capture_cudagraphs(self) -> None:
        """Largest bucket first, all graphs in one memory pool. Each graph's LM head writes its logits
        into one shared (max_bs, vocab) buffer, so nothing a graph allocates outlives its capture and
        the next (smaller) graph reuses that memory: the pool costs about as much as the largest graph."""
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        vocab = self.forward_decode_static(1).shape[-1]
        self.graph_logits = torch.empty(
            self.capture_sizes[-1], vocab, dtype=self.config.model_config.torch_dtype, device=self.device
        )
        for num_tokens in reversed(self.mixed_sizes):
            for num_seqs in sorted({self.mixed_num_seqs(num_tokens), 1}, reverse=True):
                self.mixed_graphs[num_tokens, num_seqs] = self._capture(
                    lambda out, t=num_tokens, s=num_seqs: self.forward_mixed_static(t, out, s), num_seqs
                )
        for bs in reversed(self.capture_sizes):
            self.graphs[bs] = self._capture(lambda out, bs=bs: self.forward_decode_static(bs, out), bs)
        # A graph's first replay also uploads it to the GPU; do that now, not in the middle of a run.
        # The buffers still hold their initial values: every K/V write goes nowhere (slot -1).
        for graph in (*self.mixed_graphs.values(), *self.graphs.values()):
            graph.replay()
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.graph_memory_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) and %d mixed ones (token counts %s, each for "
            "one sequence and for many) in "
            "%.1f s, using %.0f MiB",
            len(self.graphs), self.capture_sizes, len(self.mixed_graphs), self.mixed_sizes,
            self.capture_seconds, self.graph_memory_bytes / 2**20,
        )  # fmt: skip

    # ---- execution -------------------------------------------------------------------------------
    def decode_bucket(self, so: SchedulerOutput) -> int | None:
        """The decode bucket to replay, or None: a step with any prefill (explicit flag), a batch
        larger than every bucket, or no static path at all."""
        if not self.use_static_decode or any(s.is_prefill for s in so.seqs):
            return None
        return pick_bucket(self.capture_sizes, len(so.seqs))

    def mixed_bucket(self, so: SchedulerOutput) -> int | None:
        """The mixed graph for a step with prefill work, or None to run it eagerly (too many tokens
        or sequences for every mixed graph, or no static path at all)."""
        if not self.use_static_decode:
            return None
        bucket = pick_bucket(self.mixed_sizes, sum(so.num_scheduled_tokens))
        if bucket is None or len(so.seqs) > self.mixed_num_seqs(bucket):
            return None
        return bucket

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> torch.Tensor:
        bucket = self.decode_bucket(so)
        if bucket is not None:
            return self.execute_decode(so, bucket)
        mixed = self.mixed_bucket(so) if any(s.is_prefill for s in so.seqs) else None
        if mixed is not None:
            return self.execute_mixed(so, mixed)
        return super().execute_model(so)

    def execute_decode(self, so: SchedulerOutput, bucket: int) -> torch.Tensor:
        self.copy_blocks(so.block_copies)
        b = self.buffers
        b.fill(host_decode_inputs(so.seqs, bucket, self.block_size, b.max_blocks_per_seq))
        if so.prev_sampled_token_ids is not None:  # async scheduling: last tokens still on the device
            input_ids = self.buffers.input_ids[:bucket]
            input_ids.copy_(fill_placeholders(input_ids, so.prev_sampled_token_ids))
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            logits = self.graph_logits[:bucket]
        else:  # static decode without a graph (CPU tests): the same padded computation, eagerly
            logits = self.forward_decode_static(bucket)
        return logits[: len(so.seqs)]  # a view: see `graph_logits` for why no copy is needed

    def execute_mixed(self, so: SchedulerOutput, num_tokens: int) -> torch.Tensor:
        self.copy_blocks(so.block_copies)
        # m3's inputs in host memory (what prepare_inputs would copy to the GPU field by field),
        # padded into the fixed buffers with two copies; placeholders filled on the device.
        host = HostPagedInputs.build(so.seqs, so.num_scheduled_tokens, self.block_size)
        num_seqs = self.mixed_graph_seqs(num_tokens, len(so.seqs))
        self.mixed_buffers.fill(host, num_tokens, num_seqs)
        if so.prev_sampled_token_ids is not None:  # async scheduling: see execute_decode
            input_ids = self.mixed_buffers.input_ids[: len(host.input_ids)]
            input_ids.copy_(fill_placeholders(input_ids, so.prev_sampled_token_ids))
        if (num_tokens, num_seqs) in self.mixed_graphs:
            self.mixed_graphs[num_tokens, num_seqs].replay()
            logits = self.graph_logits[:num_seqs]
        else:  # CPU tests: the same padded computation, eagerly
            logits = self.forward_mixed_static(num_tokens, num_seqs=num_seqs)
        return logits[: len(so.seqs)]
