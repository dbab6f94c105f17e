"""The gated activation of the Llama/Qwen MLP in one kernel.

What it computes (reference: m2's `SiluAndMul`): x (num_tokens, 2 * d), gate first ->
out (num_tokens, d) = silu(x[:, :d]) * x[:, d:], where silu(g) = g * sigmoid(g). In torch that is
three kernels (silu, multiply, plus the chunk's strided reads); here one pass reads x once and
writes out once. silu is rounded to x's dtype before the multiply, as the two torch ops round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from m2_kvcache.layers.activation import SiluAndMul
from m3_paged.ops.pdl import use_pdl

BLOCK = 1024  # output columns per program


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    return SiluAndMul()(x)


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, d, stride_x, BLOCK: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:  # a PDL-launched successor (the split-K down projection) may start its weight reads
        gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + token * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + token * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + token * d + cols, (silu * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`: (num_tokens, 2 * d) -> new (num_tokens, d)."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, (x.shape, x.stride())
    num_tokens, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    if num_tokens:
        grid = (num_tokens, triton.cdiv(d, BLOCK))
        _silu_and_mul_kernel[grid](out, x, d, x.stride(0), BLOCK=BLOCK, TRIGGER=use_pdl(x.device))
    return out
