"""Bad input raises a clear ValueError, and the engine keeps working afterwards."""

from __future__ import annotations

import pytest

from m1_sampling import LLM, SamplingParams

pytestmark = pytest.mark.m1


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(qwen3_dir, max_model_len=64)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ("", "empty"),
        ([[]], "empty"),
        ([[1, 2, 10**6]], "outside the vocabulary"),
        ([[1, -1]], "outside the vocabulary"),
        ([list(range(1, 65))], "max_model_len is 64"),
        ([{"prompt": "x"}], "prompt_token_ids"),
        # A key this engine does not understand is refused, not silently dropped.
        ([{"prompt_token_ids": [1, 2], "multi_modal_data": {"image": 0}}], "multi_modal_data"),
        (42, "prompts must be"),
    ],
)
def test_bad_prompts(llm, prompts, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    ok = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3


def test_params_list_length_mismatch(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_bad_prompt_in_batch_adds_nothing(llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate(["Hello", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_long_generation_capped_by_max_model_len(llm):
    ids = list(range(1, 60))
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[
        0
    ]
    assert len(ids) + len(out.outputs[0].token_ids) == 64
    assert out.outputs[0].finish_reason == "length"


def test_unknown_and_unsupported_arguments(qwen3_dir):
    with pytest.raises(ValueError, match="Did you mean 'max_num_seqs'"):
        LLM(qwen3_dir, max_num_seq=4)
    with pytest.raises(ValueError, match="block_size.*m3_paged"):
        LLM(qwen3_dir, block_size=16)
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/nonexistent/model")


def test_prompt_logprobs_rejected(llm):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate("Hello", SamplingParams(prompt_logprobs=1), use_tqdm=False)


def test_logprobs_beyond_the_vocabulary_rejected(llm):
    """More logprobs than the vocabulary has would be silently cut to vocab_size entries."""
    vocab_size = llm.llm_engine.config.model_config.vocab_size
    with pytest.raises(ValueError, match=f"logprobs must be <= the vocabulary size \\({vocab_size}\\)"):
        llm.generate("Hello", SamplingParams(logprobs=vocab_size + 1, max_tokens=1), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate("Hello", SamplingParams(logprobs=vocab_size, max_tokens=1), use_tqdm=False)
    assert len(out[0].outputs[0].logprobs[0]) == vocab_size


def test_failed_call_leaves_nothing_queued(llm):
    """A request that fails while being queued (here: a seed torch cannot take) takes the earlier
    requests of the same call with it."""
    bad = SamplingParams(seed=2**64 - 1, temperature=1.0)
    object.__setattr__(bad, "seed", 2**70)  # past SamplingParams' own check, as a bug elsewhere might
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        llm.generate(["Hello", "world"], [SamplingParams(max_tokens=2), bad], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests() and not llm.llm_engine.generators
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert [o.request_id for o in out] and len(out[0].outputs[0].token_ids) == 2


def test_interrupted_call_drops_its_generators(llm):
    engine = llm.llm_engine
    original = engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original()

    engine.step = failing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate("Hello", SamplingParams(n=3, seed=1, temperature=1.0, max_tokens=8), use_tqdm=False)
    finally:
        del engine.step
    assert not engine.generators and not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda llm: llm.chat("hello"), "messages must be"),
        (lambda llm: llm.chat([["not a dict"]]), "each conversation"),
        (lambda llm: SamplingParams(stop=5), "stop must be"),
        (lambda llm: SamplingParams(stop_token_ids=5), "stop_token_ids must be"),
        (lambda llm: SamplingParams(seed=2**64), "seed must be"),
    ],
)
def test_wrong_types_are_value_errors(llm, call, match):
    with pytest.raises(ValueError, match=match):
        call(llm)


@pytest.mark.parametrize(
    "x",
    [[], [1, 2, 3], [1, True], [True], [1, 2.0], [1, "2"], [1, None], (1, 2), [[1]], [1, 2**70]],
    ids=repr,
)
def test_token_list_check_matches_per_element_reference(x):
    """The set-of-types check accepts exactly what the per-element check does (ints, not bools)."""
    import enum

    import numpy as np

    from m1_sampling.inputs import _is_token_list

    def reference(v):
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    class Color(enum.IntEnum):
        RED = 1

    for value in (
        x,
        x + [np.int64(3)] if isinstance(x, list) else x,
        x + [Color.RED] if isinstance(x, list) else x,
    ):
        assert _is_token_list(value) == reference(value), value
