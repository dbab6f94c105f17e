"""SamplingParams: vLLM's defaults, every invalid value, and the derived sampling type."""

from __future__ import annotations

import dataclasses

import pytest

from m0_config.sampling_params import BeamSearchParams, SamplingParams, SamplingType

pytestmark = pytest.mark.m0

# vLLM's SamplingParams defaults (vllm/sampling_params.py), as the constructor's signature states them.
VLLM_DEFAULTS = {
    "n": 1,
    "best_of": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
}


def test_declared_defaults_equal_vllms():
    declared = {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.init}
    assert declared == VLLM_DEFAULTS


def test_normalised_defaults():
    p = SamplingParams()
    assert p.best_of == 1  # best_of defaults to n
    assert p.stop == [] and p.stop_token_ids == []
    assert p.sampling_type == SamplingType.RANDOM
    assert SamplingParams(n=3).best_of == 3


def test_stop_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    ids = (5, 7)
    p = SamplingParams(stop_token_ids=ids)
    assert p.stop_token_ids == [5, 7] and isinstance(p.stop_token_ids, list)
    assert p.all_stop_token_ids == {5, 7}


# (constructor kwargs, field named in the message, allowed range named in the message)
INVALID = [
    ({"n": 0}, "n", "an int >= 1"),
    ({"n": -1}, "n", "an int >= 1"),
    ({"n": 1.5}, "n", "an int >= 1"),
    ({"n": 3, "best_of": 2}, "best_of", "an int >= n (3)"),
    ({"best_of": 2.0}, "best_of", "an int >= n (1)"),
    ({"n": 2, "temperature": 0.0}, "n", "1 when temperature=0 (greedy)"),  # the field the user set
    ({"best_of": 4, "temperature": 0.0}, "best_of", "1 when temperature=0 (greedy)"),
    ({"n": 2, "temperature": -0.5}, "temperature", ">= 0 (0 means greedy)"),  # not a greedy n/best_of
    ({"seed": "1"}, "seed", "an int in [-2**63, 2**64) or None"),
    ({"seed": 2**64}, "seed", "an int in [-2**63, 2**64) or None"),
    ({"seed": 1.0}, "seed", "an int in [-2**63, 2**64) or None"),
    ({"presence_penalty": 2.01}, "presence_penalty", "in [-2, 2]"),
    ({"presence_penalty": -2.01}, "presence_penalty", "in [-2, 2]"),
    ({"frequency_penalty": 3.0}, "frequency_penalty", "in [-2, 2]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "in [-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "> 0"),
    ({"temperature": -0.1}, "temperature", ">= 0 (0 means greedy)"),
    ({"top_p": 0.0}, "top_p", "in (0, 1]"),
    ({"top_p": 1.1}, "top_p", "in (0, 1]"),
    ({"top_k": -2}, "top_k", "-1 or 0 (disabled) or an int >= 1"),
    ({"top_k": 2.5}, "top_k", "-1 or 0 (disabled) or an int >= 1"),
    ({"min_p": -0.1}, "min_p", "in [0, 1]"),
    ({"min_p": 1.5}, "min_p", "in [0, 1]"),
    ({"max_tokens": 0}, "max_tokens", "an int >= 1 or None"),
    ({"max_tokens": 8.0}, "max_tokens", "an int >= 1 or None"),
    ({"min_tokens": -1}, "min_tokens", "an int >= 0"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "<= max_tokens (10)"),
    ({"logprobs": -1}, "logprobs", "an int >= 0 or None"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "an int >= 0 or None"),
    ({"stop": [""]}, "stop", "a list of non-empty strings"),
    ({"stop": ["ok", 3]}, "stop", "a list of non-empty strings"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "a list of ints >= 0"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids", "a list of ints >= 0"),
    # Wrong types are ValueErrors naming the field too, never a TypeError from a comparison.
    ({"temperature": "0.5"}, "temperature", "a finite number"),
    ({"temperature": float("nan")}, "temperature", "a finite number"),
    ({"top_p": None}, "top_p", "a finite number"),
    ({"min_p": None}, "min_p", "a finite number"),
    ({"presence_penalty": "1"}, "presence_penalty", "a finite number"),
    ({"frequency_penalty": None}, "frequency_penalty", "a finite number"),
    # inf would turn a seen token's logit of exactly 0 into 0 * inf = NaN, which argmax picks.
    ({"repetition_penalty": float("inf")}, "repetition_penalty", "a finite number"),
    # A bool is an int to Python, but max_tokens=True is a mistake, not "1 token".
    ({"max_tokens": True}, "max_tokens", "an int >= 1 or None"),
    ({"logprobs": True}, "logprobs", "an int >= 0 or None"),
    ({"n": True}, "n", "an int >= 1"),
    ({"top_k": False}, "top_k", "-1 or 0 (disabled) or an int >= 1"),
]


@pytest.mark.parametrize("kwargs, field, allowed", INVALID, ids=[str(k) for k, _, _ in INVALID])
def test_invalid_value_names_the_field_and_the_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(f"{field} must be {allowed}, got ")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},  # greedy with n = best_of = 1
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"max_tokens": None, "min_tokens": 100},  # no cap: any min_tokens
        {"min_tokens": 16, "max_tokens": 16},
        {"n": 2, "best_of": 5, "seed": 0},
        {"logprobs": 0, "prompt_logprobs": 0},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        assert getattr(p, key) == value


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"temperature": 0.0}, SamplingType.GREEDY),
        ({"temperature": 0.0, "seed": 3}, SamplingType.GREEDY),  # a seed does not matter for argmax
        ({"temperature": 1.0}, SamplingType.RANDOM),
        ({"temperature": 0.7, "top_k": 5}, SamplingType.RANDOM),
        ({"temperature": 0.7, "seed": 0}, SamplingType.RANDOM_SEED),  # seed 0 is a seed, not "none"
        ({"seed": 1234}, SamplingType.RANDOM_SEED),
    ],
)
def test_sampling_type(kwargs, expected):
    assert SamplingParams(**kwargs).sampling_type == expected


def test_sampling_type_is_derived_not_an_argument():
    with pytest.raises(TypeError):
        SamplingParams(sampling_type=SamplingType.GREEDY)


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width", "an int >= 1"),
        ({"beam_width": 2.0, "max_tokens": 4}, "beam_width", "an int >= 1"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens", "an int >= 1"),
        (
            {"beam_width": 2, "max_tokens": 4, "temperature": 0.7},
            "temperature",
            "0 for beam search (beams rank raw logprobs)",
        ),
    ],
)
def test_beam_search_params_errors(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        BeamSearchParams(**kwargs)
    assert str(e.value).startswith(f"{field} must be {allowed}, got ")


def test_beam_search_params_defaults():
    p = BeamSearchParams(beam_width=4, max_tokens=8)
    assert (p.ignore_eos, p.temperature, p.length_penalty) == (False, 0.0, 1.0)
