"""Where does an engine step spend its time? Runs the throughput workload and times each phase of
`LLMEngine.step` (schedule, model, sample + append + stop checks, scheduler update), synchronizing
the GPU after the model so its time is not charged to the next phase.

With async scheduling (m4 on a GPU, the default there) nothing is synchronized: the phases are the
host's own time (schedule, launch = inputs + graph replay + sampler launch, resolve = reading the
previous step's tokens and appending them) and `wait`, the time the host sits blocked on the
previous step's GPU work. A large `wait` means the GPU sets the pace; none means the host does.

    python -m benchmarks.profile_steps --milestone m4_cudagraph --preset qwen3-0.6b --scale 0.25
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import time

import torch

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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--milestone", default="m4_cudagraph")
    p.add_argument("--model")
    p.add_argument("--preset", default=None)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--llm-kwargs", default="{}")
    args = p.parse_args(argv)
    model = args.model or toy_checkpoint(
        "qwen3", **({"preset": args.preset, "dtype": "bfloat16"} if args.preset else {})
    )
    from transformers import AutoConfig

    prompts, params = make_workload(args.scale, AutoConfig.from_pretrained(model).vocab_size)
    llm = importlib.import_module(args.milestone).LLM(model, **json.loads(args.llm_kwargs))
    llm.generate(["warm-up"], params[0], use_tqdm=False)
    engine, phases = llm.llm_engine, collections.Counter()
    # Instance attributes shadow the methods for this benchmark run only.
    is_async = getattr(engine, "async_scheduling", False)
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
        "ms_per_step": {k: round(1000 * v / steps, 3) for k, v in phases.items()},
        "ms_per_step_other": round(
            1000 * (total - sum(v for k, v in phases.items() if k != "wait")) / steps, 3
        ),
        "async_scheduling": is_async,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
