"""Tensor-parallel scaling on a Qwen3-8B-shaped checkpoint (random weights, made locally): what
TP=2 buys over TP=1, and what its all-reduces cost per step. Prints one JSON line per measurement,
then a summary line.

    python -m benchmarks.tp_scaling                    # 2 GPUs, about 6-8 min with the checkpoint's writing
    python -m benchmarks.tp_scaling --skip-engine      # the NCCL micro-benchmark alone (~30 s)
    python -m benchmarks.tp_scaling --check --preset qwen3-0.6b   # NCCL + CUDA-graph sanity check

Three parts, each in processes of its own so that GPU memory is freed between them:

1. `engine` (one child per tp in --tp): the throughput workload of benchmarks/throughput.py
   (`make_workload`, one warm-up request, --scale), then m4's decode step replayed from its CUDA
   graph on every rank at once (`collective_rpc`) at several batch sizes: the step time with its
   all-reduces, to compare across tp.
2. `allreduce` (2 ranks over NCCL through the engine's own group, m5_tp.parallel_state): one
   all-reduce of a (num_tokens, hidden_size) bf16 tensor, eagerly and replayed from a CUDA graph
   (the decode path), for decode batch sizes and prefill token counts; one step launches
   2 * num_layers + 1 of them (two per decoder layer, one for the vocab-parallel embedding) and one
   gather of the logits (num_seqs, vocab / tp).
3. `--check`: the engine's communication skeleton with the engine's shapes, without the model:
   per batch-size bucket, largest first, one graph of 2 * num_layers + 1 all-reduces and the
   logits gather in one shared memory pool, then a few hundred steps that mix graph replays with
   eager "prefill" steps and check every sum. It tells an NCCL / CUDA-graph problem of the machine
   from one of the engine (see benchmarks/tp_hang_probe.sh).

Runs on a CPU too (--device cpu, gloo, no graphs: the replays run eagerly), for checking the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

from m0_config.toy import PRESETS, toy_checkpoint
from m5_tp.hang_dump import arm_hang_dump, hang_dump_seconds

DECODE_SIZES = [1, 8, 32, 64, 128, 256]  # m4 capture sizes (buckets) for max_num_seqs=256
PREFILL_SIZES = [512, 2048]  # 2048: the default token budget of a chunked-prefill step


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def elapsed_ms(fn, iters: int, device: torch.device) -> float:
    """Mean milliseconds of fn() over `iters` calls after 5 warm-up calls (CUDA events on a GPU)."""
    for _ in range(5):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / iters


# ---- 1. the engine at one tp (a child process) ----------------------------------------------------
def time_decode_steps(worker, batch_sizes: list[int], context: int) -> dict[int, float]:
    """On every rank at once (collective_rpc): ms of one decode-graph replay per batch size, every
    row at position `context`. The ranks replay the same graphs in the same order, so their
    all-reduces pair up."""
    from benchmarks.decode_step import fill_batch

    runner = worker.model_runner
    times = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            fill_batch(runner, bs, context)
            graph = runner.graphs.get(bs)
            step = graph.replay if graph is not None else (lambda bs=bs: runner.forward_decode_static(bs))
            times[bs] = round(elapsed_ms(step, 30, runner.device), 4)
    return times


def engine_child(args) -> None:
    from transformers import AutoConfig

    from benchmarks.throughput import _sync, make_workload
    from m0_config.sampling_params import SamplingParams
    from m5_tp import LLM

    tp = args.engine_child
    prompts, params = make_workload(args.scale, AutoConfig.from_pretrained(args.model).vocab_size)
    start = time.perf_counter()
    llm = LLM(args.model, tensor_parallel_size=tp, **({"device": args.device} if args.device else {}))
    startup = time.perf_counter() - start
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up, as in throughput.py
    _sync()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    _sync()
    seconds = time.perf_counter() - start
    tokens = sum(sp.max_tokens for sp in params)
    emit({
        "benchmark": "tp_throughput", "tp": tp, "scale": args.scale, "requests": len(prompts),
        "output_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "startup_s": round(startup, 1), "model": args.model,
    })  # fmt: skip
    if llm.llm_engine.model_runner.driver_runner.use_static_decode:
        per_rank = llm.collective_rpc(time_decode_steps, (args.batch_sizes, args.context))
        for bs in args.batch_sizes:
            emit({
                "benchmark": "tp_decode_step", "tp": tp, "batch_size": bs, "context": args.context,
                "graph_ms": per_rank[0][bs], "graph_ms_per_rank": [r[bs] for r in per_rank],
            })  # fmt: skip
    llm.shutdown()


# ---- 2 and 3. two ranks over NCCL (or gloo on a CPU) ------------------------------------------------
def model_dims(args) -> dict:
    cfg = PRESETS[args.preset]
    layers = args.layers or cfg["num_hidden_layers"]
    return dict(hidden=cfg["hidden_size"], layers=layers, vocab=cfg["vocab_size"], per_step=2 * layers + 1)


def allreduce_times(group, device: torch.device, dims: dict, args) -> None:
    """Rank 0 emits one line per size: eager and in-graph time of one all-reduce, and per step."""
    graphs = device.type == "cuda"
    for n in args.batch_sizes + args.prefill_tokens:
        arm_hang_dump(args.hang_dump_s)
        x = torch.zeros(n, dims["hidden"], dtype=torch.bfloat16, device=device)  # (num_tokens, hidden)
        eager = elapsed_ms(lambda x=x: group.all_reduce(x), args.iters, device)
        in_graph = None
        if graphs and n in args.batch_sizes:  # decode steps replay their all-reduces from a graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(dims["per_step"]):
                    group.all_reduce(x)
            in_graph = elapsed_ms(graph.replay, max(3, args.iters // 10), device) / dims["per_step"]
            del graph
        per_op = in_graph if in_graph is not None else eager
        if group.rank == 0:
            emit({
                "benchmark": "tp_allreduce", "tp": group.world_size, "num_tokens": n,
                "hidden_size": dims["hidden"], "bytes": x.numel() * x.element_size(),
                "eager_us": round(eager * 1e3, 2), "graph_us": None if in_graph is None else round(in_graph * 1e3, 2),
                "allreduces_per_step": dims["per_step"], "ms_per_step": round(per_op * dims["per_step"], 3),
            })  # fmt: skip
    vocab_per_rank = -(-dims["vocab"] // group.world_size)
    for n in args.batch_sizes:  # the logits gather: each sequence's last token only
        local = torch.zeros(n, vocab_per_rank, dtype=torch.bfloat16, device=device)
        gather = elapsed_ms(lambda local=local: group.gather(local, dst=0), args.iters, device)
        if group.rank == 0:
            emit({"benchmark": "tp_gather_logits", "tp": group.world_size, "num_seqs": n,
                  "bytes_per_rank": local.numel() * 2, "eager_us": round(gather * 1e3, 2)})  # fmt: skip


def skeleton_step(group, h: torch.Tensor, dims: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What one engine step communicates, on (n, hidden) inputs equal on every rank: 2L+1 all-reduces
    whose inputs are fresh tensors (each rank contributes 1/world of the same value, so the sum
    gives it back exactly), then the gather of (n, vocab / world) "logits" that depend on them
    (rank r's columns hold r). Returns (hidden, logits on rank 0 / None)."""
    share = 1.0 / group.world_size
    for _ in range(dims["per_step"]):
        h = group.all_reduce(h * share)
    per_rank = -(-dims["vocab"] // group.world_size)
    local = (h[:, :1] * 0 + group.rank).expand(h.shape[0], per_rank).contiguous()
    return h, group.gather(local, dst=0, dim=-1)


def check_step(group, h, logits, value: float) -> bool:
    ok = bool(torch.all(h == value))  # a host sync per step, as the sampler's
    if logits is not None:
        per_rank = logits.shape[1] // group.world_size
        expected = torch.arange(group.world_size, device=h.device).repeat_interleave(per_rank)
        ok &= bool(torch.all(logits == expected.to(logits.dtype)))
    return ok


def graph_check(group, device: torch.device, dims: dict, args) -> None:
    """The engine's communication skeleton: graphs per bucket (largest first, one pool), then steps
    that mix replays with eager prefill steps, every result checked; rank 0 emits the verdict."""
    from m4_cudagraph.buckets import capture_sizes

    buckets = capture_sizes(args.max_num_seqs)
    max_bs, graphs_on = buckets[-1], device.type == "cuda"
    x = torch.zeros(max_bs, dims["hidden"], dtype=torch.bfloat16, device=device)  # static input
    h_out = torch.zeros_like(x)
    logits_out = torch.zeros(max_bs, -(-dims["vocab"] // group.world_size) * group.world_size,
                             dtype=torch.bfloat16, device=device) if group.rank == 0 else None  # fmt: skip
    replay, graphs, pool, start = {}, [], None, time.perf_counter()

    def body(bs: int):
        h, logits = skeleton_step(group, x[:bs], dims)
        h_out[:bs].copy_(h)
        if logits is not None:
            logits_out[:bs].copy_(logits)

    for bs in reversed(buckets):
        arm_hang_dump(args.hang_dump_s)  # each capture and each step counts as progress
        x[:bs].fill_(1.0)
        body(bs)  # warm-up, as m4 does before each capture
        if graphs_on:
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                body(bs)
            pool = pool or graph.pool()
            graphs.append(graph)
            replay[bs] = graph.replay
        else:
            replay[bs] = lambda bs=bs: body(bs)
    capture_s = time.perf_counter() - start
    try:
        failures, eager_steps, seconds = checked_steps(
            group, device, dims, args, buckets, x, replay, h_out, logits_out
        )
    finally:
        for graph in graphs:
            graph.reset()  # before the communicator's shutdown, which would otherwise wait for them
    total = torch.tensor([failures], dtype=torch.int64)
    group.cpu_group.allreduce([total]).wait()  # every rank's failures
    if group.rank == 0:
        emit({
            "benchmark": "tp_graph_check", "ok": int(total.item()) == 0, "failed_steps": int(total.item()),
            "steps": args.steps, "eager_steps": eager_steps, "graphs": len(graphs),
            "collectives_per_graph": dims["per_step"] + 1, "capture_s": round(capture_s, 2),
            "steps_s": round(seconds, 2), "dims": dims,
        })  # fmt: skip


def checked_steps(group, device, dims, args, buckets, x, replay, h_out, logits_out) -> tuple[int, int, float]:
    """(failed steps, eager steps, seconds): decode steps replay their padded bucket, about one in
    five is an eager prefill step of some token count; the same choices on every rank (one seed),
    as the driver's scheduler makes them for all."""
    from m4_cudagraph.buckets import pick_bucket

    max_bs = buckets[-1]
    rng, failures, eager_steps, start = random.Random(0), 0, 0, time.perf_counter()
    for i in range(args.steps):
        arm_hang_dump(args.hang_dump_s)
        value = float(i % 7 + 1)
        if rng.random() < 0.2:  # a prefill (or mixed) step: eager, any token count
            n = rng.choice([1, 3, 37, 512, 2048])
            h, logits = skeleton_step(
                group, torch.full((n, dims["hidden"]), value, dtype=x.dtype, device=device), dims
            )
            eager_steps += 1
        else:  # a decode step: pad the batch to its bucket and replay
            n = pick_bucket(buckets, rng.randint(1, max_bs))
            x[:n].fill_(value)
            replay[n]()
            h, logits = h_out[:n], logits_out[:n] if logits_out is not None else None
        failures += not check_step(group, h, logits, value)
    return failures, eager_steps, time.perf_counter() - start


def nccl_rank(rank: int, world: int, store_path: str, args) -> None:
    from m5_tp.parallel_state import file_store, init_tensor_parallel_group

    args.hang_dump_s = hang_dump_seconds()  # FOLOVLLM_HANG_DUMP_S: where a rank waits, if it does
    arm_hang_dump(args.hang_dump_s)
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    backend = "nccl" if device.type == "cuda" else "gloo"
    group = init_tensor_parallel_group(file_store(store_path, world), rank, world, backend)
    try:
        dims = model_dims(args)
        group.all_reduce(torch.zeros(1, device=device))  # connect before timing
        with torch.inference_mode():
            (graph_check if args.check else allreduce_times)(group, device, dims, args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no NCCL teardown: graphs this traceback still holds would block it for good
    group.shutdown()  # every graph is gone by now (NCCL waits for those that captured its collectives)


def nccl_child(args) -> None:
    tmpdir = tempfile.mkdtemp(prefix="folovllm-tp-scaling-")
    try:
        torch.multiprocessing.spawn(nccl_rank, args=(2, os.path.join(tmpdir, "store"), args), nprocs=2)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# ---- the orchestrator ---------------------------------------------------------------------------
def run_child(child_args: list[str], timeout: float) -> list[dict]:
    """Run this module again with `child_args` in a session of its own (so that a timeout kills its
    worker processes too); relay its output as it comes; return its JSON lines."""
    cmd = [sys.executable, "-m", "benchmarks.tp_scaling", *child_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    records = []

    def relay() -> None:  # stderr (logs, stack dumps) goes straight through
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:  # a hang: kill the child and its workers
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        emit(
            {"benchmark": "tp_scaling_child", "args": child_args, "error": f"timed out after {timeout:.0f} s"}
        )
    reader.join(5.0)
    if proc.returncode and proc.returncode != -signal.SIGKILL:
        emit({"benchmark": "tp_scaling_child", "args": child_args, "error": f"exit code {proc.returncode}"})
    return records


def summary(records: list[dict], dims: dict) -> dict:
    """TP=1 versus TP=2 throughput, and per decode batch size the step time at each tp and what its
    all-reduces take of TP=2's step."""
    by = lambda kind: [r for r in records if r.get("benchmark") == kind]  # noqa: E731
    tput = {r["tp"]: r["tokens_per_s"] for r in by("tp_throughput")}
    steps = {(r["tp"], r["batch_size"]): r["graph_ms"] for r in by("tp_decode_step")}
    comm = {r["num_tokens"]: r["ms_per_step"] for r in by("tp_allreduce")}
    gather = {r["num_seqs"]: r["eager_us"] / 1e3 for r in by("tp_gather_logits")}
    decode = {}
    for bs in sorted({b for _, b in steps} | set(comm)):
        row = {f"tp{tp}_step_ms": steps.get((tp, bs)) for tp in (1, 2)}
        row["allreduce_ms_per_step"] = comm.get(bs)
        row["gather_ms"] = None if bs not in gather else round(gather[bs], 3)
        if row["tp2_step_ms"] and row["allreduce_ms_per_step"]:
            row["allreduce_share_of_tp2_step"] = round(row["allreduce_ms_per_step"] / row["tp2_step_ms"], 3)
        decode[bs] = row
    speedup = round(tput[2] / tput[1], 3) if 1 in tput and 2 in tput else None
    return {"benchmark": "tp_scaling_summary", "tokens_per_s": tput, "tp2_speedup": speedup,
            "allreduces_per_step": dims["per_step"], "decode": decode}  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", default="qwen3-8b", help="shape of the toy checkpoint and of the micro-benchmark"
    )
    p.add_argument("--model", help="checkpoint folder (default: the preset's toy, written once and cached)")
    p.add_argument("--scale", type=float, default=0.5, help="throughput workload size (1.0: 256 requests)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=DECODE_SIZES)
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=PREFILL_SIZES)
    p.add_argument("--context", type=int, default=512, help="tokens before each decoded one (decode step)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per child process")
    p.add_argument("--device", default=None, help="cpu: gloo and no graphs, for checking the script")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-allreduce", action="store_true")
    p.add_argument("--check", action="store_true", help="the NCCL + CUDA-graph skeleton check only")
    p.add_argument("--steps", type=int, default=300, help="--check: steps after the capture")
    p.add_argument("--max-num-seqs", type=int, default=256, help="--check: buckets up to this size")
    p.add_argument("--engine-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--nccl-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.engine_child:
        return engine_child(args)
    if args.nccl_child or args.check:
        return nccl_child(args)
    passed = list(argv if argv is not None else sys.argv[1:])
    records = []
    if not args.skip_engine:
        model = args.model or toy_checkpoint("qwen3", preset=args.preset, dtype="bfloat16")
        for tp in args.tp:
            records += run_child([*passed, "--model", model, "--engine-child", str(tp)], args.timeout)
    if not args.skip_allreduce:
        records += run_child([*passed, "--nccl-child"], args.timeout)
    emit(summary(records, model_dims(args)))


if __name__ == "__main__":
    main()
