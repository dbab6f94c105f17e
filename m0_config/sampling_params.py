"""`SamplingParams` with vLLM's field names and defaults, validated in `__post_init__`.

Invalid values raise `ValueError` naming the field and the allowed range, at construction time:
a request with bad parameters never reaches the engine.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

# Temperatures below this count as greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-7 only
# turns the distribution into an argmax with a risk of overflow, so it is treated as exactly that.
SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    GREEDY = 0  # temperature == 0: argmax, no randomness
    RANDOM = 1  # sample from the engine's global generator
    RANDOM_SEED = 2  # sample from the request's own generator (reproducible in any batch)


def _check(cond: bool, field_name: str, allowed: str, value: object) -> None:
    if not cond:
        raise ValueError(f"{field_name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    """An int that is not a bool: Python counts True as 1, but max_tokens=True is a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    """A real number (Python's or numpy's), not a bool, not NaN or +-inf."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# The float fields: each must be a finite number before its range can be compared.
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


@dataclass
class SamplingParams:
    """How to turn logits into tokens, and when to stop. Field names and defaults are vLLM's."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0  # below SAMPLING_EPS (including 0): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Derived: the stop strings as a list, and the sampling type.
    sampling_type: SamplingType = field(init=False)

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.stop, (list, tuple)), "stop", "a string, a list of strings or None", self.stop)
        self.stop = list(self.stop)
        ids = self.stop_token_ids
        _check(ids is None or isinstance(ids, (list, tuple)), "stop_token_ids", "a list of ints or None", ids)
        self.stop_token_ids = list(ids or [])
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            _check(_is_finite_number(value), name, "a finite number", value)
        self._verify_truncation()  # before _verify_counts, which reads the temperature
        self._verify_counts()
        self._verify_penalties()
        self._verify_lengths()
        self._verify_stops()
        self.sampling_type = self._sampling_type()

    def _verify_counts(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", "an int >= 1", self.n)
        _check(
            _is_int(self.best_of) and self.best_of >= self.n,
            "best_of",
            f"an int >= n ({self.n})",
            self.best_of,
        )
        if self.temperature < SAMPLING_EPS:
            # Greedy decoding is deterministic: extra candidates would all be the same sequence.
            # n first: best_of defaults to n, and the message should name the field the user set.
            _check(self.n == 1, "n", "1 when temperature=0 (greedy)", self.n)
            _check(self.best_of == 1, "best_of", "1 when temperature=0 (greedy)", self.best_of)
        _check(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
            "seed",
            "an int in [-2**63, 2**64) or None",
            self.seed,
        )

    def _verify_penalties(self) -> None:
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(
            -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]", self.frequency_penalty
        )
        _check(self.repetition_penalty > 0.0, "repetition_penalty", "> 0", self.repetition_penalty)

    def _verify_truncation(self) -> None:
        _check(self.temperature >= 0.0, "temperature", ">= 0 (0 means greedy)", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(
            _is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1),
            "top_k",
            "-1 or 0 (disabled) or an int >= 1",
            self.top_k,
        )
        _check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)

    def _verify_lengths(self) -> None:
        mt = self.max_tokens
        _check(mt is None or (_is_int(mt) and mt >= 1), "max_tokens", "an int >= 1 or None", mt)
        _check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            "an int >= 0",
            self.min_tokens,
        )
        if mt is not None:
            _check(self.min_tokens <= mt, "min_tokens", f"<= max_tokens ({mt})", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 0), name, "an int >= 0 or None", value)

    def _verify_stops(self) -> None:
        for s in self.stop:
            _check(isinstance(s, str) and len(s) > 0, "stop", "a list of non-empty strings", self.stop)
        for t in self.stop_token_ids:
            _check(_is_int(t) and t >= 0, "stop_token_ids", "a list of ints >= 0", self.stop_token_ids)

    def _sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids)


@dataclass
class BeamSearchParams:
    """Parameters of `LLM.beam_search` (vLLM's names)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        # Beams are ranked by the model's raw log-probabilities; a temperature would change nothing
        # in that ranking, so anything but 0 is refused rather than silently ignored.
        _check(
            self.temperature == 0.0,
            "temperature",
            "0 for beam search (beams rank raw logprobs)",
            self.temperature,
        )
        _check(
            isinstance(self.beam_width, int) and self.beam_width >= 1,
            "beam_width",
            "an int >= 1",
            self.beam_width,
        )
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens",
            "an int >= 1",
            self.max_tokens,
        )
