"""A worker: one rank's model runner, and the loop by which ranks 1..N-1 serve the driver.

The loop waits for the driver's next message on the gloo group (a broadcast from rank 0), runs it,
and waits again:

    ("execute_model", step_input)  -> run the step; the collectives inside pair up with the driver's
    ("collective_rpc", fn, args)   -> fn(worker, *args) on every rank; results gathered to all
    None                           -> leave the loop: the engine is shutting down

A worker process started by the driver reports any exception to it through a one-way pipe before
it exits, so that the driver can raise it with the rank's name instead of a bare "connection
closed" from the collective that was waiting on this rank.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch

from m0_config.config import EngineConfig
from m0_config.sequence import Sequence
from m5_tp.model_runner import ModelRunner
from m5_tp.parallel_state import IDLE_TIMEOUT, TensorParallelGroup, file_store, init_tensor_parallel_group
from m5_tp.step_input import StepInput


class Worker:
    def __init__(self, config: EngineConfig, tp_group: TensorParallelGroup):
        self.config = config
        self.tp_group = tp_group
        self.rank = tp_group.rank
        self.model_runner = ModelRunner(config, tp_group)
        self.seqs: dict[int, Sequence] = {}  # the previous step's sequences, rebuilt from StepInputs

    def execute_model(self, step: StepInput) -> torch.Tensor:
        """Logits on the driver; an empty tensor on the other ranks."""
        return self.model_runner.execute_model(step.to_scheduler_output(self.seqs))

    def collective_rpc(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        """fn(self, *args) on this rank, then every rank's result, in rank order."""
        return self.tp_group.all_gather_object(fn(self, *args))

    def run_loop(self) -> None:
        """Serve the driver's messages until it says stop (None)."""
        while (message := self.tp_group.broadcast_object(None, src=0, timeout=IDLE_TIMEOUT)) is not None:
            method, *args = message
            getattr(self, method)(*args)


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
        errors.send(("started", rank, None))  # from here on the driver may block in a collective
        store = file_store(store_path, world_size)
        backend = config.parallel_config.distributed_backend
        group = init_tensor_parallel_group(store, rank, world_size, backend)
        Worker(config, group).run_loop()
    except BaseException as e:  # report anything, even KeyboardInterrupt, then exit
        # Bounded: a pipe holds ~64 KiB, and a driver that is gone never reads it.
        detail = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-16000:]
        with contextlib.suppress(OSError):  # the driver may be gone already
            errors.send(("error", rank, (f"{type(e).__name__}: {e}", detail)))
        os._exit(1)  # no atexit / finalizers: they could block on a broken group
