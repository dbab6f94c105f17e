"""Milestone 3's kernels, each beside its pure-torch reference.

- `store_kvcache` / `store_kvcache_ref`: write this step's K/V into the paged cache through
  `slot_mapping` (slot -1 = write nowhere).
- `paged_attention` / `paged_attention_ref`: attention for a batch mixing prefill chunks (with a
  cached prefix) and decode rows, K/V read through `block_tables`; split-K for long decodes.

Running the Triton kernels without a GPU. Triton's `@triton.jit` decides when it decorates a
function whether that function will be compiled for a GPU or run by Triton's interpreter on
NumPy (environment variable TRITON_INTERPRET=1; the interpreter accepts CPU tensors). So the
variable only has to be set before the kernel modules below are imported, not before `triton`
itself, and importing `m3_paged.ops.<anything>` always runs this file first. Without CUDA we
therefore default it to "1" here (an explicit TRITON_INTERPRET in the environment wins). Caveats:
it is process-wide, so Triton kernels that other code decorates later in the same process are
interpreted too; and the interpreter is slow (tests use small shapes) and does not implement
`tl.dot` on bfloat16 (triton-lang/triton#11584), so bfloat16 attention is checked on a GPU only.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from .paged_attention import _paged_attention_kernel, choose_num_splits, paged_attention  # noqa: E402
from .paged_attention_ref import gather_kv, paged_attention_ref  # noqa: E402
from .store_kvcache import store_kvcache, store_kvcache_ref  # noqa: E402

# True when the kernels above were built for the interpreter (what @triton.jit actually did).
TRITON_INTERPRET = isinstance(_paged_attention_kernel, InterpretedFunction)

__all__ = [
    "TRITON_INTERPRET",
    "choose_num_splits",
    "gather_kv",
    "paged_attention",
    "paged_attention_ref",
    "store_kvcache",
    "store_kvcache_ref",
]
