"""m2's norm, activation, RoPE and row-linear layers on m4's kernels, and the `ModelLayers` that injects them.

Each class subclasses m2's layer (same constructor, same parameters and buffers, so checkpoints load
unchanged) and overrides only `forward` with one Triton kernel instead of a chain of torch ops. A
CUDA graph removes the CPU cost of launching kernels, not the GPU's cost of running each one: a
decode step of Qwen3-0.6B went from ~60 kernels per layer to ~11 with these (docs/benchmarks.md).

The row linears (o_proj, down_proj) feed nothing but the next residual add + RMSNorm. On small
batches `SplitKRowLinear` leaves its output as split-K partial products (`SplitKPartials`) and
`FusedRMSNorm` sums them as it reads them, so the split costs no reduction kernel.

They are used on CUDA (`fused_layers_for`); on a CPU the kernels would run in Triton's slow
interpreter, so the torch layers stay there (the tests still compare both).
"""

from __future__ import annotations

import dataclasses

import torch

from m2_kvcache.layers.activation import SiluAndMul
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.layernorm import RMSNorm
from m2_kvcache.layers.linear import RowLinear
from m2_kvcache.layers.rotary_embedding import RotaryEmbedding
from m3_paged.ops.pdl import use_pdl
from m4_cudagraph.fused_attention import qk_norm_args
from m4_cudagraph.ops import rms_norm, rms_norm_splitk, rotary_embedding, silu_and_mul, splitk_linear
from m4_cudagraph.ops.splitk_linear import SPLITK_MAX_TOKENS


@dataclasses.dataclass(frozen=True)
class SplitKPartials:
    """A row linear's output before its split-K sum: (num_splits, num_tokens, out_features) float32
    partial products (`m4_cudagraph/ops/splitk_linear.py`). `FusedRMSNorm` sums them; anything else
    fails loudly (this is not a tensor), so partials can never be mistaken for the output."""

    partials: torch.Tensor


class SplitKRowLinear(RowLinear):
    """m2's row linear; on a GPU with programmatic dependent launch (Hopper on), a bias-free batch of
    1..SPLITK_MAX_TOKENS rows (decode steps) comes back as `SplitKPartials` for the next
    `FusedRMSNorm`; every other batch, and every batch elsewhere, from cuBLAS as before (without PDL
    the split-K pair measured slower in place than cuBLAS, docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | SplitKPartials:
        if use_pdl(x.device) and self.bias is None and 0 < x.shape[0] <= SPLITK_MAX_TOKENS:
            return SplitKPartials(splitk_linear(x, self.weight))
        return super().forward(x)


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor | SplitKPartials, residual: torch.Tensor | None = None):
        if isinstance(x, SplitKPartials):
            return rms_norm_splitk(x.partials, self.weight, self.eps, residual)
        return rms_norm(x, self.weight, self.eps, residual)


class FusedSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class FusedRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions, q, k, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        """In place on q and k (views into the qkv projection, read by nothing else); Qwen3's
        per-head norms run in the same kernel."""
        qk_norm = qk_norm_args(q_norm, k_norm)
        return rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache, qk_norm)


def fused_layers(base: ModelLayers | None = None) -> ModelLayers:
    """`base` (m2's defaults, or m5's parallel linears) with the fused norm, activation and RoPE, and
    the split-K row linear in place of m2's dense one (m5's all-reducing row linear stays)."""
    base = base or ModelLayers()
    return dataclasses.replace(
        base,
        rms_norm=FusedRMSNorm,
        activation=FusedSiluAndMul,
        rotary_embedding=FusedRotaryEmbedding,
        row_linear=SplitKRowLinear if base.row_linear is RowLinear else base.row_linear,
    )


def fused_layers_for(device: torch.device, base: ModelLayers | None = None) -> ModelLayers:
    """Fused layers on CUDA; `base` unchanged elsewhere."""
    base = base or ModelLayers()
    return fused_layers(base) if device.type == "cuda" else base
