"""A graph's small input buffers in one allocation, so that a step fills them with one copy.

A replayed graph reads its inputs from fixed buffers, so every step copies its values in from the
host. Each copy is a call into the CUDA driver (several microseconds of host time, more on a busy
host) and one more node for the GPU to run. A decode step has five small inputs (token ids,
positions, slots, context lengths, launch order) and a mixed step seven; as separate copies they
took ~0.7 ms of host time before a prefix-cached request's graph could start (H100 host), a
quarter of its time to first token.

`PackedBuffers` lays the 1-D buffers out back to back in one device tensor (the "arena"), each a
typed view at an aligned offset. A step writes its values into a host staging tensor of the same
layout with numpy and moves the whole arena in one asynchronous copy from pinned memory. The
arena is a few KB, so copying all of it costs less than a second driver call would.

    arena bytes:  | input_ids (int64) | positions (int64) | slot_mapping (int64) | seq_lens (int32) | ...
                  ^ each field starts at a multiple of ALIGN

Block tables stay a separate 2-D tensor: they are wide (max_model_len / block_size columns) and a
step refreshes only its batch's corner of them, which is one strided copy of its own.
"""

from __future__ import annotations

import numpy as np
import torch

# Field offsets are multiples of this many bytes. Triton compiles a kernel variant per pointer
# alignment (16 bytes or not): every view keeps the alignment a fresh allocation would have.
ALIGN = 128


class PackedBuffers:
    """Named 1-D device buffers (`fields`: name -> (length, dtype)) that share one allocation."""

    def __init__(self, fields: dict[str, tuple[int, torch.dtype]], device):
        self.device = torch.device(device)
        self.layout: dict[str, tuple[int, int, torch.dtype]] = {}  # name -> (byte offset, length, dtype)
        offset = 0
        for name, (length, dtype) in fields.items():
            self.layout[name] = (offset, length, dtype)
            offset += -(-length * dtype.itemsize // ALIGN) * ALIGN
        self.nbytes = offset
        self.arena = torch.zeros(self.nbytes, dtype=torch.uint8, device=self.device)

    @staticmethod
    def _field(arena: torch.Tensor, offset: int, length: int, dtype: torch.dtype) -> torch.Tensor:
        return arena[offset : offset + length * dtype.itemsize].view(dtype)

    def view(self, name: str) -> torch.Tensor:
        """The device buffer `name`: a (length,) view into the arena (a fixed address for graphs)."""
        return self._field(self.arena, *self.layout[name])

    def upload(self, values: dict[str, np.ndarray]) -> None:
        """One copy that replaces the whole arena: buffer `name` starts with `values[name]`; every
        other entry (past each value, and buffers not named) becomes 0. Callers therefore give every
        entry a graph reads, padding included. Asynchronous on CUDA: the host does not wait."""
        on_gpu = self.device.type == "cuda"
        # Pinned memory from PyTorch's caching host allocator, which keeps this block until the copy
        # has run: the host may prepare the next step while the GPU still has this one queued.
        staging = torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=on_gpu)
        for name, value in values.items():
            offset, length, dtype = self.layout[name]
            if len(value) > length:
                raise ValueError(f"{name}: {len(value)} values for a buffer of {length}")
            field = self._field(staging, offset, len(value), dtype).numpy()
            field[:] = value
        self.arena.copy_(staging, non_blocking=on_gpu)


def upload_corner(target: torch.Tensor, values: torch.Tensor) -> None:
    """values (rows, cols), a host tensor, into target[:rows, :cols]: one strided copy, from pinned
    memory and asynchronous on CUDA (see m1's `to_device`)."""
    corner = target[: values.shape[0], : values.shape[1]]
    on_gpu = corner.device.type == "cuda"
    corner.copy_(values.pin_memory() if on_gpu else values, non_blocking=on_gpu)
