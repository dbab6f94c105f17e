"""The driver's side of tensor parallelism (vLLM's executor): it owns the worker processes, runs
rank 0's shard itself, and sends every step's inputs to the other ranks.

It has the model runner's interface (execute_model, num_blocks, vocab_size, kv_cache_usage), so
the engine plugs it in as its `model_runner_cls` and its loop does not change:

    driver (rank 0): scheduler ─► StepInput ──broadcast (gloo)──► workers (ranks 1..N-1)
                     its shard  ◄──── all-reduces inside every layer (NCCL / gloo) ────► their shards
                     sampler    ◄──── logits gathered to rank 0

Two ways to get the ranks:

- `LLM(model, tensor_parallel_size=N)` in a plain process spawns N-1 workers (torch.multiprocessing,
  "spawn") that meet the driver through a FileStore on a fresh temporary file;
- under `torchrun` (WORLD_SIZE=N in the environment) every process runs the same script: rank 0
  becomes the driver, and on the other ranks `LLM(...)` serves the driver until it shuts down,
  then exits the process (SystemExit(0)). This is how the engine spans several machines.

Failures: a worker reports its exception through a pipe before it exits; the driver's collective
with it then fails, and the driver raises a RuntimeError naming the rank and the error, after
stopping every worker. With gloo that collective fails at once (its sockets close). With NCCL it
does not: the driver sits in a CUDA call while an NCCL kernel on its GPU waits for the dead rank's
half of an all-reduce, for as long as the collective timeout (minutes). So on NCCL a monitor
thread watches the worker processes and aborts the communicator when one ends unasked
(`watch_workers`): the kernel returns, the driver's next collective fails, and the usual report
follows. Shutdown (explicit, on garbage collection or at interpreter exit) asks the workers to
leave their loop, then joins, terminates and kills them; after a failure it aborts NCCL rather
than waiting for collectives that will never complete. Every rank destroys its CUDA graphs before
its communicator: NCCL (2.26 and later) waits for the graphs that captured its collectives to go
first, forever if they never do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m0_config.config import EngineConfig
from m0_config.logger import init_logger
from m2_kvcache.attention.kv_cache import KVCacheUsage
from m3_paged.scheduler import SchedulerOutput
from m5_tp.hang_dump import arm_hang_dump, disarm_hang_dump, hang_dump_seconds
from m5_tp.parallel_state import TensorParallelGroup, file_store, init_tensor_parallel_group
from m5_tp.partition import check_devices, check_tensor_parallel
from m5_tp.step_input import StepInput
from m5_tp.worker import Worker, set_device, worker_main

logger = init_logger(__name__)

START_TIMEOUT_S = 300.0  # for a worker to import torch and reach the rendezvous
FAILURE_GRACE_S = 5.0  # for a failing worker's report to arrive after the collective broke
JOIN_TIMEOUT_S = 10.0  # for a worker to leave its loop before it is terminated


def launched_by_torchrun(tp_size: int) -> bool:
    """torchrun (or any launcher setting WORLD_SIZE) started one process per rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if tp_size == 1 or world_size == 1:
        return False
    if world_size != tp_size:
        raise ValueError(
            f"launched with WORLD_SIZE={world_size} processes but tensor_parallel_size={tp_size}; "
            "under torchrun they must be equal (one process per rank)"
        )
    return True


@dataclass
class WorkerHandles:
    """What the shutdown needs; held by the finalizer, so it must not point back at the executor."""

    processes: list = field(default_factory=list)
    pipes: list = field(default_factory=list)  # rank r's error pipe is pipes[r - 1]
    started: set[int] = field(default_factory=set)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # rank -> (summary, traceback)
    group: TensorParallelGroup | None = None
    tmpdir: str | None = None
    stopping: threading.Event = field(default_factory=threading.Event)  # workers may end from now on
    hang_dump_s: float | None = None
    driver_runner: Any = None  # rank 0's ModelRunner: its CUDA graphs go before the communicator


def watch_workers(handles: WorkerHandles, on_exit: Callable[[int], None]) -> None:
    """Until the engine stops: when a worker process ends unasked, on_exit(rank). Runs in a daemon
    thread of the driver and returns once every worker has ended (a stopping engine ends them all).
    It only watches the processes' sentinels: reaping them (their exit codes) is left to the main
    thread, which reports the failure."""
    sentinels = {p.sentinel: rank for rank, p in enumerate(handles.processes, start=1)}
    while sentinels:
        for sentinel in wait(list(sentinels)):
            rank = sentinels.pop(sentinel)
            if not handles.stopping.is_set():
                on_exit(rank)


def abort_on_worker_exit(group: TensorParallelGroup) -> Callable[[int], None]:
    """The monitor's reaction on NCCL: say which rank ended, then abort the communicator, so that a
    driver blocked on an NCCL kernel waiting for that rank gets control back and reports it."""

    def on_exit(rank: int) -> None:
        logger.error(
            "tensor-parallel worker rank %d ended while the engine runs; aborting NCCL so that rank 0 "
            "does not wait for it", rank,
        )  # fmt: skip
        with contextlib.suppress(Exception):  # already aborted or shut down: nothing left to release
            group.abort()

    return on_exit


def stop_workers(handles: WorkerHandles, graceful: bool = True) -> None:
    """Ask the workers to leave their loop (graceful), then join, terminate and kill what remains;
    then release rank 0's CUDA graphs and, after them, its communicators."""
    handles.stopping.set()
    arm_hang_dump(handles.hang_dump_s)  # the stop counts as a step: a hang in it dumps the stacks
    group = handles.group
    if graceful and group is not None and group.world_size > 1:
        with contextlib.suppress(Exception):  # a broken group: the processes are stopped below
            group.broadcast_object(None)
    for p in handles.processes:
        p.join(JOIN_TIMEOUT_S if graceful else 0)
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()
    for pipe in handles.pipes:
        pipe.close()
    runner, handles.driver_runner = handles.driver_runner, None
    if runner is not None:
        # Before the communicator (NCCL waits for graphs that captured its collectives, also in an
        # abort). Garbage collection and interpreter exit get here with rank 0's runner still alive.
        runner.release_cudagraphs()
    if group is not None:
        group.shutdown(graceful)
    if handles.tmpdir:
        shutil.rmtree(handles.tmpdir, ignore_errors=True)
    disarm_hang_dump(handles.hang_dump_s)


class MultiprocExecutor:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tp_size = config.parallel_config.tensor_parallel_size
        check_tensor_parallel(config.model_config.hf_config, self.tp_size)
        self.handles = WorkerHandles(hang_dump_s=hang_dump_seconds())
        arm_hang_dump(self.handles.hang_dump_s)  # start-up (load, profile, capture) counts as a step
        self._finalizer = weakref.finalize(self, stop_workers, self.handles)
        self.driver_worker: Worker | None = None
        if launched_by_torchrun(self.tp_size):
            group = self._join_torchrun()
        else:
            group = self._start_workers()
        self.handles.group = group
        with self._guard(check_alive=False):
            self.driver_worker = Worker(config, group)
        self.handles.driver_runner = self.driver_worker.model_runner

    # ---- start-up --------------------------------------------------------------------------------
    def _start_workers(self) -> TensorParallelGroup:
        config, tp = self.config, self.tp_size
        backend = config.parallel_config.distributed_backend
        if tp == 1:  # no process, no group; the device stays the one asked for
            return init_tensor_parallel_group(None, 0, 1, backend)
        device = config.model_config.device
        check_devices(device.type, tp, torch.cuda.device_count() if device.type == "cuda" else 0)
        set_device(config, 0)  # ranks 0..N-1 use cuda:0..N-1 (of CUDA_VISIBLE_DEVICES)
        self.handles.tmpdir = tempfile.mkdtemp(prefix="folovllm-tp-")
        store_path = os.path.join(self.handles.tmpdir, "store")  # fresh per engine: no fixed port or name
        ctx = mp.get_context("spawn")
        with self._guard(check_alive=False):
            for rank in range(1, tp):
                receiver, sender = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=worker_main,
                    args=(config, rank, tp, store_path, sender),
                    name=f"folovllm-tp-rank{rank}",
                    daemon=True,
                )
                p.start()
                sender.close()  # the child holds its end; ours closing lets EOF through if it dies
                self.handles.processes.append(p)
                self.handles.pipes.append(receiver)
            self._wait_started()
            logger.info("tensor parallelism: %d ranks (%s), workers started", tp, backend)
            group = init_tensor_parallel_group(file_store(store_path, tp), 0, tp, backend)
        if group.device_group is not group.cpu_group:  # NCCL: a dead peer would not be noticed
            threading.Thread(
                target=watch_workers,
                args=(self.handles, abort_on_worker_exit(group)),
                name="folovllm-tp-monitor",
                daemon=True,
            ).start()
        return group

    def _wait_started(self) -> None:
        """Block until every worker says it reached the rendezvous; raise as soon as one fails."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending := set(range(1, self.tp_size)) - self.handles.started:
            dead = [r for r in pending if not self.handles.processes[r - 1].is_alive()]
            if self.handles.errors or dead:
                raise RuntimeError(f"tensor-parallel worker(s) {sorted(self.handles.errors) or dead} failed")
            ready = wait(
                self.handles.pipes + [p.sentinel for p in self.handles.processes],
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if not ready:
                raise RuntimeError(f"tensor-parallel worker ranks {sorted(pending)} did not start in time")
            self._drain_pipes()

    def _drain_pipes(self) -> None:
        """Read what the workers sent: who has started, and the errors they reported."""
        for rank, pipe in enumerate(self.handles.pipes, start=1):
            with contextlib.suppress(EOFError, OSError):  # EOF: the worker is gone
                while pipe.poll():
                    kind, _, payload = pipe.recv()
                    if kind == "started":
                        self.handles.started.add(rank)
                    elif kind == "error":
                        self.handles.errors[rank] = payload

    def _join_torchrun(self) -> TensorParallelGroup:
        """Every rank of a torchrun job gets here; ranks > 0 serve the driver and never return."""
        config = self.config
        device = config.model_config.device
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", self.tp_size))
        check_devices(device.type, local_ranks, torch.cuda.device_count() if device.type == "cuda" else 0)
        set_device(config, int(os.environ.get("LOCAL_RANK", "0")))
        store, rank, world_size = next(dist.rendezvous("env://"))
        group = init_tensor_parallel_group(
            store, rank, world_size, config.parallel_config.distributed_backend
        )
        if rank != 0:
            worker = Worker(config, group)
            worker.run_loop()
            worker.close()
            raise SystemExit(0)
        logger.info("tensor parallelism under torchrun: %d ranks; this process is the driver", world_size)
        return group

    # ---- the model runner's interface --------------------------------------------------------------
    def execute_model(self, so: SchedulerOutput) -> torch.Tensor:
        """Send the step to the workers, run rank 0's shard; logits (num_seqs, vocab) from the gather."""
        arm_hang_dump(self.handles.hang_dump_s)
        with self._guard():
            if self.tp_size > 1:
                self.handles.group.broadcast_object(("execute_model", StepInput.from_scheduler_output(so)))
            return self.driver_worker.model_runner.execute_model(so)

    def collective_rpc(self, fn: Callable[..., Any], args: tuple = ()) -> list[Any]:
        """fn(worker, *args) on every rank (fn must be picklable: a module-level function); the
        results in rank order. For inspection and tests; a failure on any rank ends the engine."""
        with self._guard():
            if self.tp_size > 1:
                self.handles.group.broadcast_object(("collective_rpc", fn, args))
            return self.driver_worker.collective_rpc(fn, args)

    @property
    def driver_runner(self):
        if self.driver_worker is None:
            raise RuntimeError("the tensor-parallel engine has been shut down")
        return self.driver_worker.model_runner

    @property
    def num_blocks(self) -> int:
        return self.driver_runner.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.driver_runner.vocab_size

    def kv_cache_usage(self, num_tokens_held: list[int], num_used_blocks: int) -> KVCacheUsage:
        """Rank 0's cache (every rank holds the same blocks, each with its own KV heads)."""
        return self.driver_runner.kv_cache_usage(num_tokens_held, num_used_blocks)

    # ---- failure and shutdown ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, check_alive: bool = True):
        """Turn a broken collective into the failing worker's error; on any error stop every worker
        (they may be blocked in a collective that will never complete)."""
        if check_alive and self.driver_worker is None:
            raise RuntimeError(
                "the tensor-parallel engine has been shut down (after a failure or shutdown())"
            )
        try:
            yield
        except BaseException as e:
            # A broken collective is a RuntimeError; anything else is the driver's own error.
            failure = self._worker_failure(FAILURE_GRACE_S) if isinstance(e, RuntimeError) else None
            self.shutdown(graceful=False)
            if failure is not None:
                raise RuntimeError(failure) from e
            raise

    def _worker_failure(self, grace_s: float) -> str | None:
        """A message naming each worker that reported an error or died; waits up to `grace_s` for
        the first report. None when every worker is alive and silent (the driver failed)."""
        processes = self.handles.processes
        if processes and not self.handles.errors:
            wait(self.handles.pipes + [p.sentinel for p in processes], timeout=grace_s)
        self._drain_pipes()
        failures = []
        for rank, p in enumerate(processes, start=1):
            if rank in self.handles.errors:
                summary, detail = self.handles.errors[rank]
                failures.append(f"tensor-parallel worker rank {rank} failed: {summary}\n{detail}")
            elif p.exitcode not in (None, 0):
                failures.append(f"tensor-parallel worker rank {rank} died (exit code {p.exitcode})")
        return "\n".join(failures) if failures else None

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers and free rank 0's model; idempotent. The engine is unusable afterwards."""
        self.driver_worker = None
        detached = self._finalizer.detach()
        if detached is not None:
            _, fn, args, _ = detached
            fn(*args, graceful=graceful)
