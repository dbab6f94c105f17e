"""Loading a Hugging Face checkpoint folder: tokenizer, config, and (for m0/m1) the HF model itself.

From m2 on the model is the project's own code with weights read straight from safetensors;
the HF model stays as the correctness reference.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from m0_config.config import ModelConfig, check_architecture, read_checkpoint_config


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A tokenizer that pads on the left (generation appends on the right) and has a pad token."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"tokenizer folder {path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked, so reusing EOS is safe
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def load_hf_config(path: str):
    """The transformers config of a checkpoint whose architecture this project supports."""
    from transformers import AutoConfig

    check_architecture(read_checkpoint_config(path))
    return AutoConfig.from_pretrained(path)


def check_vocab(tokenizer, hf_config) -> None:
    """The model's vocabulary may be padded beyond the tokenizer (Qwen pads 151,669 to 151,936);
    a tokenizer *larger* than the model would produce ids the embedding has no row for."""
    if len(tokenizer) > hf_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {hf_config.vocab_size}: "
            "the tokenizer does not belong to this checkpoint"
        )


def get_eos_token_ids(tokenizer, model_dir: str) -> list[int]:
    """Every id that ends generation: the tokenizer's EOS and generation_config.json's eos_token_id
    (an int or a list; Llama 3 instruct lists several). A checkpoint without generation_config.json
    takes it from config.json, as HF transformers and vLLM do (`GenerationConfig.from_model_config`)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for name in ("generation_config.json", "config.json"):  # the first file that exists decides
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            for t in eos if isinstance(eos, list) else [eos]:
                if t is not None and t not in ids:
                    ids.append(int(t))
            break
    return ids


def load_hf_model(model_config: ModelConfig):
    """The transformers model in the resolved dtype on the resolved device, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_config.model, dtype=model_config.torch_dtype)
    return model.to(model_config.device).eval()


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
