"""Run a function on N ranks of a fresh gloo group: this process is rank 0, the others are spawned.

For looking at (and testing) the parallel layers outside the engine. The function is pickled by
name, so it must live in a module (not in a notebook); `layer_forward` is one:

    outs = run_on_ranks(layer_forward, 2, ColumnParallelLinear, (4, 8), [("weight", w, None)], x)
    # [rank 0's (n, 4), rank 1's (n, 4)]: rank r kept rows [4r, 4r + 4) of the full w (8, 4)
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from m5_tp.parallel_state import TensorParallelGroup, file_store, init_tensor_parallel_group

TIMEOUT = datetime.timedelta(seconds=120)


def _join(store_path: str, rank: int, world_size: int) -> TensorParallelGroup:
    return init_tensor_parallel_group(file_store(store_path, world_size), rank, world_size, "gloo", TIMEOUT)


def _rank_main(fn: Callable, rank: int, world_size: int, store_path: str, args: tuple) -> None:
    group = _join(store_path, rank, world_size)
    group.all_gather_object(fn(group, *args))


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """fn(group, *args) on every rank; the results in rank order. Processes of ranks 1..N-1 are
    joined (or killed) before this returns or raises."""
    tmpdir = tempfile.mkdtemp(prefix="folovllm-ranks-")
    store_path = os.path.join(tmpdir, "store")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, store_path, args), daemon=True)
        for r in range(1, world_size)
    ]
    for p in procs:
        p.start()
    try:
        group = _join(store_path, 0, world_size)
        return group.all_gather_object(fn(group, *args))
    finally:
        for p in procs:
            p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmpdir, ignore_errors=True)


def layer_forward(group: TensorParallelGroup, cls: type, args: tuple, loads: list, x):
    """cls(*args, tp_group=group), each (parameter name, full checkpoint tensor, shard id) of `loads`
    given to its weight_loader (which keeps this rank's slice), then the layer applied to x (a
    tensor, or a list of one input per rank: a row-parallel layer takes its slice of the features)."""
    x = x[group.rank] if isinstance(x, list) else x
    layer = cls(*args, tp_group=group)
    for name, tensor, shard_id in loads:
        layer.weight_loader(getattr(layer, name), tensor, shard_id)
    with torch.inference_mode():
        return layer(x)
