"""One rank's view of its tensor-parallel group: rank, world size, and the collectives the layers
and the engine need.

The group is an explicit object handed to every parallel layer and to the worker; nothing lives
in a module global, and `torch.distributed`'s default ("world") group is never created. The
process groups are built straight from a key-value store (a `FileStore` on a fresh temporary file,
or torchrun's store), under a prefix of their own, so several engines can run in one process and
side by side on one machine: no fixed port, no fixed shared-memory name.

Two groups, as in vLLM:

- `device_group`: the model's collectives (all-reduce, gather) on the model's tensors: NCCL on
  CUDA, gloo on a CPU;
- `cpu_group`: gloo, for what lives on the host: the pickled inputs of each step that the driver
  broadcasts, and small agreements such as the number of KV blocks. On a CPU it is the same group.

A group of one rank has no process group at all: every collective returns its input.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# How long a collective may wait for a peer before it fails (a dead peer is usually noticed at
# once: its sockets close). Waiting for the driver's next step is exempt: an engine may sit idle.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1
    device_group: Any = None  # a torch c10d backend (ProcessGroupNCCL / ProcessGroupGloo), None alone
    cpu_group: Any = None  # ProcessGroupGloo, None alone
    timeout: datetime.timedelta = DEFAULT_TIMEOUT

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler and the sampler, and receives the logits."""
        return self.rank == 0

    # ---- the model's collectives (device_group) --------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the ranks, in place; every rank gets the sum."""
        if self.world_size > 1:
            self.device_group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim` in rank order, on every rank."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.device_group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=dim)

    def gather(self, x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Every rank's `x` concatenated along `dim` in rank order on rank `dst`; None elsewhere.
        Half the traffic of an all-gather when only one rank needs the result (the logits)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == dst else []
        opts = dist.GatherOptions()
        opts.rootRank = dst
        self.device_group.gather([parts] if parts else [], [x], opts).wait()
        return torch.cat(parts, dim=dim) if self.rank == dst else None

    # ---- host-side collectives (cpu_group) -------------------------------------------------------
    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's `value`, on every rank."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.cpu_group.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast_object(
        self, obj: Any = None, src: int = 0, timeout: datetime.timedelta | None = None
    ) -> Any:
        """`obj` of rank `src` on every rank (pickled: its size, then its bytes). `timeout` bounds the
        wait for the size, i.e. for `src` to send at all."""
        if self.world_size == 1:
            return obj
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size, src, timeout)
        if self.rank != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(payload, src, None)
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled and padded to one length)."""
        if self.world_size == 1:
            return [obj]
        data = pickle.dumps(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self.cpu_group.allgather([sizes], [torch.tensor([len(data)], dtype=torch.int64)]).wait()
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self.cpu_group.allgather([parts], [buf]).wait()
        return [pickle.loads(p[: int(s.item())].numpy().tobytes()) for p, s in zip(parts, sizes)]

    def _broadcast(self, t: torch.Tensor, src: int, timeout: datetime.timedelta | None) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        if timeout is not None:
            opts.timeout = timeout
        self.cpu_group.broadcast([t], opts).wait()

    def shutdown(self, graceful: bool = True) -> None:
        """Release NCCL communicators now rather than at garbage collection (a no-op for gloo).

        graceful: NCCL's shutdown first waits for every collective already launched, which is right
        at a normal end. After a failure a peer may never launch its half of one, and that wait
        would never end: abort instead."""
        if not graceful:
            return self.abort()
        if self.world_size > 1 and self.device_group is not self.cpu_group:
            shutdown = getattr(self.device_group, "shutdown", None)
            if shutdown is not None:
                shutdown()

    def abort(self) -> None:
        """Abort the NCCL communicators (a no-op for gloo, which notices a dead peer by itself):
        kernels waiting for a peer return at once, and later collectives raise. Safe to call from
        another thread while this rank is blocked in a collective: that is what it is for."""
        if self.world_size > 1 and self.device_group is not self.cpu_group:
            abort = getattr(self.device_group, "abort", None)
            if abort is not None:
                abort()


def init_tensor_parallel_group(
    store: dist.Store,
    rank: int,
    world_size: int,
    backend: str,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    prefix: str = "folovllm/tp",
) -> TensorParallelGroup:
    """Connect this rank to the others through `store` (every rank calls this with the same store
    and world size, its own rank). Blocks until all ranks have joined (at most `timeout`)."""
    if world_size == 1:
        return TensorParallelGroup(timeout=timeout)
    cpu_group = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/cpu", store), rank, world_size, timeout)
    if backend == "gloo":
        device_group = cpu_group
    elif backend == "nccl":
        from torch.distributed.distributed_c10d import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        options.is_high_priority_stream = False
        device_group = ProcessGroupNCCL(dist.PrefixStore(f"{prefix}/nccl", store), rank, world_size, options)
    else:
        raise ValueError(f"distributed_backend must be 'nccl' or 'gloo', got {backend!r}")
    return TensorParallelGroup(rank, world_size, device_group, cpu_group, timeout)


def file_store(path: str, world_size: int) -> dist.Store:
    """A store on a file every rank can open: the rendezvous of processes on one machine."""
    return dist.FileStore(path, world_size)
