"""A worker: one rank's model runner, and the loop by which ranks 1..N-1 serve the driver.

The loop waits for the driver's next message on the gloo group (a broadcast from rank 0), runs it,
and waits again:

    ("execute_model", step_input)  -> run the step; the collectives inside pair up with the driver's
    ("collective_rpc", fn, args)   -> fn(worker, *args) on every rank; results gathered to all
    None                           -> leave the loop: the engine is shutting down

A worker process started by the driver reports any exception to it through a one-way pipe before
it exits, so that the driver can raise it with the rank's name instead of a bare "connection
closed" from the collective that was waiting on this rank. It also logs the traceback to its own
stderr first: with NCCL the driver may be blocked on the GPU, in a kernel waiting for this rank,
and read the pipe only after its monitor thread has aborted that kernel
(`m5_tp/executor.py::watch_workers`); the log is the first sign, and the only one if that fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

from m0_config.config import EngineConfig
from m0_config.logger import init_logger
from m0_config.sequence import Sequence
from m5_tp.hang_dump import arm_hang_dump, disarm_hang_dump, hang_dump_seconds
from m5_tp.model_runner import ModelRunner
from m5_tp.parallel_state import IDLE_TIMEOUT, TensorParallelGroup, file_store, init_tensor_parallel_group
from m5_tp.step_input import StepInput

logger = init_logger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, tp_group: TensorParallelGroup):
        self.config = config
        self.tp_group = tp_group
        self.rank = tp_group.rank
        self.model_runner = ModelRunner(config, tp_group)
        self.seqs: dict[int, Sequence] = {}  # the previous step's sequences, rebuilt from StepInputs
        self.hang_dump_s = hang_dump_seconds()  # FOLOVLLM_HANG_DUMP_S: stacks to stderr if a step stalls

    def execute_model(self, step: StepInput) -> torch.Tensor:
        """Logits on the driver; an empty tensor on the other ranks."""
        arm_hang_dump(self.hang_dump_s)
        return self.model_runner.execute_model(step.to_scheduler_output(self.seqs))

    def collective_rpc(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        """fn(self, *args) on this rank, then every rank's result, in rank order."""
        return self.tp_group.all_gather_object(fn(self, *args))

    def run_loop(self) -> None:
        """Serve the driver's messages until it says stop (None)."""
        while (message := self.tp_group.broadcast_object(None, src=0, timeout=IDLE_TIMEOUT)) is not None:
            method, *args = message
            getattr(self, method)(*args)

    def close(self) -> None:
        """The CUDA graphs first, then the communicators: NCCL's shutdown waits for every graph that
        captured one of its collectives to be destroyed (see ModelRunner.release_cudagraphs)."""
        self.model_runner.release_cudagraphs()
        self.tp_group.shutdown()


def set_device(config: EngineConfig, local_rank: int) -> None:
    """One GPU per rank of a machine: rank `local_rank` uses cuda:local_rank (nothing to do on a CPU)."""
    if config.model_config.device.type == "cuda":
        torch.cuda.set_device(local_rank)
        config.model_config.device = torch.device("cuda", local_rank)


def worker_main(config: EngineConfig, rank: int, world_size: int, store_path: str, errors) -> None:
    """Entry point of a spawned worker process (ranks 1..N-1 on the driver's machine)."""
    try:
        if config.model_config.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        set_device(config, rank)
        hang_dump_s = hang_dump_seconds()
        arm_hang_dump(hang_dump_s)  # start-up (load, profile, capture) counts as a step
        errors.send(("started", rank, None))  # from here on the driver may block in a collective
        store = file_store(store_path, world_size)
        backend = config.parallel_config.distributed_backend
        group = init_tensor_parallel_group(store, rank, world_size, backend)
        worker = Worker(config, group)
        worker.run_loop()
        worker.close()  # a hang here still dumps the stacks: the timer runs until the next line
        disarm_hang_dump(hang_dump_s)
    except BaseException as e:  # report anything, even KeyboardInterrupt, then exit
        # Bounded: a pipe holds ~64 KiB, and a driver that is gone never reads it.
        detail = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-16000:]
        logger.error("tensor-parallel worker rank %d failed:\n%s", rank, detail)
        with contextlib.suppress(OSError):  # the driver may be gone already
            errors.send(("error", rank, (f"{type(e).__name__}: {e}", detail)))
        os._exit(1)  # no atexit / finalizers: they could block on a broken group
    # The communicators are closed; leave without the interpreter's teardown, where destroying
    # torch's C++ objects in no particular order sometimes aborts ("terminate called without an
    # active exception", seen with gloo) and could block on NCCL.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
