"""Decode step time, eager versus CUDA-graph replay, at several batch sizes (m4's runner only: the
model forward of one decode step, no scheduling or sampling). Every row attends to a context of
`--context` tokens already in the cache. Prints one JSON line.

    python -m benchmarks.decode_step --preset qwen3-0.6b --batch-sizes 1 8 64 256
"""

from __future__ import annotations

import argparse
import json

import torch

from m0_config.toy import toy_checkpoint


def fill_batch(runner, bs: int, context: int) -> None:
    """Static buffers for `bs` rows, each at position `context` with its own blocks."""
    b, size = runner.buffers, runner.block_size
    blocks_per_row = -(-(context + 1) // size)
    tables = torch.arange(bs * blocks_per_row, dtype=torch.int32).view(bs, blocks_per_row) % runner.num_blocks
    b.block_tables[:bs, :blocks_per_row].copy_(tables)
    b.input_ids[:bs].fill_(7)
    b.positions[:bs].fill_(context)
    b.seq_lens[:bs].fill_(context + 1)
    b.slot_mapping[:bs].copy_(tables[:, context // size].long() * size + context % size)


def time_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def count_kernels(fn) -> int:
    """GPU kernels one call of `fn` launches (eagerly), from the profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def kernel_times(prof, steps: int) -> dict[str, tuple[float, float]]:
    """{kernel name: (launches, GPU microseconds) per step} from a torch profiler that ran `steps`
    steps (the profiler sees the kernels inside graph replays too), largest time first."""
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name.setdefault(e.name[:60], []).append(e.device_time)
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    return {name: (len(t) / steps, sum(t) / steps) for name, t in rows}


def kernel_breakdown(graph, replays: int = 20, top: int = 12) -> dict:
    """GPU time per replay of a captured step, by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    times = kernel_times(prof, replays)
    return {
        "kernels_per_step": sum(n for n, _ in times.values()),
        "busy_us": round(sum(us for _, us in times.values()), 1),
        "top": [
            {"name": k, "count": round(n), "us": round(us, 1)} for k, (n, us) in list(times.items())[:top]
        ],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model")
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--profile", action="store_true", help="also: GPU time per kernel name in a replay")
    args = p.parse_args(argv)
    from m4_cudagraph import LLM

    model = args.model or toy_checkpoint("qwen3", preset=args.preset, dtype="bfloat16")
    llm = LLM(model, max_num_seqs=max(args.batch_sizes), max_model_len=max(4096, args.context + 1))
    runner = llm.llm_engine.model_runner
    rows = {}
    with torch.inference_mode():
        for bs in args.batch_sizes:
            fill_batch(runner, bs, args.context)
            eager = time_ms(lambda bs=bs: runner.forward_decode_static(bs))
            graph = time_ms(runner.graphs[bs].replay)
            rows[bs] = {
                "kernels": count_kernels(lambda bs=bs: runner.forward_decode_static(bs)),
                "eager_ms": round(eager, 3),
                "graph_ms": round(graph, 3),
                "speedup": round(eager / graph, 2),
            }
            if args.profile:
                rows[bs]["profile"] = kernel_breakdown(runner.graphs[bs])
    result = {
        "benchmark": "decode_step",
        "context": args.context,
        "device": torch.cuda.get_device_name(),
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
