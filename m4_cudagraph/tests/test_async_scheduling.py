"""Async scheduling (async_scheduling.py): the engine that schedules step n+1 before it reads step
n's tokens gives exactly the synchronous engine's outputs, leaves no block, placeholder or step in
flight behind, wastes at most one row per early stop, and really overlaps. Plus the placeholder
helpers against their references and the configuration errors. All on a CPU
(`async_scheduling=True` forces it there; unset, it is off)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import m3_paged
from m0_config.config import EngineConfig
from m0_config.sequence import Sequence, SequenceData, SequenceStatus
from m0_config.toy import TOY_PROMPTS
from m4_cudagraph import LLM, SamplingParams
from m4_cudagraph.async_scheduling import (
    fill_placeholders,
    fill_placeholders_ref,
    needs_token_values,
    placeholder_id,
)

pytestmark = pytest.mark.m4

PROMPTS = list(TOY_PROMPTS)

MAX_STEPS = 1000  # every workload here finishes in far fewer steps

# ---- helpers -------------------------------------------------------------------------------------


def _pair(model_dir: str, **kwargs) -> tuple[LLM, LLM]:
    """(async LLM, sync LLM) with the same settings."""
    return LLM(model_dir, async_scheduling=True, **kwargs), LLM(model_dir, async_scheduling=False, **kwargs)


def _assert_clean(engine, finished_requests: list) -> None:
    """Nothing of a finished run remains: every block free (cached ones count as free), no request
    queued, no step in flight, no generator, no placeholder left on any sequence."""
    bm = engine.scheduler.block_manager
    assert bm.get_num_free_blocks() == bm.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.in_flight is None and not engine.has_unfinished_requests()
    assert not engine.generators
    for seq in (s for req in finished_requests for s in req.seqs):
        assert seq.data.num_placeholders == 0 and min(seq.get_token_ids()) >= 0, seq.data


def _run(llm: LLM, prompts, params) -> list:
    """`llm.generate`, then `_assert_clean` over the requests it finished. A run longer than
    MAX_STEPS steps fails (a request that never leaves the engine would loop forever)."""
    engine = llm.llm_engine
    finished, steps = [], itertools.count()
    make_output, step = engine._make_output, engine.step
    engine._make_output = lambda req: finished.append(req) or make_output(req)
    engine.step = lambda: step() if next(steps) < MAX_STEPS else pytest.fail("the engine never finishes")
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del engine._make_output, engine.step  # the class's methods again
    assert len(finished) == len(outs)
    _assert_clean(engine, finished)
    return outs


def _assert_logprobs_close(got, expected) -> None:
    if expected is None:
        assert got is None
        return
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for token_id, lp in e.items():
            assert (g[token_id].rank, g[token_id].decoded_token) == (lp.rank, lp.decoded_token)
            assert g[token_id].logprob == pytest.approx(lp.logprob, rel=1e-5, abs=1e-5)


def _assert_same(got: list, expected: list) -> None:
    """Per request, per completion: the same tokens, text, finish and stop reasons and logprobs."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.prompt_token_ids == e.prompt_token_ids and len(g.outputs) == len(e.outputs)
        for a, b in zip(g.outputs, e.outputs):
            assert a.index == b.index
            assert a.token_ids == b.token_ids
            assert a.text == b.text
            assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason)
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, rel=1e-5, abs=1e-4)
            _assert_logprobs_close(a.logprobs, b.logprobs)


def _compare(pair, prompts, params) -> list:
    """Run both engines of `pair` on the same requests; assert equal outputs; return the sync ones."""
    async_llm, sync_llm = pair
    expected = _run(sync_llm, prompts, params)
    _assert_same(_run(async_llm, prompts, params), expected)
    return expected


def _count_rows(engine) -> list[int]:
    """A list that gets the number of scheduled rows of every later model step of `engine`."""
    rows: list[int] = []
    execute = engine.model_runner.execute_model
    engine.model_runner.execute_model = lambda so: rows.append(len(so.seqs)) or execute(so)
    return rows


def _first_new_token(token_ids: list[int], min_index: int) -> tuple[int, int]:
    """(index, id) of the first token at index >= min_index that does not occur before it: a stop
    id on it ends the greedy output exactly there."""
    for i in range(min_index, len(token_ids)):
        if token_ids[i] not in token_ids[:i]:
            return i, token_ids[i]
    raise AssertionError(f"no new token at index >= {min_index} in {token_ids}")


def _drain(engine) -> dict:
    """Step `engine` until it has nothing left (at most MAX_STEPS steps): {request_id: output}."""
    outputs = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            return outputs
        outputs.update((o.request_id, o) for o in engine.step())
    pytest.fail("the engine never finishes")


def _request(engine, request_id: str):
    return next(r for r in engine.scheduler.running if r.request_id == request_id)


@pytest.fixture(scope="module")
def pair(qwen3_dir):
    """One async and one sync engine, reused by the tests with default settings."""
    return _pair(qwen3_dir, block_size=4, max_num_seqs=8)


@pytest.fixture(scope="module")
def eos_prompt(qwen3_dir) -> list[int]:
    """A prompt whose greedy output ends on an EOS id after >= 3 tokens. The toy model rarely emits
    EOS, so a fixed set of random prompts is searched."""
    rng = random.Random(0)
    candidates = [[rng.randrange(3, 480) for _ in range(rng.randrange(2, 12))] for _ in range(300)]
    llm = LLM(qwen3_dir, async_scheduling=False)
    outs = llm.generate(candidates, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    for prompt, out in zip(candidates, outs):
        c = out.outputs[0]
        if c.finish_reason == "stop" and len(c.token_ids) >= 3:
            return prompt
    raise AssertionError("no candidate prompt ends on EOS; widen the search")


# ---- 1. the placeholder helpers -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_fill_placeholders_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    num_rows = int(torch.randint(1, 17, (1,), generator=gen))
    num_tokens = int(torch.randint(1, 60, (1,), generator=gen))
    prev = torch.randint(0, 512, (num_rows,), generator=gen)  # (num_rows,) the previous step's ids
    real = torch.randint(0, 512, (num_tokens,), generator=gen)
    stand_in = -1 - torch.randint(0, num_rows, (num_tokens,), generator=gen)
    is_placeholder = torch.rand(num_tokens, generator=gen) < 0.4
    input_ids = torch.where(is_placeholder, stand_in, real)  # (num_tokens,) a mix of both
    out = fill_placeholders(input_ids.clone(), prev)
    assert out.dtype == torch.int64 and out.shape == input_ids.shape
    assert out.tolist() == fill_placeholders_ref(input_ids.tolist(), prev.tolist())
    assert (out >= 0).all()
    # the reference itself: real ids kept, placeholder -1 - r takes prev[r]
    for t, o in zip(input_ids.tolist(), out.tolist()):
        assert o == (prev[-1 - t].item() if t < 0 else t)


def test_fill_placeholders_without_previous_step_is_identity():
    input_ids = torch.tensor([3, 7, 0, 511])
    assert fill_placeholders(input_ids, None) is input_ids
    assert [placeholder_id(r) for r in range(3)] == [-1, -2, -3]


def test_needs_token_values_only_for_penalties():
    assert not needs_token_values(SamplingParams(temperature=0.8, top_p=0.9, top_k=5, min_tokens=2, seed=1))
    assert needs_token_values(SamplingParams(repetition_penalty=1.1))
    assert needs_token_values(SamplingParams(frequency_penalty=0.5))
    assert needs_token_values(SamplingParams(presence_penalty=-0.5))


# ---- 2. SequenceData's placeholder API ------------------------------------------------------------


def test_sequence_data_placeholders():
    d = SequenceData([1, 2, 3])
    d.append_token_id(7, -0.5)
    d.append_placeholder(placeholder_id(0))
    assert (d.get_len(), d.get_output_len(), d.get_num_known_tokens(), d.num_placeholders) == (5, 2, 4, 1)
    assert d.output_token_ids == [7, -1] and d.get_token_ids() == [1, 2, 3, 7, -1]
    assert d.get_last_token_id() == -1 and d.cumulative_logprob == -0.5  # a placeholder has no logprob
    d.append_placeholder(placeholder_id(3))
    assert (d.get_len(), d.get_num_known_tokens(), d.num_placeholders) == (6, 4, 2)

    copy = d.copy()
    assert copy.num_placeholders == 2 and copy.output_token_ids == [7, -1, -4]
    assert copy.pop_placeholder() == -4 and d.output_token_ids == [7, -1, -4]  # independent lists
    child = Sequence(0, None, [1, 2, 3], data=d).fork(1)
    assert child.data.num_placeholders == 2 and child.get_token_ids() == d.get_token_ids()

    assert d.pop_placeholder() == -4 and d.pop_placeholder() == -1  # newest first, stand-in ids
    assert (d.get_len(), d.get_num_known_tokens(), d.num_placeholders) == (4, 4, 0)
    assert d.get_token_ids() == [1, 2, 3, 7] and d.output_token_ids == [7]
    with pytest.raises(ValueError, match="no placeholder"):
        d.pop_placeholder()
    for bad in (0, 5):
        with pytest.raises(ValueError, match="negative"):
            d.append_placeholder(bad)
    assert d.get_token_ids() == [1, 2, 3, 7] and d.num_placeholders == 0  # a refused append changes nothing


# ---- 3/4. async == sync, and nothing left behind ---------------------------------------------------


@pytest.mark.parametrize("arch,static_decode", [("qwen3", False), ("qwen3", True), ("llama", False)])
def test_greedy_mixed_max_tokens(toy_model_dir, arch, static_decode):
    """static_decode: the padded decode and mixed paths (what CUDA graphs replay) fill the
    placeholders from the static buffers (`execute_decode` / `execute_mixed`)."""
    pair = _pair(toy_model_dir(arch), block_size=4, max_num_seqs=4)  # 6 prompts: admissions wait
    calls = []
    for llm in pair:
        runner = llm.llm_engine.model_runner
        runner.use_static_decode = static_decode
        decode = runner.execute_decode
        runner.execute_decode = lambda so, bucket, decode=decode: calls.append(bucket) or decode(so, bucket)
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=i % 2 == 0)
        for i, m in enumerate([1, 2, 7, 16, 24, 5])
    ]
    expected = _compare(pair, PROMPTS, params)
    assert [len(o.outputs[0].token_ids) for o in expected][:2] == [1, 2]
    assert bool(calls) == static_decode


def test_seeded_random_sampling(pair):
    params = [
        SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=16),
        SamplingParams(temperature=1.0, top_k=20, seed=2, max_tokens=9),
        SamplingParams(temperature=1.3, top_p=0.8, top_k=50, seed=3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=0.05, seed=4, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=12),  # greedy rows next to random ones
        SamplingParams(temperature=0.9, seed=6, max_tokens=14, stop_token_ids=[101, 202, 303, 404]),
    ]
    expected = _compare(pair, PROMPTS, params)
    assert len({tuple(o.outputs[0].token_ids) for o in expected}) == len(PROMPTS)


def test_stops_eos_ids_strings_min_tokens(pair, eos_prompt):
    """Stop ids and strings taken from the model's own greedy output, so each really triggers."""
    _, sync_llm = pair
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    base = sync_llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], eos_prompt], greedy, use_tqdm=False)
    tokens0, tokens1 = base[0].outputs[0].token_ids, base[1].outputs[0].token_ids
    stop_index, stop_id = _first_new_token(tokens0, 3)
    text2 = base[2].outputs[0].text
    stop_str = text2[len(text2) // 2 :][:4]
    eos_index = next(i for i, t in enumerate(base[3].outputs[0].token_ids) if t in (0, 2))
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2], eos_prompt, eos_prompt, eos_prompt, PROMPTS[1]]
    params = [
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id], min_tokens=stop_index + 2),
        SamplingParams(temperature=0, max_tokens=16, stop=[stop_str]),
        SamplingParams(temperature=0, max_tokens=16, stop=[stop_str], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=eos_index + 2),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tokens1[0]]),  # stops on its 1st token
    ]
    out = [o.outputs[0] for o in _compare(pair, prompts, params)]
    assert (out[0].finish_reason, out[0].stop_reason, len(out[0].token_ids)) == (
        "stop",
        stop_id,
        stop_index + 1,
    )
    assert len(out[1].token_ids) > stop_index + 1  # min_tokens held the stop id back
    assert (out[2].finish_reason, out[2].stop_reason) == ("stop", stop_str) and stop_str not in out[2].text
    assert out[3].text.endswith(stop_str) and len(out[3].token_ids) == len(out[2].token_ids)
    assert (out[4].finish_reason, out[4].stop_reason, len(out[4].token_ids)) == ("stop", None, eos_index + 1)
    assert len(out[5].token_ids) > eos_index + 1 and out[5].token_ids[eos_index] not in (0, 2)
    assert (out[6].finish_reason, len(out[6].token_ids)) == ("length", 10)
    assert (out[7].finish_reason, out[7].token_ids) == ("stop", tokens1[:1])


def test_n_and_best_of_with_seeds(pair):
    params = [
        SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=12),
        SamplingParams(n=2, best_of=3, temperature=1.0, seed=12, max_tokens=10),
        SamplingParams(n=3, temperature=1.2, top_k=10, seed=13, max_tokens=8, stop_token_ids=[5, 77, 123]),
        SamplingParams(temperature=0, max_tokens=6),
    ]
    expected = _compare(pair, PROMPTS[:4], params)
    assert [len(o.outputs) for o in expected] == [2, 2, 3, 1]
    assert expected[0].outputs[0].token_ids != expected[0].outputs[1].token_ids


def test_logprobs(pair):
    params = [
        SamplingParams(temperature=0, max_tokens=8, logprobs=3),
        SamplingParams(temperature=1.0, seed=21, max_tokens=10, logprobs=3),
        SamplingParams(temperature=0.8, seed=22, max_tokens=6, logprobs=0, n=2),
        SamplingParams(temperature=0, max_tokens=5),  # no logprobs next to rows that ask for them
    ]
    expected = _compare(pair, PROMPTS[:4], params)
    lps = expected[0].outputs[0].logprobs
    assert len(lps) == 8 and all(3 <= len(entry) <= 4 for entry in lps)


def test_prefix_caching_shared_prefixes_and_resolved_blocks(qwen3_dir):
    """Later requests hit the shared prefix of earlier ones; the second round's prompts extend the
    first round's outputs, so its hits include blocks whose tokens were placeholders when their KV
    was computed (hashed only once resolved)."""
    pair = _pair(qwen3_dir, block_size=4, enable_prefix_caching=True, max_num_seqs=2)
    stats = pair[0].llm_engine.scheduler.block_manager.stats
    shared = list(range(40, 88))  # 48 tokens: 12 full blocks shared by every prompt
    prompts = [shared + [5 + i] * (1 + 3 * i) for i in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=9 + 2 * i, ignore_eos=i % 2 == 0) for i in range(5)]
    first = _compare(pair, prompts, params)
    first_hits = stats.hits
    second = [p + o.outputs[0].token_ids + [7] for p, o in zip(prompts, first)]
    _compare(pair, second, params)
    assert first_hits >= 3 * 48  # admitted two at a time: the last three hit the shared prefix
    assert stats.hits - first_hits > sum(map(len, prompts))  # more than the old prompts: output blocks


def test_chunked_prefill(qwen3_dir, spy_chunks):
    pair = _pair(qwen3_dir, block_size=4, max_num_batched_tokens=32, max_num_seqs=4)
    chunked = spy_chunks(pair[0].llm_engine)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 480) for _ in range(n)] for n in (40, 90, 7, 65, 33)]
    params = [
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=31, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=14),
        SamplingParams(temperature=0.8, seed=32, max_tokens=8, n=2),
        SamplingParams(temperature=0, max_tokens=6, logprobs=2),
    ]
    _compare(pair, prompts, params)
    assert any(chunked)  # some async steps computed a non-final chunk


def test_preemption(qwen3_dir):
    """12 blocks of 4 tokens for 6 requests of up to ~40 tokens: requests are preempted, some
    while their last token is still in flight (they resolve in the waiting queue)."""
    pair = _pair(qwen3_dir, block_size=4, num_gpu_blocks_override=12, max_num_seqs=6)
    scheduler = pair[0].llm_engine.scheduler
    resolved_while_waiting = []
    on_resolved = scheduler.on_tokens_resolved

    def spy(seqs):
        resolved_while_waiting.extend(s.status == SequenceStatus.WAITING for s in seqs)
        on_resolved(seqs)

    scheduler.on_tokens_resolved = spy
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=41, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=42, max_tokens=18, n=2),
        SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[221]),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    ]
    _compare(pair, PROMPTS, params)
    assert scheduler.num_preemptions > 0
    assert any(resolved_while_waiting)


def test_penalties_wait_for_token_values(pair, monkeypatch):
    """A batch with penalties reads output ids: the engine resolves the step in flight first, so
    no such batch carries a placeholder."""
    runner = pair[0].llm_engine.model_runner
    execute = runner.execute_model
    penalised_steps = []

    def spy(so):
        if any(needs_token_values(sp) for sp in so.sampling_params):
            penalised_steps.append(so.prev_sampled_token_ids is None)
            assert not any(s.data.num_placeholders for s in so.seqs)
        return execute(so)

    monkeypatch.setattr(runner, "execute_model", spy)
    params = [
        SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, seed=51, max_tokens=10, frequency_penalty=0.8),
        SamplingParams(temperature=0, max_tokens=14, presence_penalty=0.6),
        SamplingParams(temperature=0, max_tokens=16),  # plain rows in the same batches
        SamplingParams(temperature=1.0, seed=52, max_tokens=20, stop_token_ids=[7, 8, 9]),
        SamplingParams(temperature=0, max_tokens=3, repetition_penalty=0.8, frequency_penalty=-0.3),
    ]
    expected = _compare(pair, PROMPTS, params)
    assert len(penalised_steps) >= 10 and all(penalised_steps)
    greedy = pair[1].generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert greedy[0].outputs[0].token_ids != expected[0].outputs[0].token_ids  # the penalty acted


def test_penalised_request_admitted_next_to_in_flight_rows(qwen3_dir):
    """The 8-token prompt fills step 1's budget; the penalised request is admitted in step 2 next to
    the first one's decode row, whose input is a placeholder."""
    pair = _pair(qwen3_dir, max_num_batched_tokens=8, max_num_seqs=2)
    params = [
        SamplingParams(temperature=0, max_tokens=4),
        SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.2),
    ]
    _compare(pair, [list(range(10, 18)), [5, 6, 7]], params)


def test_length_cap_by_max_model_len(qwen3_dir):
    """Prompts close to max_model_len end by the length cap; async schedules no row past it."""
    pair = _pair(qwen3_dir, block_size=4, max_model_len=64)
    rows = [_count_rows(llm.llm_engine) for llm in pair]
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 480) for _ in range(n)] for n in (60, 62, 63, 10)]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=61, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    ]
    expected = _compare(pair, prompts, params)
    assert [len(o.outputs[0].token_ids) for o in expected] == [4, 2, 1, 20]
    assert {o.outputs[0].finish_reason for o in expected} == {"length"}
    assert sum(rows[0]) == sum(rows[1])


# ---- 5. work accounting ----------------------------------------------------------------------------


def test_rows_equal_sync_when_every_stop_is_by_length(qwen3_dir):
    """A sequence whose in-flight token is its last is not scheduled again: no wasted row."""
    pair = _pair(qwen3_dir, block_size=4, max_num_seqs=3)  # 6 prompts: later ones wait for room
    rows = [_count_rows(llm.llm_engine) for llm in pair]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 3, 8, 13, 2, 20)] + [
        SamplingParams(n=2, temperature=1.0, seed=71, max_tokens=6, ignore_eos=True)
    ]
    _compare(pair, PROMPTS + ["n two"], params)
    # every sequence: one row per output token (its prefill, or a fork's recompute, samples the first)
    assert sum(rows[0]) == sum(rows[1]) == 1 + 3 + 8 + 13 + 2 + 20 + 2 * 6


def test_rows_at_most_one_extra_per_early_stop(qwen3_dir, eos_prompt):
    """A sequence that stops on a token value (EOS, a stop id or string) was already scheduled for
    the next step: that row is wasted, at most one per such stop."""
    pair = _pair(qwen3_dir, block_size=4)
    base = pair[1].generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    _, stop_id = _first_new_token(base[0].outputs[0].token_ids, 3)
    stop_str = base[2].outputs[0].text[-6:][:4]
    rows = [_count_rows(llm.llm_engine) for llm in pair]
    prompts = [eos_prompt, PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[4]]
    params = [
        SamplingParams(temperature=0, max_tokens=16),  # EOS
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=16, stop=[stop_str]),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=81, max_tokens=16),
    ]
    expected = _compare(pair, prompts, params)
    assert [o.outputs[0].finish_reason for o in expected[:3]] == ["stop"] * 3  # all three triggered
    early = sum(o.outputs[0].finish_reason == "stop" for o in expected)
    assert sum(rows[1]) <= sum(rows[0]) <= sum(rows[1]) + early


# ---- 6. the overlap is real ------------------------------------------------------------------------


def test_steps_are_scheduled_on_placeholders(qwen3_dir):
    """Async step n+1 is scheduled and launched with step n's tokens still unread: its rows' inputs
    are placeholders filled on the device; a finished request is reported one step later."""
    pair = _pair(qwen3_dir, block_size=4)
    inputs = []  # per engine: per step, (the first scheduled token of each row, previous ids given?)
    for llm in pair:
        engine, log = llm.llm_engine, []
        inputs.append(log)
        execute = engine.model_runner.execute_model
        engine.model_runner.execute_model = lambda so, execute=execute, log=log: (
            log.append(
                ([s.get_token_ids()[s.data.num_computed_tokens] for s in so.seqs], so.prev_sampled_token_ids)
            )
            or execute(so)
        )
        engine.add_request(
            "long", None, [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        )
        engine.add_request("one", None, [9, 10], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))

    engine = pair[0].llm_engine
    assert engine.step() == []  # both prefilled; "one" has its only token in flight
    assert [s.get_last_token_id() for s in engine.in_flight.seqs] == [placeholder_id(0), placeholder_id(1)]
    second = engine.step()
    assert [o.request_id for o in second] == ["one"] and second[0].outputs[0].token_ids[0] >= 0
    (seq,) = engine.in_flight.seqs  # "one" was not scheduled again
    assert seq.get_last_token_id() == placeholder_id(0) and seq.data.num_placeholders == 1
    assert seq.data.get_num_known_tokens() == seq.get_len() - 1 == 4 + 1
    decode_ids, prev = inputs[0][1]
    assert decode_ids == [placeholder_id(0)] and prev is not None  # decoded from the unread token
    got = {"one": second[0], **_drain(engine)}

    sync = pair[1].llm_engine
    expected = {o.request_id: o for o in sync.step()}
    assert list(expected) == ["one"]  # reported in the step that sampled it
    for _ in range(MAX_STEPS):
        if not sync.has_unfinished_requests():
            break
        assert all(s.data.num_placeholders == 0 for r in sync.scheduler.running for s in r.seqs)
        assert all(s.get_last_token_id() >= 0 for r in sync.scheduler.running for s in r.seqs)
        expected.update((o.request_id, o) for o in sync.step())
    assert all(min(ids) >= 0 and prev is None for ids, prev in inputs[1])
    assert sum(len(ids) for ids, _ in inputs[0]) == sum(len(ids) for ids, _ in inputs[1])
    _assert_same([got["long"], got["one"]], [expected["long"], expected["one"]])


# ---- 7. configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_async_scheduling_must_be_bool_or_none(qwen3_dir, value):
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(qwen3_dir, async_scheduling=value)


def test_async_scheduling_refused_with_tensor_parallelism(qwen3_dir):
    """Checked when the configuration is built, before m5 would start any worker process."""
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        EngineConfig.from_llm_kwargs(qwen3_dir, async_scheduling=True, tensor_parallel_size=2)
    for allowed in (None, False):
        config = EngineConfig.from_llm_kwargs(qwen3_dir, async_scheduling=allowed, tensor_parallel_size=2)
        assert config.scheduler_config.async_scheduling is allowed
    config = EngineConfig.from_llm_kwargs(qwen3_dir, async_scheduling=True)
    assert config.scheduler_config.async_scheduling is True


def test_m3_rejects_async_scheduling(qwen3_dir):
    with pytest.raises(ValueError, match="m4_cudagraph"):
        m3_paged.LLM(qwen3_dir, async_scheduling=True)


def test_default_is_off_on_cpu(qwen3_dir):
    assert LLM(qwen3_dir).llm_engine.async_scheduling is False
    assert LLM(qwen3_dir, async_scheduling=True).llm_engine.async_scheduling is True
    assert LLM(qwen3_dir, async_scheduling=False).llm_engine.async_scheduling is False


# ---- 8. abort while a step is in flight -----------------------------------------------------------


def test_abort_while_in_flight(qwen3_dir):
    async_llm, sync_llm = _pair(qwen3_dir, block_size=4)
    requests = {
        "a": ([11, 12, 13, 14, 15], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)),
        "b": ([21, 22, 23], SamplingParams(temperature=1.0, seed=91, max_tokens=10, ignore_eos=True)),
        "c": ([31, 32], SamplingParams(n=2, temperature=0.9, seed=92, max_tokens=10, ignore_eos=True)),
    }
    engine = async_llm.llm_engine
    for request_id, (prompt, sp) in requests.items():
        engine.add_request(request_id, None, prompt, sp)
    finished, got = [], {}
    make_output = engine._make_output
    engine._make_output = lambda req: finished.append(req) or make_output(req)
    for _ in range(3):
        assert engine.step() == []
    (victim,) = [
        s for s in engine.in_flight.seqs if s.seq_id in {q.seq_id for q in _request(engine, "b").seqs}
    ]
    assert victim.data.num_placeholders == 1
    engine.abort_request("b")
    got.update(_drain(engine))
    _assert_clean(engine, finished)

    full_b = sync_llm.generate([requests["b"][0]], requests["b"][1], use_tqdm=False)[0].outputs[0]
    b = got["b"].outputs[0]
    assert b.finish_reason == "abort" and b.token_ids == full_b.token_ids[:2]  # the in-flight 3rd is dropped
    expected = sync_llm.generate(
        [requests["a"][0], requests["c"][0]], [requests["a"][1], requests["c"][1]], use_tqdm=False
    )
    _assert_same([got["a"], got["c"]], expected)


# ---- a few random mixed workloads ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_mixed_workloads(qwen3_dir, seed):
    """Small caches, chunking, shared prefixes, forks, stops, logprobs and penalties at once."""
    rng = random.Random(seed)
    kwargs = dict(block_size=rng.choice([1, 2, 4]), max_num_seqs=rng.choice([2, 3, 5]), max_model_len=64)
    kwargs["max_num_batched_tokens"] = rng.choice([8, 32, 2048])
    kwargs["num_gpu_blocks_override"] = 3 * 64 // kwargs["block_size"]  # any request fits alone
    shared = [rng.randrange(3, 480) for _ in range(rng.randrange(0, 20))]
    prompts, params = [], []
    for _ in range(rng.randrange(4, 9)):
        prompts.append(shared[: rng.randrange(len(shared) + 1)] + [rng.randrange(3, 480) for _ in range(5)])
        n, max_tokens = min(rng.choice([1, 1, 2, 3]), kwargs["max_num_seqs"]), rng.randrange(1, 25)
        random_sampling = n > 1 or rng.random() < 0.5
        params.append(
            SamplingParams(
                n=n,
                best_of=min(n + rng.choice([0, 1]), kwargs["max_num_seqs"]) if random_sampling else 1,
                temperature=rng.choice([0.8, 1.5]) if random_sampling else 0,
                top_k=rng.choice([-1, 5]),
                seed=rng.randrange(1000),
                max_tokens=max_tokens,
                min_tokens=min(rng.choice([0, 2]), max_tokens),
                stop_token_ids=rng.sample(range(3, 480), rng.choice([0, 20])),
                stop=rng.choice([[], ["a", "e"]]),
                logprobs=rng.choice([None, 2]),
                repetition_penalty=rng.choice([1.0, 1.0, 1.0, 1.3]),
            )
        )
    _compare(_pair(qwen3_dir, **kwargs), prompts, params)
