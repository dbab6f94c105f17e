"""m1's LLM against Hugging Face transformers on the toy checkpoints."""

from __future__ import annotations

import pytest
import torch

from m0_config.config import EngineConfig
from m0_config.loader import load_hf_model
from m1_sampling import LLM, SamplingParams

pytestmark = pytest.mark.m1

PROMPTS = ["Hello, my name is", "The model", "a cache block page attention query key value batch", "你好"]


@pytest.fixture(scope="module")
def qwen3_llm(qwen3_dir):
    return LLM(qwen3_dir, max_num_seqs=8)


def test_greedy_matches_hf_all_archs(toy_arch_dir, hf_greedy):
    llm = LLM(toy_arch_dir)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(toy_arch_dir, PROMPTS, 20)
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason in ("stop", "length")


def test_more_requests_than_seqs_keep_order(qwen3_dir):
    llm = LLM(qwen3_dir, max_num_seqs=2)
    prompts = [f"step {i} kernel" for i in range(5)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    single = [
        llm.generate(p, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0] for p in prompts
    ]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in single]


def test_prompt_forms_are_equivalent(qwen3_llm):
    ids = qwen3_llm.get_tokenizer()("Hello, my name is").input_ids
    sp = SamplingParams(temperature=0, max_tokens=5)
    a = qwen3_llm.generate("Hello, my name is", sp, use_tqdm=False)[0]
    b = qwen3_llm.generate(ids, sp, use_tqdm=False)[0]
    c = qwen3_llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    assert a.prompt_token_ids == b.prompt_token_ids == ids


def test_cumulative_logprob_matches_hf(qwen3_dir, qwen3_llm):
    out = qwen3_llm.generate(
        "The model", SamplingParams(temperature=1.0, seed=3, max_tokens=8, logprobs=0), use_tqdm=False
    )[0]
    comp = out.outputs[0]
    cfg = EngineConfig.from_llm_kwargs(qwen3_dir)
    model = load_hf_model(cfg.model_config)
    full = torch.tensor([out.prompt_token_ids + comp.token_ids])
    logp = torch.log_softmax(model(full).logits[0].float(), -1)
    p = len(out.prompt_token_ids)
    expected = [logp[p - 1 + i, t].item() for i, t in enumerate(comp.token_ids)]
    got = [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert comp.cumulative_logprob == pytest.approx(sum(expected), abs=1e-3)


def test_logprobs_topk_and_rank(qwen3_llm):
    comp = qwen3_llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    for entry, tok in zip(comp.logprobs, comp.token_ids):
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)
        assert len(entry) == 3  # greedy: the chosen token is the top-1, already among the 3
        assert [lp.rank for lp in ranked] == [1, 2, 3]
        assert entry[tok].rank == 1
        assert ranked[0].logprob >= ranked[1].logprob >= ranked[2].logprob


def test_seeded_request_independent_of_batch(qwen3_llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    alone = qwen3_llm.generate("The model", sp, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=12)
    batch = qwen3_llm.generate(["Hello", "The model", "world"], [others, sp, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_n_samples_are_independent_and_reproducible(qwen3_llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    a = qwen3_llm.generate("Hello", sp, use_tqdm=False)[0]
    b = qwen3_llm.generate("Hello", sp, use_tqdm=False)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_best_of_returns_top_n_by_cumulative_logprob(qwen3_llm):
    all4 = qwen3_llm.generate(
        "Hello", SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=6), use_tqdm=False
    )[0]
    best = qwen3_llm.generate(
        "Hello", SamplingParams(n=2, best_of=4, temperature=1.0, seed=11, max_tokens=6), use_tqdm=False
    )[0]
    ranked = sorted(all4.outputs, key=lambda o: o.cumulative_logprob, reverse=True)[:2]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked]
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob


def test_stop_string_and_stop_token_end_to_end(qwen3_llm):
    free = qwen3_llm.generate(
        "Hello, my name is", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
    )
    comp = free[0].outputs[0]
    third = comp.token_ids[3]
    out = qwen3_llm.generate(
        "Hello, my name is",
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[third]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == third
    assert out.token_ids == comp.token_ids[: comp.token_ids.index(third) + 1]
    stop = comp.text[len(comp.text) // 2 :][:3]
    assert stop.strip(), "the workload must give a non-blank stop string"
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    s = qwen3_llm.generate("Hello, my name is", sp, use_tqdm=False)[0].outputs[0]
    assert s.stop_reason == stop and s.finish_reason == "stop"
    assert s.text == comp.text[: comp.text.index(stop)]


def test_min_tokens_and_max_tokens(qwen3_llm):
    """min_tokens holds back a stop that would otherwise end the request at once: the stop id is
    masked in the sampler (greedy takes the runner-up) until min_tokens outputs exist. (The toy model
    never emits EOS for this prompt, so the stop must be a stop id that greedy really picks.)"""
    first = qwen3_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    stop_id = first.outputs[0].token_ids[0]
    early = SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[stop_id])
    assert qwen3_llm.generate("Hello", early, use_tqdm=False)[0].outputs[0].token_ids == [stop_id]
    held = SamplingParams(temperature=0, max_tokens=7, min_tokens=7, stop_token_ids=[stop_id])
    out = qwen3_llm.generate("Hello", held, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert stop_id not in out.token_ids


def test_chat_uses_template(qwen3_llm):
    tok = qwen3_llm.get_tokenizer()
    msgs = [{"role": "user", "content": "hello world"}]
    out = qwen3_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text and text.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == tok(text, add_special_tokens=False).input_ids
