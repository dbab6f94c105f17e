"""`LLM`: vLLM's offline API (`generate`, `chat`, `beam_search`) over the engine loop."""

from __future__ import annotations

import itertools
import time
from typing import Any

from tqdm.auto import tqdm

from m0_config.config import EngineConfig, known_llm_arguments, unknown_argument_message
from m0_config.outputs import RequestOutput
from m0_config.sampling_params import BeamSearchParams, SamplingParams
from m1_sampling.inputs import broadcast_params, normalize_prompts, parse_prompt
from m1_sampling.llm_engine import LLMEngine

# The milestone that first understands each LLM(...) argument m1 does not.
ARGUMENT_MILESTONE = {
    "max_num_batched_tokens": "m2_kvcache",
    "block_size": "m3_paged",
    "gpu_memory_utilization": "m3_paged",
    "num_gpu_blocks_override": "m3_paged",
    "kv_cache_memory_bytes": "m3_paged",
    "enable_prefix_caching": "m3_paged",
    "enable_chunked_prefill": "m3_paged",
    "attention_backend": "m3_paged",
    "enforce_eager": "m4_cudagraph",
    "async_scheduling": "m4_cudagraph",
    "tensor_parallel_size": "m5_tp",
    "distributed_backend": "m5_tp",
    "pipeline_parallel_size": "(not built)",
    "data_parallel_size": "(not built)",
}


class LLM:
    """Generate text from a Hugging Face checkpoint folder.

    Arguments are vLLM's; one this milestone does not understand yet raises a ValueError that
    names the milestone which adds it, rather than being silently ignored.
    """

    engine_cls = LLMEngine
    milestone = "m1_sampling"
    supported_arguments = frozenset({"tokenizer", "dtype", "seed", "max_model_len", "max_num_seqs", "device"})
    # Settings this milestone's engine needs whatever the user says: no chunked prefill before m3.
    fixed_arguments: dict[str, Any] = {"enable_chunked_prefill": False}

    def __init__(self, model: str, **kwargs: Any):
        self._check_arguments(kwargs)
        config = EngineConfig.from_llm_kwargs(model, **kwargs, **self.fixed_arguments)
        self.llm_engine = self.engine_cls(config)
        self.request_counter = itertools.count()

    def _check_arguments(self, kwargs: dict) -> None:
        known = known_llm_arguments()
        for key in kwargs:
            if key not in known:
                raise ValueError(unknown_argument_message(key, known))
            if key not in self.supported_arguments:
                raise ValueError(
                    f"{self.milestone} does not support the argument {key!r} yet; it arrives in "
                    f"{ARGUMENT_MILESTONE.get(key, 'a later milestone')}. "
                    f"Supported here: {', '.join(sorted(self.supported_arguments))}"
                )

    def _check_request(self, index: int, prompt_token_ids: list[int], sp: SamplingParams) -> None:
        """Refuse what could never run, before anything is queued (later milestones add checks)."""
        if sp.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported by this engine; leave it as None")
        vocab_size = self.llm_engine.config.model_config.vocab_size
        if sp.logprobs is not None and sp.logprobs > vocab_size:  # would be cut to vocab_size entries
            raise ValueError(
                f"prompt {index}: logprobs must be <= the vocabulary size ({vocab_size}), got {sp.logprobs}"
            )
        max_num_seqs = self.llm_engine.config.scheduler_config.max_num_seqs
        if sp.best_of > max_num_seqs:
            raise ValueError(
                f"prompt {index}: best_of={sp.best_of} candidates can never run together with "
                f"max_num_seqs={max_num_seqs}; lower best_of / n or raise max_num_seqs"
            )

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    # ---- generate ------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts are strings, token-id lists or {"prompt_token_ids": [...]}; outputs come back in
        the order of the prompts. Everything is validated before any request is queued."""
        engine = self.llm_engine
        mc = engine.config.model_config
        prompt_list = normalize_prompts(prompts)
        params = broadcast_params(sampling_params, len(prompt_list))
        parsed = [
            parse_prompt(i, p, engine.tokenizer, mc.vocab_size, mc.max_model_len)
            for i, p in enumerate(prompt_list)
        ]
        for i, (p, sp) in enumerate(zip(parsed, params)):
            self._check_request(i, p.prompt_token_ids, sp)
        request_ids = []
        try:
            for p, sp in zip(parsed, params):
                request_id = str(next(self.request_counter))
                request_ids.append(request_id)
                engine.add_request(request_id, p.prompt, p.prompt_token_ids, sp)
        except BaseException:
            engine.abort_requests(request_ids)  # nothing of a failed call stays queued
            raise
        outputs = self._run_engine(request_ids, use_tqdm)
        return [outputs[r] for r in request_ids]

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        engine = self.llm_engine
        bar = ProgressBar(len(request_ids), disable=not use_tqdm)
        outputs: dict[str, RequestOutput] = {}
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    outputs[out.request_id] = out
                    bar.update(out)
        except BaseException:
            # leave the engine clean and usable after an error or Ctrl-C
            engine.abort_requests([r for r in request_ids if r not in outputs])
            raise
        finally:
            bar.close()
        return outputs

    # ---- chat ----------------------------------------------------------------------------------
    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True):
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations,
        rendered with the tokenizer's chat template."""
        tokenizer = self.llm_engine.tokenizer
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; use generate() with a plain prompt")
        if isinstance(messages, str) or not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a list of {'role', 'content'} dicts, or a list of such lists")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        for conv in conversations:
            if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
                raise ValueError("each conversation must be a list of {'role', 'content'} dicts")
        prompts = []
        for conv in conversations:
            text = tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            # The template already holds the special tokens; don't let the tokenizer add a second BOS.
            ids = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- beam search ---------------------------------------------------------------------------
    def beam_search(self, prompts, params: BeamSearchParams):
        from m1_sampling.beam_search import beam_search

        return beam_search(self, prompts, params)


class ProgressBar:
    """vLLM's bar: requests done, and input / output tokens per second."""

    def __init__(self, total: int, disable: bool):
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True, disable=disable)
        self.start = time.perf_counter()
        self.in_tokens = self.out_tokens = 0

    def update(self, out: RequestOutput) -> None:
        self.in_tokens += len(out.prompt_token_ids)
        self.out_tokens += sum(len(o.token_ids) for o in out.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"est. speed input: {self.in_tokens / elapsed:.2f} toks/s, output: {self.out_tokens / elapsed:.2f} toks/s"
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


__all__ = ["LLM", "SamplingParams", "BeamSearchParams"]
