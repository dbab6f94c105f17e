"""m2's engine: the same tokens as m1 and HF, continuous batching over slots, no slot leaks."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

import m1_sampling
from m0_config.sequence import SequenceStatus
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


@pytest.mark.parametrize("prompt_len", [16, 20])
def test_prompt_that_cannot_fit_a_slot_is_finished_not_run(qwen3_dir, prompt_len):
    """LLM.generate refuses a prompt of max_model_len tokens or more; added to the engine directly,
    it is finished as "length" with no tokens (as an oversized best_of is), instead of writing past
    its slot (IndexError, and a request left running) or growing past max_model_len, and the engine
    stays usable."""
    llm = LLM(qwen3_dir, max_model_len=16, max_num_seqs=2)
    engine = llm.llm_engine
    prompt = list(range(5, 5 + prompt_len))
    engine.add_request("big", None, prompt, SamplingParams(temperature=0, max_tokens=3))
    engine.add_request("ok", None, [7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert outs["big"].outputs[0].finish_reason == "length" and outs["big"].outputs[0].token_ids == []
    assert len(outs["ok"].outputs[0].token_ids) == 3
    assert sorted(engine.scheduler.free_slots) == [0, 1] and not engine.scheduler.slot_of
    out = llm.generate([[7, 8]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == outs["ok"].outputs[0].token_ids


def test_cache_that_cannot_fit_is_a_clear_error(qwen3_dir):
    with pytest.raises(ValueError, match="contiguous KV cache needs .* lower max_num_seqs"):
        LLM(qwen3_dir, max_num_seqs=10**7)


def test_bad_input_keeps_engine_usable(qwen3_dir):
    llm = LLM(qwen3_dir, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.generate([list(range(1, 40))], use_tqdm=False)
    with pytest.raises(ValueError, match="enforce_eager.*m4_cudagraph"):
        LLM(qwen3_dir, enforce_eager=True)
    with pytest.raises(
        ValueError, match="'block_size' yet; it arrives in m3_paged. Supported here: .*max_num_b"
    ):
        LLM(qwen3_dir, block_size=16)
    with pytest.raises(ValueError, match="unknown argument 'max_num_seq'. Did you mean 'max_num_seqs'"):
        LLM(qwen3_dir, max_num_seq=2)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert out[0].outputs[0].finish_reason == "length"
    assert len(llm.llm_engine.scheduler.free_slots) == llm.llm_engine.config.scheduler_config.max_num_seqs


def test_output_stops_at_max_model_len_with_length(qwen3_dir):
    """As in vLLM, prompt + max_tokens beyond max_model_len is not an error: the output stops when the
    sequence holds max_model_len tokens, finish_reason "length", with the tokens of an uncapped run."""
    prompts = [list(range(5, 5 + n)) for n in (1, 10, 23)]  # 23 = max_model_len - 1: one token fits
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(qwen3_dir, max_model_len=24, max_num_seqs=2)
    capped = llm.generate(prompts, sp, use_tqdm=False)
    full = LLM(qwen3_dir, max_num_seqs=2).generate(prompts, sp, use_tqdm=False)
    for prompt, c, f in zip(prompts, capped, full):
        assert len(prompt) + len(c.outputs[0].token_ids) == 24 and c.outputs[0].finish_reason == "length"
        assert c.outputs[0].token_ids == f.outputs[0].token_ids[: 24 - len(prompt)]
    assert sorted(llm.llm_engine.scheduler.free_slots) == [0, 1]


def test_every_eos_id_of_generation_config_stops_like_hf(qwen3_dir, hf_greedy, tmp_path):
    """generation_config.json may list several EOS ids (Llama 3 instruct lists three): each one ends
    generation, as in HF `generate`. A token greedy decoding produces is made the third EOS id."""
    prompt = "Hello, my name is"
    free = (
        LLM(qwen3_dir)
        .generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )
    stop_at = next(i for i in range(2, 8) if free[i] not in free[:i])
    path = shutil.copytree(qwen3_dir, tmp_path / "ckpt")
    with open(path / "generation_config.json") as f:
        gen = json.load(f)
    assert len(gen["eos_token_id"]) == 2 and free[stop_at] not in gen["eos_token_id"]
    gen["eos_token_id"].append(free[stop_at])
    with open(path / "generation_config.json", "w") as f:
        json.dump(gen, f)
    out = LLM(str(path)).generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert out[0].outputs[0].token_ids == free[: stop_at + 1] == hf_greedy(str(path), [prompt], 8)[0]
    assert out[0].outputs[0].finish_reason == "stop"


def test_bad_checkpoint_folders_are_clear_errors(qwen3_dir, tmp_path):
    """Each names the problem and what is allowed; an engine made before keeps working."""
    llm = LLM(qwen3_dir, max_num_seqs=2)

    def broken(name: str, edit) -> str:
        path = shutil.copytree(qwen3_dir, tmp_path / name)
        edit(path)
        return str(path)

    def other_arch(path):
        with open(path / "config.json") as f:
            config = json.load(f)
        with open(path / "config.json", "w") as f:
            json.dump({**config, "architectures": ["GPT2LMHeadModel"]}, f)

    def bin_weights(path):
        os.remove(path / "model.safetensors")
        (path / "pytorch_model.bin").write_bytes(b"")

    cases = [
        (str(tmp_path / "nowhere"), "does not exist.*never downloads"),
        (broken("arch", other_arch), r"unsupported architecture \['GPT2LMHeadModel'\].*Qwen3ForCausalLM"),
        (broken("no-weights", lambda p: os.remove(p / "model.safetensors")), r"no \*\.safetensors files"),
        (broken("bin", bin_weights), r"no \*\.safetensors files .*other weight formats are not supported"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            LLM(path)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_keep_slots_consistent(qwen3_dir, seed):
    """Seeded random workloads through 3 slots: ragged prompts that may run into max_model_len, n /
    best_of forks of one prompt, early stops and aborts. After every step each live sequence owns
    exactly one slot and the others are free, and a running sequence's cache holds all its tokens but
    the newest; at the end every request came out once and each greedy one has its tokens from a run
    alone (a reused slot leaks nothing of its earlier occupant)."""
    rng = random.Random(seed)
    llm = LLM(qwen3_dir, max_model_len=40, max_num_seqs=3)
    engine, sched = llm.llm_engine, llm.llm_engine.scheduler
    requests = {}
    for i in range(6):
        prompt = [rng.randrange(3, 400) for _ in range(rng.randint(1, 39))]
        n = rng.randint(1, 3)
        greedy = rng.random() < 0.4
        sp = SamplingParams(
            n=1 if greedy else n,
            best_of=1 if greedy else rng.randint(n, 3),
            temperature=0 if greedy else 1.0,
            seed=rng.randrange(100),
            max_tokens=rng.randint(1, 30),
            ignore_eos=rng.random() < 0.5,
        )
        requests[str(i)] = (prompt, sp)
        engine.add_request(str(i), None, prompt, sp)
    outputs = {}
    while engine.has_unfinished_requests():
        if rng.random() < 0.05:
            engine.abort_request(rng.choice(list(requests)))
        for out in engine.step():
            assert out.request_id not in outputs
            outputs[out.request_id] = out
        live = {s.seq_id for r in sched.running for s in r.seqs if not s.is_finished()}
        assert live == set(sched.slot_of) and len(set(sched.slot_of.values())) == len(live)
        assert sorted([*sched.free_slots, *sched.slot_of.values()]) == [0, 1, 2]
        for req in sched.running:
            for s in req.get_seqs(SequenceStatus.RUNNING):
                assert s.data.num_computed_tokens == s.get_len() - 1 < 40
    assert outputs.keys() == requests.keys()
    for request_id, (prompt, sp) in requests.items():
        out = outputs[request_id].outputs
        assert all(len(prompt) + len(c.token_ids) <= 40 for c in out)
        if sp.temperature == 0 and out[0].finish_reason != "abort":
            alone = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
            assert out[0].token_ids == alone.token_ids
