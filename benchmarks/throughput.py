"""Throughput on nano-vllm's bench.py workload, for any milestone or HF transformers.

The workload (exactly nano-vllm's): random.seed(0); 256 requests; prompts of randint(100, 1024)
random token ids drawn with randint(0, 10000); max_tokens = randint(100, 1024) each;
temperature 0.6, ignore_eos; one warm-up request first; throughput = sum(max_tokens) / wall time
(133,966 output tokens at full size). `--scale` shrinks every length and the request count for CPUs
and slow milestones. Prints one JSON line per run.

    python -m benchmarks.throughput --milestone m2_kvcache --scale 0.05
    python -m benchmarks.throughput --milestone hf --model DIR --hf-batch-size 128
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import random
import time

import torch

from m0_config.sampling_params import SamplingParams
from m0_config.toy import toy_checkpoint


def make_workload(scale: float = 1.0, vocab_size: int = 10001, seed: int = 0):
    """(prompt_token_ids, sampling_params). At scale 1 and vocab >= 10001 it is nano-vllm's draw
    sequence exactly; token ids are reduced modulo the vocabulary of a smaller (toy) model."""
    random.seed(seed)
    num_seqs = max(1, round(256 * scale))
    max_input, max_output = max(2, round(1024 * scale)), max(2, round(1024 * scale))
    min_len = max(1, round(100 * scale))
    prompts = [
        [random.randint(0, 10000) % vocab_size for _ in range(random.randint(min_len, max_input))]
        for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(min_len, max_output))
        for _ in range(num_seqs)
    ]
    return prompts, params


def run_engine(milestone: str, model: str, prompts, params, llm_kwargs: dict) -> float:
    llm = importlib.import_module(milestone).LLM(model, **llm_kwargs)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up
    _sync()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    _sync()
    return time.perf_counter() - start


def run_hf(model: str, prompts, params, batch_size: int, device: str, dtype: str) -> float:
    """HF `generate` with static batches (left padding), sampling at the same temperature; each
    batch runs until its longest max_tokens (min_new_tokens forces ignore_eos)."""
    from m0_config.config import EngineConfig
    from m0_config.loader import load_hf_model

    cfg = EngineConfig.from_llm_kwargs(model, dtype=dtype, device=device)
    hf = load_hf_model(cfg.model_config)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, sp = prompts[i : i + batch_size], params[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=cfg.model_config.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=ids.device)
        n = max(s.max_tokens for s in sp)
        hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6, top_p=1.0, top_k=0,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
        )  # fmt: skip
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--milestone", default="m2_kvcache", help="m1_sampling .. m5_tp, or hf")
    p.add_argument("--model", help="checkpoint folder (default: a Qwen3-shaped toy, see --preset)")
    p.add_argument("--preset", default=None, help="toy shape when no --model: None (tiny) or qwen3-0.6b")
    p.add_argument("--scale", type=float, default=1.0, help="shrink request count and lengths")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--hf-batch-size", type=int, default=128)
    p.add_argument(
        "--llm-kwargs", default="{}", help='extra LLM(...) arguments as JSON, e.g. {"max_num_seqs": 64}'
    )
    args = p.parse_args(argv)
    # Real shapes are written in bfloat16 (half the bytes); the tiny toy stays float32.
    preset = {"preset": args.preset, "dtype": "bfloat16"} if args.preset else {}
    model = args.model or toy_checkpoint("qwen3", **preset)
    from transformers import AutoConfig

    prompts, params = make_workload(args.scale, AutoConfig.from_pretrained(model).vocab_size)
    kwargs = {
        "dtype": args.dtype,
        **({"device": args.device} if args.device else {}),
        **json.loads(args.llm_kwargs),
    }
    if args.milestone == "hf":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        seconds = run_hf(model, prompts, params, args.hf_batch_size, device, args.dtype)
    else:
        seconds = run_engine(args.milestone, model, prompts, params, kwargs)
    tokens = sum(sp.max_tokens for sp in params)
    result = {
        "milestone": args.milestone,
        "model": model,
        "scale": args.scale,
        "requests": len(prompts),
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "llm_kwargs": kwargs,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
