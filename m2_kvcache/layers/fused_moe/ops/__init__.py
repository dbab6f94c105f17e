"""The Triton path of the MoE layer, used on CUDA (the layer uses `fused_experts_ref` on a CPU).

Importing this package first points Triton at its interpreter when there is no GPU, exactly as
`m3_paged.ops` does and for the same reason: `@triton.jit` decides at decoration time whether a
kernel is compiled for a GPU or run by the interpreter (TRITON_INTERPRET=1, on CPU tensors), so the
variable must be set before the kernel module is imported; an explicit TRITON_INTERPRET wins. The
setting is process-wide. This package is imported lazily (only when the kernel is used), so the
model code runs where Triton is not installed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from .fused_moe import (  # noqa: E402
    fused_experts,
    fused_experts_ref,
    fused_moe_kernel,
    get_config,
    invoke_fused_moe_kernel,
)

# True when the kernel was built for the interpreter (what @triton.jit actually did).
TRITON_INTERPRET = isinstance(fused_moe_kernel, InterpretedFunction)

__all__ = [
    "TRITON_INTERPRET",
    "fused_experts",
    "fused_experts_ref",
    "fused_moe_kernel",
    "get_config",
    "invoke_fused_moe_kernel",
]
