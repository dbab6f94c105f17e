"""Toy checkpoints: real Hugging Face checkpoint folders with random weights, made locally.

`write_toy_checkpoint(path, arch)` writes config.json, model.safetensors, a byte-level BPE
tokenizer trained here with `tokenizers`, a chat template and generation_config.json, for the
architectures qwen3, qwen2, llama and qwen3_moe. Nothing is downloaded. Tests, notebooks and the
demo use `toy_checkpoint(arch)`, which writes once into a cache folder and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile

import torch

TOY_VERSION = 1  # bump when the toy format changes, so cached folders are rebuilt

# Prompts that exercise the toy tokenizer: short and long, multi-byte ("你好") and a single character.
# The engines' tests share them (m3, m4 and m5 compare milestones on exactly these).
TOY_PROMPTS = (
    "Hello, my name is",
    "The model",
    "a cache block page attention query key value batch step prefill decode schedule",
    "你好",
    "x",
    "a cache block page attention query key value batch step prefill decode schedule sequence",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]

# Small shapes: a forward pass takes milliseconds on a CPU. head_dim * heads != hidden for Qwen3,
# as in the real Qwen3 checkpoints, so o_proj is not square.
_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # larger than real (0.02): logits far apart, so greedy ties never happen
)
ARCHS = {
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, tie_word_embeddings=True
    ),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    # 4 experts, 2 per token; layer 1 is dense (mlp_only_layers), layer 0 has experts.
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        head_dim=32,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
}
# Real shapes with random weights, for benchmarks (the toy tokenizer still applies).
PRESETS = {
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        initializer_range=0.02, rope_theta=1000000.0,
    ),
    "qwen3-8b": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        initializer_range=0.02, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
}  # fmt: skip


def _corpus(seed: int) -> list[str]:
    """Deterministic training text: English, code-ish text and multi-byte characters (so that some
    tokens split a UTF-8 character, which the incremental detokenizer must handle)."""
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "model",
        "token",
        "cache",
        "block",
        "page",
        "attention",
        "query",
        "key",
        "value",
        "batch",
        "step",
        "prefill",
        "decode",
        "schedule",
        "sequence",
        "request",
        "engine",
        "kernel",
        "memory",
        "layer",
        "head",
        "sample",
        "greedy",
        "top",
        "beam",
        "hello",
        "world",
        "my",
        "name",
        "is",
        "and",
        "of",
        "to",
        "in",
        "it",
        "for",
        "on",
        "with",
        "as",
        "fast",
        "slow",
        "small",
        "large",
        "GPU",
        "CPU",
        "vLLM",
    ]
    extra = [
        "你好世界",
        "模型推理",
        "注意力",
        "缓存",
        "🙂",
        "🚀",
        "café",
        "naïve",
        "def f(x):",
        "return x + 1",
    ]
    lines = []
    for _ in range(400):
        n = rng.randint(4, 14)
        line = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.3:
            line += " " + rng.choice(extra)
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ","]))
    return lines


def train_tokenizer(seed: int = 0, vocab_size: int = 480, add_bos: bool = False):
    """A byte-level BPE tokenizer (the GPT-2/Qwen scheme) trained on the toy corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if add_bos:  # Llama tokenizers prepend BOS to every encoded text
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|begin_of_text|>" if add_bos else None,
        pad_token=None if add_bos else "<|endoftext|>",  # Llama has no pad token: the loader adds one
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )


def make_hf_config(arch: str, vocab_size: int, preset: str | None = None, **overrides):
    """The transformers config of a toy (or preset-shaped) checkpoint."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown toy architecture {arch!r}; choose one of {sorted(ARCHS)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = {**_BASE, **ARCHS[arch], "vocab_size": vocab_size, **PRESETS.get(preset, {}), **overrides}
    if arch == "qwen2":
        values.pop("head_dim", None)  # Qwen2 derives head_dim from hidden_size
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def write_toy_checkpoint(
    path: str,
    arch: str = "qwen3",
    seed: int = 0,
    dtype: str = "float32",
    preset: str | None = None,
    **overrides,
) -> str:
    """Write a complete checkpoint folder at `path` and return it. Same arguments, same bytes."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = train_tokenizer(seed, add_bos=(arch == "llama"))
    # Pad the model's vocabulary to a multiple of 64 beyond the tokenizer, as real checkpoints do
    # (or take the vocab_size asked for, e.g. Qwen's 151,936 on a tiny model).
    vocab_size = overrides.pop("vocab_size", -(-len(tokenizer) // 64) * 64)
    config = make_hf_config(arch, vocab_size, preset, **overrides)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_ids}, f, indent=2)
    return path


def default_cache_dir() -> str:
    return os.environ.get("FOLOVLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "folovllm"))


def toy_checkpoint(arch: str = "qwen3", seed: int = 0, cache_dir: str | None = None, **kwargs) -> str:
    """A cached toy checkpoint folder, written on first use. Safe when several processes race:
    each writes into its own temporary folder and renames it into place."""
    key = json.dumps({"v": TOY_VERSION, "arch": arch, "seed": seed, **kwargs}, sort_keys=True)
    name = f"{arch}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    root = os.path.join(cache_dir or default_cache_dir(), "toy")
    final = os.path.join(root, name)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".", dir=root)
    write_toy_checkpoint(tmp, arch, seed, **kwargs)
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race; use its folder
        shutil.rmtree(tmp, ignore_errors=True)
    return final
