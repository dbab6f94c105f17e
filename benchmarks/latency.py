"""Latency: time per output token (TPOT) at batch size 1, and time to first token (TTFT) of a
request whose 2,048-token prefix is shared with an earlier request, with and without the prefix
cache. Prints one JSON line.

    python -m benchmarks.latency --milestone m4_cudagraph --preset qwen3-0.6b
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import random
import statistics
import time

import torch

from m0_config.sampling_params import SamplingParams
from m0_config.toy import toy_checkpoint


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_request(engine, request_id: str, prompt: list[int], max_tokens: int) -> float:
    """Seconds from adding one request (alone) until the engine hands back its finished output: with
    max_tokens=1 that is the time to the first token as the caller sees it (an async engine reads a
    step's token one step later, and that is counted)."""
    engine.add_request(
        request_id, None, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    _sync()
    return time.perf_counter() - start


def ttft_and_tpot(engine, tag: str, prompt: list[int], max_tokens: int, repeats: int) -> tuple[float, float]:
    """(median TTFT, median TPOT): TPOT = (time of a max_tokens request - TTFT) / (max_tokens - 1)."""
    first = statistics.median(run_request(engine, f"{tag}f{i}", prompt, 1) for i in range(repeats))
    if max_tokens == 1:
        return first, 0.0
    total = statistics.median(run_request(engine, f"{tag}t{i}", prompt, max_tokens) for i in range(repeats))
    return first, (total - first) / (max_tokens - 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--milestone", default="m4_cudagraph")
    p.add_argument("--model")
    p.add_argument("--preset", default=None)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--llm-kwargs", default="{}")
    args = p.parse_args(argv)
    model = args.model or toy_checkpoint(
        "qwen3", **({"preset": args.preset, "dtype": "bfloat16"} if args.preset else {})
    )
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(min(vocab, 10000)) for _ in range(n)]  # noqa: E731
    module = importlib.import_module(args.milestone)
    extra = json.loads(args.llm_kwargs)
    # One engine at a time, each with a fixed KV budget: an engine sized by gpu_memory_utilization
    # would leave nothing for the next one in this process.
    budget = {"max_num_batched_tokens": max(4096, args.prefix_len + 64), "kv_cache_memory_bytes": 4 << 30}
    holder = []

    def engine(**kw):
        holder.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        llm = module.LLM(model, **budget, **extra, **kw)
        llm.generate(["warm-up"], SamplingParams(max_tokens=8), use_tqdm=False)
        holder.append(llm)
        return llm.llm_engine

    eng = engine()
    tpot = ttft_and_tpot(eng, "t", draw(128), args.output_len, args.repeats)[1]
    prefix = draw(args.prefix_len)
    ttft = {}
    for caching in (False, True):
        eng = engine(enable_prefix_caching=caching)
        run_request(eng, "seed", prefix + draw(32), 1)  # puts the prefix in the cache (when on)
        ttft[caching] = statistics.median(
            run_request(eng, f"p{i}", prefix + draw(32), 1) for i in range(args.repeats)
        )
    result = {
        "milestone": args.milestone,
        "model": model,
        "tpot_ms_bs1": round(1000 * tpot, 3),
        "ttft_ms_no_cache": round(1000 * ttft[False], 3),
        "ttft_ms_prefix_cached": round(1000 * ttft[True], 3),
        "ttft_speedup": round(ttft[False] / ttft[True], 2),
        "prefix_len": args.prefix_len,
        "llm_kwargs": extra,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
