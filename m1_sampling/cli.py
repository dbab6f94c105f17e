"""The command line shared by every milestone's `python -m mN_... [--model DIR] "prompt"`.

Every `LLM(...)` argument is an option (`--max-num-seqs 8`); one the milestone does not support
yet is rejected by `LLM` with a clear error. Without --model a toy checkpoint is made locally.
"""

from __future__ import annotations

import argparse
import time

from m0_config.config import known_llm_arguments
from m0_config.sampling_params import SamplingParams
from m0_config.toy import toy_checkpoint


def _value(text: str):
    """'8' -> 8, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def build_parser(milestone: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {milestone}", description=f"Generate text with {milestone}.")
    p.add_argument("prompts", nargs="*", default=["Hello, my name is"], help="one or more prompts")
    p.add_argument("--model", help="checkpoint folder (default: a toy checkpoint made locally)")
    p.add_argument("--arch", default="qwen3", help="toy architecture when --model is not given")
    p.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user message in the chat template"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    for name in known_llm_arguments():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=_value, default=None)
    return p


def main(llm_cls, milestone: str, argv: list[str] | None = None) -> None:
    args = build_parser(milestone).parse_args(argv)
    model = args.model or toy_checkpoint(args.arch)
    kwargs = {k: getattr(args, k) for k in known_llm_arguments() if getattr(args, k) is not None}
    start = time.perf_counter()
    llm = llm_cls(model, **kwargs)
    print(f"[{milestone}] loaded {model} in {time.perf_counter() - start:.1f}s")
    if args.model is None:
        print(
            f"[{milestone}] a toy checkpoint with random weights: its text is noise. Pass --model DIR (or MODEL=DIR to make demo) for a real one."
        )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        n=args.n,
        seed=args.sampling_seed,
    )
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for out in outputs:
        for comp in out.outputs:
            print(f"\nPrompt: {out.prompt!r}\nOutput[{comp.index}]: {comp.text!r}  ({comp.finish_reason})")
