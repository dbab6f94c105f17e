"""When does a sequence stop? Checked after every appended and detokenized token, in vLLM's order:

1. fewer than `min_tokens` output tokens: never (EOS and stop ids are also masked in the sampler);
2. an EOS id (tokenizer or generation_config), unless `ignore_eos`: "stop", stop_reason None;
3. a `stop_token_ids` id: "stop", stop_reason = that id;
4. a stop string in the text: "stop", stop_reason = that string, the text cut before it (or after it
   with `include_stop_str_in_output`);
5. `max_model_len` tokens in all, or `max_tokens` output tokens: "length".

In 2 and 3 the stopping token's text (present when `skip_special_tokens=False` or for an ordinary
stop id) is removed from the output unless `include_stop_str_in_output`.
"""

from __future__ import annotations

from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence, SequenceStatus


def check_stop_strings(
    output_text: str, new_char_count: int, stop: list[str], include_in_output: bool
) -> tuple[str, int] | None:
    """(stop string, length to truncate the text to) for the earliest stop string that the last
    `new_char_count` characters complete, or None.

    Only the new text plus `len(stop_str) - 1` characters before it is searched: any earlier match
    would have ended inside text already checked, and the overlap catches a stop string that spans
    several tokens. Keeping the search window this small makes each step O(new text), not O(text).
    Among several matches the one that starts first wins (vLLM takes the first in list order).
    """
    if not new_char_count or not stop:
        return None
    found: tuple[int, str] | None = None
    for stop_str in stop:
        start = max(len(output_text) - new_char_count - len(stop_str) + 1, 0)
        index = output_text.find(stop_str, start)
        if index != -1 and (found is None or index < found[0]):
            found = (index, stop_str)
    if found is None:
        return None
    index, stop_str = found
    return stop_str, index + len(stop_str) if include_in_output else index


class StopChecker:
    """Sets `seq.status` (and `seq.stop_reason`) when a sequence must stop; leaves it alone otherwise."""

    def __init__(self, max_model_len: int, eos_token_ids: list[int]):
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)

    def maybe_stop_sequence(self, seq: Sequence, new_char_count: int, params: SamplingParams) -> None:
        """`new_char_count`: characters the detokenizer appended for the last token (one token per call).

        Stops come before the length caps, so a stop on the last token that fits is still a stop
        (its text cut). min_tokens may hold back EOS and stops, never the model-length cap (a
        sequence past max_model_len would outgrow its KV blocks and CUDA-graph tables)."""
        output_len = seq.get_output_len()
        if output_len >= params.min_tokens:
            last_token_id = seq.get_last_token_id()
            if not params.ignore_eos and last_token_id in self.eos_token_ids:
                self._stop_on_token(seq, new_char_count, params, stop_reason=None)
                return
            if last_token_id in params.stop_token_ids:
                self._stop_on_token(seq, new_char_count, params, stop_reason=last_token_id)
                return
            if params.stop and new_char_count:  # (this runs for every sequence every step)
                stop = check_stop_strings(
                    seq.output_text, new_char_count, params.stop, params.include_stop_str_in_output
                )
                if stop is not None:
                    seq.stop_reason, truncate_to = stop
                    seq.output_text = seq.output_text[:truncate_to]
                    seq.status = SequenceStatus.FINISHED_STOPPED
                    return
        if seq.get_len() >= self.max_model_len or output_len == params.max_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED

    @staticmethod
    def _stop_on_token(
        seq: Sequence, new_char_count: int, params: SamplingParams, stop_reason: int | None
    ) -> None:
        if new_char_count and not params.include_stop_str_in_output:
            # The stop token's own text (e.g. "<|im_end|>" with skip_special_tokens=False) is not output.
            seq.output_text = seq.output_text[:-new_char_count]
        seq.stop_reason = stop_reason
        seq.status = SequenceStatus.FINISHED_STOPPED
