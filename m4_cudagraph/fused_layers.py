"""m2's norm, activation and RoPE layers on m4's fused kernels, and the `ModelLayers` that injects them.

Each class subclasses m2's layer (same constructor, same parameters and buffers, so checkpoints load
unchanged) and overrides only `forward` with one Triton kernel instead of a chain of torch ops. A
CUDA graph removes the CPU cost of launching kernels, not the GPU's cost of running each one: a
decode step of Qwen3-0.6B went from ~60 kernels per layer to ~11 with these (docs/benchmarks.md).

They are used on CUDA (`fused_layers_for`); on a CPU the kernels would run in Triton's slow
interpreter, so the torch layers stay there (the tests still compare both).
"""

from __future__ import annotations

import dataclasses

import torch

from m2_kvcache.layers.activation import SiluAndMul
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.layernorm import RMSNorm
from m2_kvcache.layers.rotary_embedding import RotaryEmbedding
from m4_cudagraph.fused_attention import qk_norm_args
from m4_cudagraph.ops import rms_norm, rotary_embedding, silu_and_mul


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
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
    """`base` (m2's defaults, or m5's parallel linears) with the fused norm, activation and RoPE."""
    return dataclasses.replace(
        base or ModelLayers(),
        rms_norm=FusedRMSNorm,
        activation=FusedSiluAndMul,
        rotary_embedding=FusedRotaryEmbedding,
    )


def fused_layers_for(device: torch.device, base: ModelLayers | None = None) -> ModelLayers:
    """Fused layers on CUDA; `base` unchanged elsewhere."""
    base = base or ModelLayers()
    return fused_layers(base) if device.type == "cuda" else base
