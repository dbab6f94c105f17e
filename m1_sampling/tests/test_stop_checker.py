"""Stop conditions, fed one token at a time through the detokenizer and the stop checker."""

from __future__ import annotations

import random

import pytest

from m0_config.loader import get_eos_token_ids, load_tokenizer
from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence, SequenceStatus
from m1_sampling.detokenizer import REPLACEMENT_CHAR, Detokenizer
from m1_sampling.stop_checker import StopChecker, check_stop_strings

pytestmark = pytest.mark.m1

PROMPT = "The engine will decode"
TEXT = "The model is fast and the cache is small. hello world 你好 日本語 naïve café"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def model_dir(toy_model_dir) -> str:
    return toy_model_dir("qwen3")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def detok(tokenizer) -> Detokenizer:
    return Detokenizer(tokenizer)


@pytest.fixture(scope="module")
def eos_ids(tokenizer, model_dir) -> list[int]:
    ids = get_eos_token_ids(tokenizer, model_dir)
    assert len(ids) == 2  # <|endoftext|> from the tokenizer, <|im_end|> from generation_config
    return ids


def generate(
    tokenizer, detok, ids, params, eos_ids=(), max_model_len=MAX_MODEL_LEN, prompt_ids=None
) -> Sequence:
    """The engine's per-token loop over a fixed list of 'sampled' ids, until the sequence finishes."""
    checker = StopChecker(max_model_len, list(eos_ids))
    seq = Sequence(0, PROMPT, tokenizer.encode(PROMPT) if prompt_ids is None else prompt_ids)
    seq.status = SequenceStatus.RUNNING
    for t in ids:
        seq.append_token_id(t)
        checker.maybe_stop_sequence(seq, detok.decode_sequence_inplace(seq, params), params)
        if seq.is_finished():
            break
    return seq


def finish_reason(seq: Sequence) -> str | None:
    return SequenceStatus.get_finished_reason(seq.status)


def spanning_stop_string(tokenizer, ids: list[int], i: int) -> str:
    """Two characters from each side of the boundary between tokens i and i+1."""
    left, right = tokenizer.decode(ids[i : i + 1]), tokenizer.decode(ids[i + 1 : i + 2])
    stop = left[-2:] + right[:2]
    assert len(left) >= 2 and len(right) >= 2 and all(stop not in tokenizer.decode([t]) for t in ids)
    return stop


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_a_token_boundary(tokenizer, detok, include):
    ids = tokenizer.encode(TEXT)
    i = 3  # " fast" | " and"
    stop = spanning_stop_string(tokenizer, ids, i)
    seq = generate(tokenizer, detok, ids, SamplingParams(stop=[stop], include_stop_str_in_output=include))
    index = TEXT.index(stop)
    assert seq.get_output_len() == i + 2  # stopped on the token that completed the string
    assert seq.output_text == TEXT[: index + len(stop) if include else index]
    assert (finish_reason(seq), seq.stop_reason) == ("stop", stop)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_inside_a_split_character(tokenizer, detok, include):
    """ "日本" is six one-byte tokens here (the first merged with the space before it): the match
    appears only once the last byte of "本" arrives."""
    ids = tokenizer.encode(TEXT)
    stop = "本"
    assert len(tokenizer.encode(stop)) == 3
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include, max_tokens=None)
    seq = generate(tokenizer, detok, ids, params)
    index = TEXT.index(stop)
    assert tokenizer.decode(seq.data.output_token_ids) == TEXT[: index + 1]
    assert seq.output_text == TEXT[: index + 1 if include else index]
    assert seq.stop_reason == stop


def test_stop_string_in_a_token_that_holds_more_text(tokenizer, detok):
    """A stop string in the middle of one token: the token's text after it is dropped too."""
    ids = tokenizer.encode(TEXT)
    seq = generate(tokenizer, detok, ids, SamplingParams(stop=["ach"]))
    assert seq.output_text == TEXT[: TEXT.index("ach")] and seq.stop_reason == "ach"
    seq = generate(tokenizer, detok, ids, SamplingParams(stop=["ach"], include_stop_str_in_output=True))
    assert seq.output_text == TEXT[: TEXT.index("ach") + 3]


def test_earliest_stop_string_wins(tokenizer, detok):
    ids = tokenizer.encode(TEXT)
    seq = generate(tokenizer, detok, ids, SamplingParams(stop=["cache", "he cac"]))
    assert seq.output_text == TEXT[: TEXT.index("he cac")] and seq.stop_reason == "he cac"


def stopped_text_brute_force(tokenizer, ids: list[int], stops: list[str]) -> tuple[str, str | None, int]:
    """Without any search window: decode every prefix in full, hold back an unfinished character,
    and cut at the earliest stop string the first time one appears."""
    text = ""
    for k in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:k])
        text = text if full.endswith(REPLACEMENT_CHAR) else full
        hits = [(text.find(s), i) for i, s in enumerate(stops) if s in text]
        if hits:
            index, i = min(hits)
            return text[:index], stops[i], k
    return text, None, len(ids)


def test_stop_strings_equal_a_brute_force_search(tokenizer, detok):
    rng = random.Random(0)
    corpus_ids = tokenizer.encode(TEXT + " " + PROMPT + " 缓存 🚀 模型推理 🙂")
    for _ in range(150):
        start = rng.randrange(len(corpus_ids) - 8)
        ids = corpus_ids[start : start + rng.randint(8, 30)]
        text = tokenizer.decode(ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(text))
            stops.append(text[a : a + rng.randint(1, 6)].replace(REPLACEMENT_CHAR, "x") or "x")
        stops.append("never there")
        seq = generate(tokenizer, detok, ids, SamplingParams(stop=stops, max_tokens=None))
        expected, reason, num_tokens = stopped_text_brute_force(tokenizer, ids, stops)
        assert (seq.output_text, seq.stop_reason, seq.get_output_len()) == (expected, reason, num_tokens)


@pytest.mark.parametrize("skip", [True, False])
def test_eos_stops_without_its_text_and_without_stop_reason(tokenizer, detok, eos_ids, skip):
    ids = tokenizer.encode("hello world")
    for eos in eos_ids:
        seq = generate(tokenizer, detok, [*ids, eos, *ids], SamplingParams(skip_special_tokens=skip), eos_ids)
        assert seq.get_output_len() == len(ids) + 1
        assert (seq.output_text, finish_reason(seq), seq.stop_reason) == ("hello world", "stop", None)


def test_ignore_eos_runs_to_max_tokens(tokenizer, detok, eos_ids):
    ids = tokenizer.encode("hello world")
    stream = [*ids, eos_ids[0], *ids, eos_ids[1], *ids]
    params = SamplingParams(ignore_eos=True, max_tokens=len(stream) - 1)
    seq = generate(tokenizer, detok, stream, params, eos_ids)
    assert seq.get_output_len() == len(stream) - 1
    assert (finish_reason(seq), seq.stop_reason) == ("length", None)
    assert seq.output_text == tokenizer.decode(stream[:-1], skip_special_tokens=True)


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_ids_report_the_id(tokenizer, detok, eos_ids, include):
    ids = tokenizer.encode(TEXT)
    stop_id = ids[4]  # " and": an ordinary token, so its text shows whether it is kept
    params = SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=include)
    seq = generate(tokenizer, detok, ids, params, eos_ids)
    assert seq.get_output_len() == 5
    assert seq.output_text == tokenizer.decode(ids[: 5 if include else 4])
    assert (finish_reason(seq), seq.stop_reason) == ("stop", stop_id)


def test_eos_listed_in_stop_token_ids_still_counts_as_eos(tokenizer, detok, eos_ids):
    ids = [*tokenizer.encode("hello"), eos_ids[0]]
    seq = generate(tokenizer, detok, ids, SamplingParams(stop_token_ids=[eos_ids[0]]), eos_ids)
    assert (finish_reason(seq), seq.stop_reason) == ("stop", None)
    seq = generate(tokenizer, detok, ids, SamplingParams(stop_token_ids=[eos_ids[0]], ignore_eos=True))
    assert (finish_reason(seq), seq.stop_reason) == ("stop", eos_ids[0])


@pytest.mark.parametrize("kind", ["eos", "stop_token", "stop_string"])
@pytest.mark.parametrize("min_tokens", [0, 3, 4])
def test_min_tokens_delays_every_stop(tokenizer, detok, eos_ids, kind, min_tokens):
    """The trigger comes as output tokens 2 and 4; min_tokens=3 skips the first, min_tokens=4 is met
    exactly by the second."""
    a, b = tokenizer.encode(" cache")[0], tokenizer.encode(" model")[0]
    trigger = {"eos": eos_ids[1], "stop_token": a, "stop_string": a}[kind]
    params = SamplingParams(
        min_tokens=min_tokens,
        max_tokens=10,
        stop_token_ids=[a] if kind == "stop_token" else None,
        stop=[" cache"] if kind == "stop_string" else None,
    )
    seq = generate(tokenizer, detok, [b, trigger, b, trigger, b, b], params, eos_ids)
    assert seq.get_output_len() == (2 if min_tokens == 0 else 4)
    assert finish_reason(seq) == "stop"
    if min_tokens == 0:
        assert seq.output_text == " model"
    else:  # the first trigger's text stays; the second's goes
        assert seq.output_text == (" model model" if kind == "eos" else " model cache model")


def test_max_tokens_is_a_length_finish(tokenizer, detok):
    ids = tokenizer.encode(TEXT)
    seq = generate(tokenizer, detok, ids, SamplingParams(max_tokens=5))
    assert (seq.get_output_len(), finish_reason(seq), seq.stop_reason) == (5, "length", None)
    assert seq.output_text == tokenizer.decode(ids[:5])


def test_stop_beats_length_on_the_same_token(tokenizer, detok):
    ids = tokenizer.encode(TEXT)
    seq = generate(tokenizer, detok, ids, SamplingParams(max_tokens=5, stop_token_ids=[ids[4]]))
    assert (seq.get_output_len(), finish_reason(seq), seq.stop_reason) == (5, "stop", ids[4])


def test_max_model_len_is_a_length_finish(tokenizer, detok):
    prompt_ids = tokenizer.encode(PROMPT)
    ids = tokenizer.encode(TEXT)
    max_model_len = len(prompt_ids) + 3
    params = SamplingParams(max_tokens=None)
    seq = generate(tokenizer, detok, ids, params, max_model_len=max_model_len, prompt_ids=prompt_ids)
    assert (seq.get_len(), seq.get_output_len(), finish_reason(seq)) == (max_model_len, 3, "length")


@pytest.mark.parametrize("kind", ["eos", "stop_token", "stop_string"])
def test_a_stop_on_the_last_token_that_fits_is_still_a_stop(tokenizer, detok, eos_ids, kind):
    """The token that reaches max_model_len may also be a stop: it is reported as one ("stop", its
    stop_reason) and its text is cut, exactly as one token earlier (vLLM checks stops first)."""
    prompt_ids = tokenizer.encode(PROMPT)
    hello, world = tokenizer.encode(" hello world")
    last = eos_ids[1] if kind == "eos" else world
    params = SamplingParams(
        max_tokens=None,
        skip_special_tokens=False,  # so that EOS has text that must be cut
        stop_token_ids=[world] if kind == "stop_token" else None,
        stop=[" world"] if kind == "stop_string" else None,
    )
    seq = generate(tokenizer, detok, [hello, last, hello], params, eos_ids, len(prompt_ids) + 2, prompt_ids)
    assert seq.get_len() == len(prompt_ids) + 2  # the cap is reached on the stopping token
    reason = {"eos": None, "stop_token": world, "stop_string": " world"}[kind]
    assert (finish_reason(seq), seq.stop_reason, seq.output_text) == ("stop", reason, " hello")


def test_running_sequence_is_left_alone(tokenizer, detok, eos_ids):
    ids = tokenizer.encode("hello world")
    seq = generate(tokenizer, detok, ids, SamplingParams(stop=["xyz"], max_tokens=len(ids) + 1), eos_ids)
    assert seq.status == SequenceStatus.RUNNING and seq.stop_reason is None
    assert finish_reason(seq) is None and seq.output_text == "hello world"


@pytest.mark.parametrize(
    "text, new, stops, include, expected",
    [
        ("abcdef", 1, ["cdef"], False, ("cdef", 2)),  # spans old and new text
        ("abcdef", 1, ["cde"], False, None),  # entirely in text already checked
        ("abcdef", 2, ["ef", "de"], False, ("de", 3)),  # earliest start wins
        ("abcdef", 3, ["d"], True, ("d", 4)),
        ("abcdef", 0, ["f"], False, None),  # nothing new
        ("abcdef", 6, [], False, None),
    ],
)
def test_check_stop_strings_window(text, new, stops, include, expected):
    assert check_stop_strings(text, new, stops, include) == expected


def test_max_model_len_beats_min_tokens():
    """min_tokens holds back EOS and stops, never the model-length cap."""
    checker = StopChecker(max_model_len=8, eos_token_ids=[0])
    seq = Sequence(0, None, [5, 6, 7, 8, 9, 10])
    params = SamplingParams(min_tokens=5, max_tokens=10)
    seq.append_token_id(11)
    checker.maybe_stop_sequence(seq, 0, params)
    assert not seq.is_finished()
    seq.append_token_id(12)  # 8 tokens = max_model_len, although min_tokens wants 5 outputs
    checker.maybe_stop_sequence(seq, 0, params)
    assert seq.status == SequenceStatus.FINISHED_LENGTH_CAPPED
