"""m2's engine: the same tokens as m1 and HF, continuous batching over slots, no slot leaks."""

from __future__ import annotations

import pytest

import m1_sampling
from m2_kvcache import LLM, BeamSearchParams, SamplingParams

pytestmark = pytest.mark.m2

PROMPTS = [
    "Hello, my name is",
    "The model",
    "a cache block page attention query key value batch",
    "你好",
    "x",
]


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_equals_m1_all_archs_more_requests_than_slots(toy_arch_dir):
    sp = SamplingParams(temperature=0, max_tokens=24)
    m1 = m1_sampling.LLM(toy_arch_dir).generate(PROMPTS, sp, use_tqdm=False)
    m2 = LLM(toy_arch_dir, max_num_seqs=2).generate(PROMPTS, sp, use_tqdm=False)
    assert _tokens(m2) == _tokens(m1)
    assert [o.outputs[0].text for o in m2] == [o.outputs[0].text for o in m1]


def test_sampling_features_equal_m1(qwen3_dir):
    params = [
        SamplingParams(n=2, best_of=3, temperature=0.9, seed=5, max_tokens=10),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=9, max_tokens=12, logprobs=2),
        SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[260]),
    ]
    prompts = PROMPTS[:4]
    m1 = m1_sampling.LLM(qwen3_dir).generate(prompts, params, use_tqdm=False)
    m2 = LLM(qwen3_dir, max_num_seqs=3).generate(prompts, params, use_tqdm=False)
    assert _tokens(m2) == _tokens(m1)
    for a, b in zip(m1, m2):
        for x, y in zip(a.outputs, b.outputs):
            assert y.cumulative_logprob == pytest.approx(x.cumulative_logprob, abs=1e-3)
            assert (y.finish_reason, y.stop_reason) == (x.finish_reason, x.stop_reason)


def test_beam_search_equals_m1(qwen3_dir):
    bp = BeamSearchParams(beam_width=3, max_tokens=5)
    a = m1_sampling.LLM(qwen3_dir).beam_search(["The model"], bp)[0]
    b = LLM(qwen3_dir).beam_search(["The model"], bp)[0]
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]


def test_continuous_batching_admits_when_a_slot_frees(qwen3_dir):
    llm = LLM(qwen3_dir, max_num_seqs=2)
    engine, sched = llm.llm_engine, llm.llm_engine.scheduler
    engine.add_request("long", None, [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.add_request("short", None, [8, 9], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("late", None, [10, 11], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    finished_at, admitted_at, step = {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished_at[out.request_id] = step
        step += 1
        for req in sched.running:
            admitted_at.setdefault(req.request_id, step)
        # Every slot is either free or owned by exactly one running sequence.
        assert len(sched.free_slots) + len(sched.slot_of) == 2
        assert len(set(sched.slot_of.values())) == len(sched.slot_of)
    assert finished_at["short"] < finished_at["long"]
    # "late" joined while "long" was still decoding: it did not wait for the whole batch (m1 would).
    assert admitted_at["late"] <= finished_at["short"] + 2 < finished_at["long"]
    assert sorted(sched.free_slots) == [0, 1] and not sched.slot_of


def test_decode_steps_feed_one_token_per_sequence(qwen3_dir):
    llm = LLM(qwen3_dir, max_num_seqs=4)
    engine = llm.llm_engine
    engine.add_request("a", None, [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add_request("b", None, [9, 10], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    first = engine.scheduler.schedule()
    assert first.is_prefill and first.num_scheduled_tokens == [4, 2]
    logits = engine.model_runner.execute_model(first)
    engine._sample_and_append(first, logits)
    engine.scheduler.update_from_output(first)
    second = engine.scheduler.schedule()
    assert not second.is_prefill and second.num_scheduled_tokens == [1, 1]
    assert [s.data.num_computed_tokens for s in second.seqs] == [4, 2]


def test_kv_cache_usage_shows_reserved_but_unused(qwen3_dir):
    llm = LLM(qwen3_dir, max_num_seqs=4, max_model_len=128)
    engine = llm.llm_engine
    engine.add_request("a", None, [5] * 10, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()
    usage = engine.kv_cache_usage()
    per_token = engine.config.model_config.kv_cache_bytes_per_token()
    assert usage.reserved_bytes == 4 * 128 * per_token
    assert usage.used_bytes == 10 * per_token
    assert usage.used_fraction == pytest.approx(10 / 512)


def test_best_of_larger_than_slots_is_refused_or_ignored_not_looped(qwen3_dir):
    llm = LLM(qwen3_dir, max_num_seqs=2)
    with pytest.raises(ValueError, match="best_of=3 candidates can never run together with max_num_seqs=2"):
        llm.generate(
            ["Hello", "world"],
            [SamplingParams(best_of=3), SamplingParams(temperature=0, max_tokens=3)],
            use_tqdm=False,
        )
    # Added past the LLM's check, the scheduler still finishes it instead of waiting forever.
    engine = llm.llm_engine
    engine.add_request("big", None, [5, 6], SamplingParams(n=1, best_of=3, temperature=1.0))
    engine.add_request("ok", None, [7, 8], SamplingParams(temperature=0, max_tokens=3))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert outs["big"].outputs[0].finish_reason == "length" and outs["big"].outputs[0].token_ids == []
    assert len(outs["ok"].outputs[0].token_ids) == 3
    assert not engine.scheduler.slot_of


def test_cache_that_cannot_fit_is_a_clear_error(qwen3_dir):
    with pytest.raises(ValueError, match="contiguous KV cache needs .* lower max_num_seqs"):
        LLM(qwen3_dir, max_num_seqs=10**7)


def test_bad_input_keeps_engine_usable(qwen3_dir):
    llm = LLM(qwen3_dir, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.generate([list(range(1, 40))], use_tqdm=False)
    with pytest.raises(ValueError, match="enforce_eager.*m4_cudagraph"):
        LLM(qwen3_dir, enforce_eager=True)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert out[0].outputs[0].finish_reason == "length"
    assert len(llm.llm_engine.scheduler.free_slots) == llm.llm_engine.config.scheduler_config.max_num_seqs
