"""What keeps the end of an engine, or a failure on one rank, from turning into a silent hang
under NCCL: every rank destroys its CUDA graphs before its communicator (NCCL waits for them
otherwise); the driver watches its workers (a peer that is gone is not noticed by NCCL: the other
rank's kernel just waits); after a failure the communicator is aborted, not drained; and the
opt-in stack dumps show where a rank waits. The NCCL side is a fake here; what is checked is the
order and the wiring, on real processes."""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from m5_tp import LLM
from m5_tp.executor import WorkerHandles, abort_on_worker_exit, watch_workers
from m5_tp.hang_dump import HANG_DUMP_ENV, hang_dump_seconds
from m5_tp.parallel_state import TensorParallelGroup

pytestmark = pytest.mark.m5


class FakeNCCLGroup:
    """Records what the TP group asks of its device group (a ProcessGroupNCCL on a GPU)."""

    def __init__(self, fail: bool = False, events=None):
        self.calls = [] if events is None else events
        self.fail = fail

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def abort(self) -> None:
        self.calls.append("abort")
        if self.fail:
            raise RuntimeError("already aborted")


class FileEvents:
    """A list that a worker process fills and the test reads back: one line per event."""

    def __init__(self, path: str):
        self.path = path

    def append(self, event: str) -> None:
        with open(self.path, "a") as f:
            f.write(event + "\n")


class FakeGraph:
    def __init__(self, events):
        self.events = events

    def reset(self) -> None:
        self.events.append("graph reset")


def install_fake_graphs_and_nccl(worker, log_dir: str):
    """On every rank (collective_rpc): two captured "graphs" and an "NCCL" device group, both
    logging into the rank's own file."""
    events = FileEvents(os.path.join(log_dir, f"rank{worker.rank}"))
    worker.model_runner.graphs = {1: FakeGraph(events), 2: FakeGraph(events)}
    object.__setattr__(worker.tp_group, "device_group", FakeNCCLGroup(events=events))  # a frozen dataclass


def test_every_rank_releases_its_graphs_before_its_communicator(qwen3_dir, tmp_path):
    """The TP=2 throughput benchmark hung after its last step: it dropped its LLM without
    shutdown(), the finalizer shut NCCL down while rank 0's runner, and with it the decode graphs
    holding the communicator, was still alive, and NCCL (>= 2.26) waits for those graphs forever.
    Here the engine is dropped the same way; on both ranks the graphs must go first."""
    llm = LLM(qwen3_dir, tensor_parallel_size=2, block_size=4)
    workers = list(llm.llm_engine.model_runner.handles.processes)
    assert llm.collective_rpc(install_fake_graphs_and_nccl, (str(tmp_path),)) == [None, None]
    del llm
    gc.collect()
    for p in workers:
        p.join(10.0)
    assert [p.exitcode for p in workers] == [0]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text().split() == [
            "graph",
            "reset",
            "graph",
            "reset",
            "shutdown",
        ]


def test_shutdown_drains_at_a_normal_end_and_aborts_after_a_failure():
    nccl = FakeNCCLGroup()
    group = TensorParallelGroup(0, 2, device_group=nccl, cpu_group=object())
    group.shutdown()
    group.shutdown(graceful=False)
    group.abort()
    assert nccl.calls == ["shutdown", "abort", "abort"]

    gloo = FakeNCCLGroup()  # on a CPU the device group is the gloo group itself: nothing to release
    TensorParallelGroup(0, 2, device_group=gloo, cpu_group=gloo).shutdown(graceful=False)
    assert gloo.calls == []


def test_abort_on_worker_exit_aborts_and_tolerates_a_second_abort():
    nccl = FakeNCCLGroup(fail=True)
    on_exit = abort_on_worker_exit(TensorParallelGroup(0, 2, device_group=nccl, cpu_group=object()))
    on_exit(1)  # the communicator may be aborted already (by the driver's own failure path)
    assert nccl.calls == ["abort"]


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_monitor_reports_a_worker_that_ends_unasked_but_not_a_stop():
    ctx = mp.get_context("spawn")
    # rank 1 runs until stopped; rank 2 dies on its own (say, the OOM killer)
    procs = [ctx.Process(target=time.sleep, args=(60,)), ctx.Process(target=os._exit, args=(3,))]
    handles = WorkerHandles(processes=procs)
    for p in procs:
        p.start()
    ended: list[int] = []
    monitor = threading.Thread(target=watch_workers, args=(handles, ended.append), daemon=True)
    monitor.start()
    try:
        assert _wait_for(lambda: ended == [2])
        handles.stopping.set()  # what stop_workers does first
        procs[0].terminate()
        monitor.join(10.0)
        assert not monitor.is_alive()  # it returns once every worker has ended
        assert ended == [2]  # the stopped rank 1 is not a failure
        assert procs[1].exitcode == 3  # the exit code is still there for the driver's report
    finally:
        for p in procs:
            p.kill()
            p.join()


def test_hang_dump_seconds_from_the_environment():
    assert hang_dump_seconds({}) is None
    assert hang_dump_seconds({HANG_DUMP_ENV: ""}) is None
    assert hang_dump_seconds({HANG_DUMP_ENV: "0"}) is None
    assert hang_dump_seconds({HANG_DUMP_ENV: "2.5"}) == 2.5
    with pytest.raises(ValueError, match=HANG_DUMP_ENV):
        hang_dump_seconds({HANG_DUMP_ENV: "-1"})


def test_hang_dump_prints_every_threads_stack_and_keeps_running():
    """A process stuck past the interval writes where it is to stderr, then carries on; re-arming
    (what every step does) postpones the dump."""
    path = importlib.util.find_spec("m5_tp.hang_dump").origin
    code = textwrap.dedent(
        f"""
        import importlib.util, time
        spec = importlib.util.spec_from_file_location("hang_dump", {path!r})
        hd = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hd)

        def a_step_that_is_fast():
            time.sleep(0.1)

        def a_step_that_waits_for_a_peer():
            time.sleep(1.0)

        for _ in range(5):  # 0.5 s in all, but never 0.4 s without re-arming
            hd.arm_hang_dump(0.4)
            a_step_that_is_fast()
        hd.arm_hang_dump(0.4)
        a_step_that_waits_for_a_peer()
        hd.disarm_hang_dump(0.4)
        print("still running")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running"
    assert "a_step_that_waits_for_a_peer" in done.stderr
    assert "a_step_that_is_fast" not in done.stderr


def test_a_failed_capture_releases_the_graphs_it_made(qwen3_dir):
    """A capture that fails part-way (here: no CUDA at all) leaves no graph behind to block the
    abort that follows."""
    llm = LLM(qwen3_dir, block_size=4)  # TP=1 on the CPU: one process
    runner = llm.llm_engine.model_runner.driver_runner
    events: list[str] = []
    runner.graphs = {8: FakeGraph(events)}  # as if the larger buckets had been captured already
    with pytest.raises(ValueError, match="cuda"):
        runner.capture_cudagraphs()
    assert events == ["graph reset"] and runner.graphs == {} and not runner.use_static_decode
    llm.shutdown()
