"""Incremental detokenization against the tokenizer's own full decode, token by token."""

from __future__ import annotations

import random

import pytest

from m0_config.loader import load_tokenizer
from m0_config.outputs import Logprob
from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence
from m1_sampling.detokenizer import REPLACEMENT_CHAR, Detokenizer

pytestmark = pytest.mark.m1

# Multi-byte text: CJK, emoji, accents, some outside the toy corpus (so BPE falls back to bytes and
# single tokens hold partial characters, e.g. "naïve" -> "na\xc3" + "\xafve").
MULTI_BYTE_TEXTS = [
    "hello world 你好 缓存 🚀",
    "naïve café 模型推理",
    "日本語 ü 🎉 ñandú Ω",
    "The model is fast 🙂 and the cache is small.",
    "注意力 attention 🚀🙂 def f(x): return x + 1",
]
PROMPT = "The engine will decode"


@pytest.fixture(scope="module")
def tokenizer(toy_model_dir):
    return load_tokenizer(toy_model_dir("qwen3"))


@pytest.fixture(scope="module")
def detok(tokenizer) -> Detokenizer:
    return Detokenizer(tokenizer)


def emitted_reference(tokenizer, ids: list[int], skip: bool) -> str:
    """What incremental decoding may show after `ids`: the full decode of the longest prefix of `ids`
    whose decode does not end in an unfinished character."""
    for k in range(len(ids), 0, -1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=skip)
        if not text.endswith(REPLACEMENT_CHAR):
            return text
    return ""


def feed(detok: Detokenizer, seq: Sequence, ids: list[int], params: SamplingParams) -> list[int]:
    """Append and decode one token at a time; returns the character counts reported per token."""
    counts = []
    for t in ids:
        before = seq.output_text
        seq.append_token_id(t)
        n = detok.decode_sequence_inplace(seq, params)
        assert seq.output_text.startswith(before) and len(seq.output_text) == len(before) + n
        counts.append(n)
    return counts


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode_on_multi_byte_text(tokenizer, detok, skip):
    params = SamplingParams(skip_special_tokens=skip)
    prompt_ids = tokenizer.encode(PROMPT)
    held_back = 0
    for text in MULTI_BYTE_TEXTS:
        ids = tokenizer.encode(text)
        seq = Sequence(0, PROMPT, prompt_ids)
        for k in range(1, len(ids) + 1):
            [n] = feed(detok, seq, ids[k - 1 : k], params)
            full = tokenizer.decode(ids[:k], skip_special_tokens=skip)
            assert REPLACEMENT_CHAR not in seq.output_text
            if full.endswith(REPLACEMENT_CHAR):
                held_back += 1
                assert n == 0 and full.startswith(seq.output_text)
            else:
                assert seq.output_text == full
        assert seq.output_text == text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert held_back >= 5  # the texts really do split characters across tokens


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode_on_random_ids(tokenizer, detok, skip):
    """Random ids (specials and lone UTF-8 bytes included): after every token the text equals the
    full decode, except that a trailing unfinished character is held back."""
    rng = random.Random(0)
    params = SamplingParams(skip_special_tokens=skip)
    for trial in range(150):
        prompt_ids = tokenizer.encode(rng.choice(MULTI_BYTE_TEXTS + [PROMPT]))[: rng.randint(1, 12)]
        # Keep the prompt at a character boundary: it is context, not output.
        while tokenizer.decode(prompt_ids).endswith(REPLACEMENT_CHAR):
            prompt_ids = prompt_ids[:-1] or tokenizer.encode("a")
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 30))]
        seq = Sequence(trial, None, prompt_ids)
        for k in range(len(ids)):
            feed(detok, seq, ids[k : k + 1], params)
            full = tokenizer.decode(ids[: k + 1], skip_special_tokens=skip)
            if full.endswith(REPLACEMENT_CHAR):
                assert full.startswith(seq.output_text)
            else:
                assert seq.output_text == full
        assert seq.output_text == emitted_reference(tokenizer, ids, skip)


def test_ids_beyond_the_tokenizer_decode_to_nothing(tokenizer, detok):
    """The model's vocabulary (512) is padded past the tokenizer's (480): those ids add no text."""
    assert len(tokenizer) < 512
    ordinary = tokenizer.encode("hello world 你好")
    padded = [len(tokenizer), 511]
    ids = [ordinary[0], *padded, *ordinary[1:3], 500, *ordinary[3:]]
    seq = Sequence(0, None, tokenizer.encode(PROMPT))
    counts = feed(detok, seq, ids, SamplingParams())
    assert seq.output_text == tokenizer.decode(ordinary) == "hello world 你好"
    assert [counts[i] for i in (1, 2, 5)] == [0, 0, 0]


def test_special_tokens_skipped_or_kept(tokenizer, detok):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("hello"), im_end, *tokenizer.encode(" world")]
    for skip, expected in [(True, "hello world"), (False, "hello<|im_end|> world")]:
        seq = Sequence(0, None, tokenizer.encode(PROMPT))
        feed(detok, seq, ids, SamplingParams(skip_special_tokens=skip))
        assert seq.output_text == expected == tokenizer.decode(ids, skip_special_tokens=skip)


class SlowTokenizerView:
    """The toy tokenizer presented as a slow (pure-Python) one, to exercise that decoding path."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize(
    "skip, spaces, expected",
    [
        (False, True, "hello <|im_end|> <|im_start|> world"),
        (False, False, "hello<|im_end|><|im_start|>world"),
        (True, True, "helloworld"),
    ],
)
def test_spaces_between_special_tokens_on_a_slow_tokenizer(tokenizer, skip, spaces, expected):
    """HF's slow decode joins added tokens to their neighbours with a space when asked; fast
    tokenizers (and vLLM on them) ignore the option."""
    detok = Detokenizer(SlowTokenizerView(tokenizer))
    assert detok.use_added_encoders
    specials = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    ids = [*tokenizer.encode("hello"), *specials, *tokenizer.encode("world")]
    seq = Sequence(0, None, tokenizer.encode(PROMPT))
    params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    feed(detok, seq, ids, params)
    assert seq.output_text == expected


def test_logprob_candidates_get_their_text(tokenizer, detok):
    """decoded_token of each candidate = the text it would have appended in the sampled token's place."""
    prompt_ids = tokenizer.encode(PROMPT)
    prefix = tokenizer.encode("hello world 你")
    ni_byte = tokenizer.encode("日")[0]  # the first byte of a 3-byte character: no text yet
    seq = Sequence(0, None, prompt_ids)
    feed(detok, seq, prefix[:-1], SamplingParams())  # no logprobs stored for these
    seq_lp = seq.fork(1)
    seq_lp.output_logprobs = [{} for _ in prefix[:-1]]
    candidates = [prefix[-1], tokenizer.encode(" cache")[0], ni_byte, 505]
    entry = {t: Logprob(-1.0) for t in candidates}
    seq_lp.append_token_id(prefix[-1], -1.0, entry)
    detok.decode_sequence_inplace(seq_lp, SamplingParams(logprobs=len(candidates)))
    before = tokenizer.decode(prefix[:-1])
    for t in candidates[:2]:
        assert entry[t].decoded_token == tokenizer.decode([*prefix[:-1], t])[len(before) :]
    assert entry[prefix[-1]].decoded_token == " 你"
    assert entry[ni_byte].decoded_token == "" and entry[505].decoded_token == ""
    assert seq_lp.output_text == "hello world 你"


def test_fork_continues_independently(tokenizer, detok):
    """A fork taken while half a character is held back completes it its own way."""
    params = SamplingParams()
    ids = tokenizer.encode("naïve café")
    assert tokenizer.decode(ids[:2]).endswith(REPLACEMENT_CHAR)  # "n", "a\xc3"
    seq = Sequence(0, None, tokenizer.encode(PROMPT))
    feed(detok, seq, ids[:2], params)
    child = seq.fork(1)
    # 0xa9 completes 0xc3 to "é"; byte-level BPE spells byte 0xa9 as the character "©".
    child_ids = [*ids[:2], tokenizer.convert_tokens_to_ids("©"), *tokenizer.encode(" 你好")]
    feed(detok, seq, ids[2:], params)
    feed(detok, child, child_ids[2:], params)
    assert seq.output_text == "naïve café"
    assert child.output_text == tokenizer.decode(child_ids) == "naé 你好"


def test_first_token_after_a_prompt_of_one_token(tokenizer, detok):
    seq = Sequence(0, None, tokenizer.encode("a")[:1])
    feed(detok, seq, tokenizer.encode("日本"), SamplingParams())
    assert seq.output_text == "日本"


# ---- decode_all: the one-pass text the engine builds when nothing needs it during generation -----


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_all_equals_hf_decode_on_any_ids(qwen3_dir, skip_special_tokens):
    """On any id stream (invalid UTF-8 included) it is HF's decode of the longest prefix of the
    output whose text does not end in an unfinished character."""
    tok = load_tokenizer(qwen3_dir)
    detok = Detokenizer(tok)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    rng = random.Random(0)
    prompts = [tok(t).input_ids for t in ("Hello, my name is", "你好", "a cache block")]
    for i in range(150):
        # A prompt of real text ends on a character boundary, so the output's bytes stand alone.
        seq = Sequence(0, None, prompts[i % 3])
        for _ in range(rng.randint(1, 25)):
            seq.append_token_id(rng.randrange(512))
        ids = [t for t in seq.data.output_token_ids if t < len(tok)]
        decodes = [
            tok.decode(ids[:end], skip_special_tokens=skip_special_tokens) for end in range(len(ids), 0, -1)
        ]
        expected = next((d for d in decodes if not d.endswith(REPLACEMENT_CHAR)), "")
        assert detok.decode_all(seq, params) == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_all_after_a_long_unfinished_tail(qwen3_dir, skip_special_tokens):
    """An unfinished character followed by many tokens that add no text (special tokens when
    skipped, ids past the tokenizer): every shorter prefix is tried until the character goes; the
    result is still the decode of the longest prefix that ends on a character boundary."""
    tok = load_tokenizer(qwen3_dir)
    detok = Detokenizer(tok)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    head = tok("hello").input_ids
    first_byte = tok.convert_tokens_to_ids("ä")  # byte-level BPE: 0xE4, the first byte of "你"
    assert tok.decode([first_byte]) == REPLACEMENT_CHAR
    special, past_vocab = sorted(detok.special_ids)[0], len(tok) + 3
    seq = Sequence(0, None, tok(PROMPT).input_ids)
    for t in [*head, first_byte, *[special, past_vocab] * 40]:
        seq.append_token_id(t)
    ids = [t for t in seq.data.output_token_ids if t < len(tok)]
    decodes = [
        tok.decode(ids[:end], skip_special_tokens=skip_special_tokens) for end in range(len(ids), 0, -1)
    ]
    expected = next((d for d in decodes if not d.endswith(REPLACEMENT_CHAR)), "")
    assert detok.decode_all(seq, params) == expected
    if skip_special_tokens:
        assert expected == tok.decode(head)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_all_equals_token_by_token_on_text(qwen3_dir, skip_special_tokens):
    """On the token streams of real text (what a model emits), the one-pass text equals the
    incremental text, and drop_last equals the incremental text before the last token."""
    tok = load_tokenizer(qwen3_dir)
    detok = Detokenizer(tok)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    texts = ["你好世界 🙂🚀 café naïve", "Hello, my name is vLLM.", "模型推理 cache 🚀 block<|im_end|> done"]
    for text in texts:
        ids = tok(text).input_ids
        for cut in range(1, len(ids) + 1):
            seq, before = Sequence(0, None, [5, 6]), Sequence(1, None, [5, 6])
            for j, t in enumerate(ids[:cut]):
                seq.append_token_id(t)
                detok.decode_sequence_inplace(seq, params)
                if j < cut - 1:
                    before.append_token_id(t)
                    detok.decode_sequence_inplace(before, params)
            assert detok.decode_all(seq, params) == seq.output_text
            assert detok.decode_all(seq, params, drop_last=True) == before.output_text
