"""Host (CPU/Python) time of one engine step, with the model replaced by random logits.

On a GPU a decode step of a small model takes a few milliseconds; whatever the engine does in
Python around it (scheduling, input preparation, sampling metadata, appending tokens, stop checks,
freeing blocks) adds to that unless it is far smaller. This benchmark runs the real m4 engine on
the CPU over nano-vllm's throughput workload, with `execute_model` replaced by a stub that still
prepares the inputs exactly as m4's runner does (`host_decode_inputs` into the static buffers for
decode batches, `prepare_inputs` for steps with prefill) but skips the forward pass and returns
random logits from its own generator. Everything else is the engine's own code, so the time per
step is the host overhead the engine adds to every GPU step.

The logits are only `--logits-width` columns wide (default 64; sampled ids stay valid tokens), so
that the CPU's arithmetic on them stays small next to the Python work being measured: on a GPU
each sampler op costs the CPU one kernel launch whatever the vocabulary. The sampler's op count
per decode step (what the GPU launches) is reported separately. The logits are the same in every
run, so `tokens_sha256` shows that an optimisation changed no result.

    python -m benchmarks.engine_overhead                    # 256 requests, full lengths
    python -m benchmarks.engine_overhead --output-scale 0.25 --profile 25

Prints one JSON line: milliseconds per step for each phase, averaged over all steps and over the
decode-only steps with every sequence slot filled (the steady state of issue 8), from the fastest
of `--repeat` identical runs (a shared machine adds noise, never removes it).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import hashlib
import json
import pstats
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.throughput import make_workload
from m0_config.sampling_params import SamplingParams
from m0_config.toy import toy_checkpoint
from m4_cudagraph.static_buffers import host_decode_inputs

MAX_MODEL_LEN = 2048  # the longest prompt (1024) plus the longest output (1024)


class StepTimer:
    """Per-phase seconds of the current step, and one record per finished step."""

    def __init__(self):
        self.phases: collections.Counter = collections.Counter()
        self.steps: list[dict] = []

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] += time.perf_counter() - start

        return timed


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it: `kernels` (ops that are not views: one GPU launch each)
    and `from_host` (tensors built from Python data: one host-to-device copy each on a GPU)."""

    def __init__(self):
        super().__init__()
        self.kernels = self.from_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.from_host += 1
        elif not func.is_view:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def count_sampling_ops(llm, prompts, params) -> dict:
    """Aten ops of `_sample_and_append` per decode step (the same at any batch size without seeds),
    over a short run of the first requests."""
    engine = llm.llm_engine
    sample_and_append, counts = engine._sample_and_append, []

    def counted(so, logits):
        with OpCounter() as counter:
            sample_and_append(so, logits)
        if not any(s.is_prefill for s in so.seqs):
            counts.append((counter.kernels, counter.from_host))
        return None

    engine._sample_and_append = counted
    llm.generate(prompts, params, use_tqdm=False)
    engine._sample_and_append = sample_and_append
    return {"kernels": max(c[0] for c in counts), "from_host": max(c[1] for c in counts)}


def stub_execute_model(runner, timer: StepTimer, vocab_size: int, generator: torch.Generator):
    """m4's `execute_model` without the forward pass: inputs are prepared (and copied into the
    static buffers for decode), logits are random and drawn from `generator`, so the sampler's own
    randomness is that of a real run."""

    def execute_model(so):
        start = time.perf_counter()
        runner.copy_blocks(so.block_copies)
        bucket = runner.decode_bucket(so)
        if bucket is None:
            runner.prepare_inputs(so)
        else:
            host = host_decode_inputs(so.seqs, bucket, runner.block_size, runner.buffers.max_blocks_per_seq)
            for name, tensor in host.items():  # as m4's runner: into the (here CPU) static buffers
                target = getattr(runner.buffers, name)
                target = target[:bucket, : tensor.shape[1]] if tensor.dim() == 2 else target[:bucket]
                target.copy_(tensor, non_blocking=True)
        timer.phases["prepare_inputs"] += time.perf_counter() - start
        start = time.perf_counter()
        logits = torch.randn(len(so.seqs), vocab_size, generator=generator)
        timer.phases["model_stub"] += time.perf_counter() - start  # not host overhead: excluded
        return logits

    return execute_model


def instrument(engine, timer: StepTimer, logits_width: int, generator: torch.Generator) -> None:
    """Instance attributes shadow the engine's methods for this run only."""
    runner, scheduler = engine.model_runner, engine.scheduler
    runner.use_static_decode = True  # decode goes through host_decode_inputs, as with CUDA graphs
    runner.execute_model = stub_execute_model(runner, timer, logits_width, generator)
    schedule = scheduler.schedule

    def timed_schedule():
        start = time.perf_counter()
        so = schedule()
        timer.phases["schedule"] += time.perf_counter() - start
        decode = not so.is_empty and not any(s.is_prefill for s in so.seqs)
        timer.phases["_num_seqs"], timer.phases["_decode"] = len(so.seqs), decode
        return so

    scheduler.schedule = timed_schedule
    scheduler.update_from_output = timer.wrap("update", scheduler.update_from_output)
    engine._sample_and_append = timer.wrap("sample_and_append", engine._sample_and_append)
    engine.sampler.forward = timer.wrap("sampler", engine.sampler.forward)
    engine._append_tokens = timer.wrap("append_and_stop", engine._append_tokens)
    step = engine.step

    def timed_step():
        timer.phases.clear()
        start = time.perf_counter()
        outputs = step()
        timer.phases["step"] = time.perf_counter() - start
        timer.steps.append(dict(timer.phases))
        return outputs

    engine.step = timed_step


def summarize(steps: list[dict]) -> dict:
    """Milliseconds per step, averaged over `steps`. `sampling_metadata` is what
    `_sample_and_append` spends outside the sampler and the appends (building the metadata,
    picking the rows); `outputs` is what `step` spends outside every phase (making the
    RequestOutputs of finished requests)."""
    phases = ["schedule", "prepare_inputs", "sampler", "append_and_stop", "update"]

    def mean_ms(values):
        values = list(values)
        return round(1000 * sum(values) / max(len(values), 1), 3)

    result = {p: mean_ms(s.get(p, 0.0) for s in steps) for p in phases}
    result["sampling_metadata"] = mean_ms(
        s.get("sample_and_append", 0.0) - s.get("sampler", 0.0) - s.get("append_and_stop", 0.0) for s in steps
    )
    counted = ["schedule", "prepare_inputs", "sample_and_append", "update", "model_stub"]
    result["outputs"] = mean_ms(s["step"] - sum(s.get(p, 0.0) for p in counted) for s in steps)
    result["host_total"] = mean_ms(s["step"] - s.get("model_stub", 0.0) for s in steps)
    return {"steps": len(steps), **result}


def digest(outputs) -> str:
    """One hash over every request's output token ids and cumulative logprob (6 decimals)."""
    h = hashlib.sha256()
    for out in outputs:
        for c in out.outputs:
            lp = None if c.cumulative_logprob is None else round(c.cumulative_logprob, 6)
            h.update(json.dumps([c.token_ids, lp]).encode())
    return h.hexdigest()[:16]


def run_once(args, model: str, profile: bool) -> dict:
    """A fresh engine (so no run finds another's prompts in its prefix cache), one warm-up request,
    then the timed workload. Seeds are fixed: every run samples the same tokens."""
    from m4_cudagraph import LLM

    llm = LLM(model, max_num_seqs=args.max_num_seqs, max_model_len=MAX_MODEL_LEN, device="cpu")
    engine = llm.llm_engine
    prompts, params = make_workload(args.scale, engine.config.model_config.vocab_size)
    for sp in params:
        sp.max_tokens = max(1, round(sp.max_tokens * args.output_scale))
    timer = StepTimer()
    instrument(engine, timer, args.logits_width, torch.Generator().manual_seed(1234))
    llm.generate(["warm-up"], SamplingParams(max_tokens=8), use_tqdm=False)
    timer.steps.clear()
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    return {
        "requests": len(prompts),
        "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs),
        "seconds": round(time.perf_counter() - start, 3),
        "all_steps": summarize(timer.steps),
        # the steady state of issue 8: decode only, every sequence slot filled
        "full_decode_steps": summarize(
            [s for s in timer.steps if s.get("_decode") and s.get("_num_seqs") == args.max_num_seqs]
        ),
        "tokens_sha256": digest(outputs),
        "sampling_ops_per_decode_step": count_sampling_ops(llm, prompts[:8], params[:8]),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="make_workload's scale (requests and lengths)")
    p.add_argument("--output-scale", type=float, default=1.0, help="multiply every max_tokens by this")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--logits-width", type=int, default=64, help="columns of the random logits")
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the fastest is reported")
    p.add_argument("--profile", type=int, default=0, help="run once under cProfile; print this many rows")
    args = p.parse_args(argv)
    # One thread: on a GPU the CPU runs no intra-op parallel loops, and a second OpenMP thread only
    # adds noise (on a busy machine a parallel region waits for a descheduled thread).
    torch.set_num_threads(1)
    model = toy_checkpoint("qwen3", max_position_embeddings=MAX_MODEL_LEN)
    runs = [run_once(args, model, bool(args.profile)) for _ in range(1 if args.profile else args.repeat)]
    if len({r["tokens_sha256"] for r in runs}) != 1:
        raise RuntimeError("runs with the same seeds sampled different tokens")
    result = {"benchmark": "engine_overhead", **min(runs, key=lambda r: r["all_steps"]["host_total"])}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
