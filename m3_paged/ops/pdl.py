"""When to use programmatic dependent launch (PDL).

PDL lets a kernel start before the previous one in the stream has finished: the previous kernel's
programs call `gdc_launch_dependents` (Triton: `triton.language.extra.cuda`), the next kernel is
launched with `launch_pdl=True` and calls `gdc_wait` before it reads anything the previous kernel
wrote. It is a Hopper feature: the `griddepcontrol` instructions behind those calls exist from
compute capability 9.0 on, so on older GPUs (an A100 or an RTX 4090) and in Triton's CPU interpreter
every kernel here is launched plainly, with its PDL code compiled out (a constexpr flag).
"""

from __future__ import annotations

import functools

import torch

PDL_MIN_CAPABILITY = (9, 0)


@functools.cache  # a fact about the hardware; asked on every eager kernel launch
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= PDL_MIN_CAPABILITY


def use_pdl(device: torch.device) -> bool:
    """True on CUDA devices of compute capability >= 9.0 (H100, H200, B200, ...)."""
    if device.type != "cuda":
        return False
    return _has_pdl(device.index if device.index is not None else torch.cuda.current_device())
