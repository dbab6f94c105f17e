"""Where does an engine step spend its time? Runs the throughput workload and times each phase of
`LLMEngine.step` (schedule, model, sample + append + stop checks, scheduler update), synchronizing
the GPU after the model so its time is not charged to the next phase.

With async scheduling (m4 on a GPU, the default there) nothing is synchronized: the phases are the
host's own time (schedule, launch = inputs + graph replay + sampler launch, resolve = reading the
previous step's tokens and appending them) and `wait`, the time the host sits blocked on the
previous step's GPU work. A large `wait` means the GPU sets the pace; none means the host does.

`--gpu-timeline` (async engines) instead records a CUDA event before and after each launched step:
the GPU's own time per step (split into prefill-carrying and decode-only steps) and the gaps in which
it sat idle waiting for the host. Busy + idle = the run's GPU wall time.

    python -m benchmarks.profile_steps --milestone m4_cudagraph --preset qwen3-0.6b --scale 0.25
    python -m benchmarks.profile_steps --preset qwen3-0.6b --scale 1.0 --gpu-timeline
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import time

import torch

from benchmarks.decode_step import kernel_times
from benchmarks.throughput import make_workload
from m0_config.toy import toy_checkpoint


def _timed(phases, name, fn, sync: bool = True):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        phases[name] += time.perf_counter() - start
        return result

    return wrapper


def record_gpu_timeline(engine) -> list:
    """Wrap `engine._launch` to put a CUDA event before and after each step's GPU work; returns the
    list it fills with (start, end, has_prefill, num_seqs, tokens in the sequences' contexts)."""
    events, launch = [], engine._launch

    def timed_launch(so):
        has_prefill = any(seq.is_prefill for seq in so.seqs)  # the explicit flag, read before the step
        kv_tokens = sum(seq.get_len() for seq in so.seqs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = launch(so)
        end.record()
        events.append((start, end, has_prefill, len(so.seqs), kv_tokens))
        return result

    engine._launch = timed_launch
    return events


def summarize_timeline(events, kv_bytes_per_token: int) -> dict:
    """GPU busy time by kind of step and the idle gaps between steps, in seconds."""
    torch.cuda.synchronize()
    busy = collections.Counter()
    steps = collections.Counter()
    idle = collections.Counter()  # by the kind of step the GPU was waiting for
    gaps = []  # (ms, step index, kind, num_seqs)
    kv_bytes = collections.Counter()
    for i, (start, end, prefill, num_seqs, kv_tokens) in enumerate(events):
        kind = (
            "prefill"
            if prefill
            else f"decode_bs{'<=16' if num_seqs <= 16 else '<=64' if num_seqs <= 64 else '>64'}"
        )
        busy[kind] += start.elapsed_time(end) / 1e3
        steps[kind] += 1
        kv_bytes[kind] += kv_tokens * kv_bytes_per_token
        if i:
            gap = max(0.0, events[i - 1][1].elapsed_time(start) / 1e3)
            idle[kind] += gap
            gaps.append((round(gap * 1e3, 3), i, kind, num_seqs))
    return {
        "gpu_busy_s": {k: round(v, 3) for k, v in busy.items()},
        "steps": dict(steps),
        "kv_cache_read_GB": {k: round(v / 1e9, 1) for k, v in kv_bytes.items()},
        "gpu_busy_total_s": round(sum(busy.values()), 3),
        "gpu_idle_between_steps_s": round(sum(idle.values()), 3),
        "gpu_idle_before_s": {k: round(v, 3) for k, v in idle.items()},
        # a few long stalls or a little every step? (ms per gap: count, total ms)
        "gpu_idle_gaps_ms": {
            label: [sum(lo <= g[0] < hi for g in gaps), round(sum(g[0] for g in gaps if lo <= g[0] < hi), 1)]
            for label, lo, hi in (
                ("<0.05", 0, 0.05),
                ("0.05-0.5", 0.05, 0.5),
                ("0.5-2", 0.5, 2),
                (">=2", 2, 1e9),
            )
        },
        "gpu_idle_longest_gaps": sorted(gaps, reverse=True)[:12],  # (ms, step, kind, num_seqs)
        "gpu_span_s": round(events[0][0].elapsed_time(events[-1][1]) / 1e3, 3),
    }


def kv_bytes_per_token(engine) -> int:
    return engine.config.model_config.kv_cache_bytes_per_token()


def profile_kernels(engine, first_step: int, num_steps: int) -> dict:
    """Wrap `engine.step` so that steps [first_step, first_step + num_steps) run under the torch
    profiler; returns the dict it fills with GPU time per kernel name per step and the KV bytes."""
    from torch.profiler import ProfilerActivity, profile

    report, step, count = {}, engine.step, [0]
    kv_tokens, launch = [0], engine._launch
    prof = profile(activities=[ProfilerActivity.CUDA])

    def counting_launch(so):
        if first_step <= count[0] < first_step + num_steps:
            kv_tokens[0] += sum(seq.get_len() for seq in so.seqs)
            report.setdefault("batch_sizes", []).append(len(so.seqs))
        return launch(so)

    def profiled_step():
        if count[0] == first_step:
            torch.cuda.synchronize()
            prof.start()
        out = step()
        count[0] += 1
        if count[0] == first_step + num_steps:
            torch.cuda.synchronize()
            prof.stop()
            times = kernel_times(prof, num_steps)
            report["kernel_us_per_step"] = {k: round(us, 1) for k, (_, us) in list(times.items())[:14]}
            report["gpu_kernel_us_per_step"] = round(sum(us for _, us in times.values()), 1)
            report["kv_GB_per_step"] = round(kv_tokens[0] * kv_bytes_per_token(engine) / num_steps / 1e9, 3)
        return out

    engine.step, engine._launch = profiled_step, counting_launch
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--milestone", default="m4_cudagraph")
    p.add_argument("--model")
    p.add_argument("--preset", default=None)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--llm-kwargs", default="{}")
    p.add_argument("--gpu-timeline", action="store_true", help="CUDA events per step (async engines)")
    p.add_argument("--kernel-profile", type=int, nargs=2, metavar=("FIRST_STEP", "STEPS"), default=None)
    args = p.parse_args(argv)
    model = args.model or toy_checkpoint(
        "qwen3", **({"preset": args.preset, "dtype": "bfloat16"} if args.preset else {})
    )
    from transformers import AutoConfig

    prompts, params = make_workload(args.scale, AutoConfig.from_pretrained(model).vocab_size)
    llm = importlib.import_module(args.milestone).LLM(model, **json.loads(args.llm_kwargs))
    llm.generate(["warm-up"], params[0], use_tqdm=False)
    engine, phases = llm.llm_engine, collections.Counter()
    is_async = getattr(engine, "async_scheduling", False)
    timeline = record_gpu_timeline(engine) if args.gpu_timeline else None
    kernels = profile_kernels(engine, *args.kernel_profile) if args.kernel_profile else None
    if timeline is None and kernels is None:
        _wrap_phases(engine, phases, is_async)
    steps = 0
    original_step = engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return original_step()

    engine.step = counting_step
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    result = {
        "milestone": args.milestone,
        "steps": steps,
        "seconds": round(total, 3),
        "tokens_per_s": round(sum(sp.max_tokens for sp in params) / total, 1),
        "async_scheduling": is_async,
    }
    if timeline is not None:
        result.update(summarize_timeline(timeline, kv_bytes_per_token(engine)))
        # host time before the first step reached the GPU and after the last one finished
        result["wall_outside_gpu_span_s"] = round(total - result["gpu_span_s"], 3)
    if kernels is not None:
        result["kernel_profile"] = kernels
    if timeline is None and kernels is None:
        result["ms_per_step"] = {k: round(1000 * v / steps, 3) for k, v in phases.items()}
        result["ms_per_step_other"] = round(
            1000 * (total - sum(v for k, v in phases.items() if k != "wait")) / steps, 3
        )
    print(json.dumps(result))
    return result


def _wrap_phases(engine, phases, is_async: bool) -> None:
    """Instance attributes shadow the methods for this benchmark run only."""
    engine.scheduler.schedule = _timed(phases, "schedule", engine.scheduler.schedule, not is_async)
    engine.scheduler.update_from_output = _timed(
        phases, "update", engine.scheduler.update_from_output, not is_async
    )
    if is_async:
        engine._launch = _timed(phases, "launch", engine._launch, sync=False)
        engine._resolve = _timed(phases, "resolve (incl. wait)", engine._resolve, sync=False)
        original_wait = engine._wait_for
        engine._wait_for = _timed(phases, "wait", original_wait, sync=False)
    else:
        engine.model_runner.execute_model = _timed(phases, "model", engine.model_runner.execute_model)
        engine._sample_and_append = _timed(phases, "sample+append", engine._sample_and_append)


if __name__ == "__main__":
    main()
