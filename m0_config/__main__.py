"""`python -m m0_config [--model DIR]`: the resolved EngineConfig and a summary of the model."""

from __future__ import annotations

import argparse
from dataclasses import fields

from m0_config.config import EngineConfig
from m0_config.loader import check_vocab, count_parameters, load_hf_model, load_tokenizer
from m0_config.toy import toy_checkpoint


def describe(config: EngineConfig) -> str:
    lines = []
    for f in fields(config):
        value = getattr(config, f.name)
        lines.append(f"{f.name}: {value!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint folder (default: a toy Qwen3 checkpoint)")
    parser.add_argument(
        "--arch", default="qwen3", help="toy architecture when no --model: qwen3, qwen2, llama"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    # m0 has no engine: the prompt (what `make demo` passes) is only tokenized, in the padded batch below.
    parser.add_argument("prompt", nargs="?", default="Hello world", help="a prompt to tokenize")
    args = parser.parse_args(argv)
    model_dir = args.model or toy_checkpoint(args.arch)
    config = EngineConfig.from_llm_kwargs(model_dir, dtype=args.dtype, max_model_len=args.max_model_len)
    print("== EngineConfig ==")
    print(describe(config))
    mc = config.model_config
    tokenizer = load_tokenizer(mc.tokenizer)
    check_vocab(tokenizer, mc.hf_config)
    model = load_hf_model(mc)
    print("\n== Model ==")
    print(f"architecture:        {mc.architecture}")
    print(f"parameters:          {count_parameters(model):,}")
    print(f"dtype / device:      {mc.torch_dtype} / {mc.device}")
    print(f"layers:              {mc.num_layers}")
    print(f"heads (q / kv):      {mc.num_attention_heads} / {mc.num_kv_heads}, head_dim {mc.head_dim}")
    print(f"vocab (model / tok): {mc.vocab_size} / {len(tokenizer)}")
    print(f"max_model_len:       {mc.max_model_len}")
    print(f"KV-cache bytes/token: {mc.kv_cache_bytes_per_token():,}")
    enc = tokenizer([args.prompt, "a longer prompt for padding"], padding=True)
    print(f"left-padded batch:   {enc['input_ids']}")


if __name__ == "__main__":
    main()
