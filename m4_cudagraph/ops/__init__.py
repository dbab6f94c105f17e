"""Milestone 4's fused elementwise kernels, each beside its pure-torch reference (m2's layer code).

A decode step of a small model is a long chain of tiny kernels. In m2's torch code an RMSNorm is
about nine of them (add, cast, square, mean, add eps, rsqrt, two multiplies, cast back), RoPE about
twenty, the gated activation three; a CUDA graph removes their launch cost from the CPU but each
still costs the GPU a few microseconds to start and drain. Each kernel here does one of those
layers in a single pass over its input:

- `rms_norm` / `rms_norm_ref`: RMSNorm over the last dimension, optionally with the residual add
  fused in (returns the normalized sum and the sum); rows may be strided, so it also serves as
  Qwen3's per-head q/k norm on a view of the fused qkv projection.
- `rotary_embedding` / `rotary_embedding_ref`: rotate-half RoPE applied to q and k in place;
  `rotary_embedding_and_cache` / `rotary_embedding_and_cache_ref`: the same, with the rotated k and v
  written straight into the paged KV cache (m3's store kernel folded in).
- `silu_and_mul` / `silu_and_mul_ref`: silu(gate) * up over the fused gate/up projection.
- `splitk_linear` / `splitk_linear_ref`: a small batch's x W^T as float32 partial products over
  slices of K, left for the consumer to sum; `rms_norm_splitk` / `rms_norm_splitk_ref` is that
  consumer (the residual add + RMSNorm after o_proj and down_proj).
- `sample_temperature` / `sample_temperature_ref`: the sampler of a temperature-only batch (greedy
  or inverse-CDF, one uniform per row) with the chosen tokens' raw logprobs, reading the logits once
  (and one block of each sampled row twice).

Importing `m3_paged.ops` first sets TRITON_INTERPRET=1 when there is no GPU (see its docstring),
so these kernels run in Triton's interpreter in the CPU tests.
"""

import m3_paged.ops  # noqa: F401  (sets TRITON_INTERPRET before the kernels below are decorated)

from .rms_norm import rms_norm, rms_norm_ref, rms_norm_splitk, rms_norm_splitk_ref  # noqa: E402
from .rotary import (  # noqa: E402
    rotary_embedding,
    rotary_embedding_and_cache,
    rotary_embedding_and_cache_ref,
    rotary_embedding_ref,
)
from .sample import sample_temperature, sample_temperature_ref  # noqa: E402
from .silu_and_mul import silu_and_mul, silu_and_mul_ref  # noqa: E402
from .splitk_linear import splitk_linear, splitk_linear_ref  # noqa: E402

__all__ = [
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_splitk",
    "rms_norm_splitk_ref",
    "rotary_embedding",
    "rotary_embedding_and_cache",
    "rotary_embedding_and_cache_ref",
    "rotary_embedding_ref",
    "sample_temperature",
    "sample_temperature_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "splitk_linear",
    "splitk_linear_ref",
]
