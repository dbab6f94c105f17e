"""Incremental detokenization: turn one new token id into the new characters of the output text.

Decoding the whole output again after every token is O(n) per step, and decoding only the new token
is wrong: a byte-level BPE token can hold half of a UTF-8 character ("你" is 3 bytes, "🙂" is 4, and
the tokenizer may split them across tokens), and some tokenizers change a token's text depending on
its neighbours. vLLM's answer, used here, keeps two offsets into the sequence's token strings:

    tokens:  ... [prefix_offset ........ read_offset) [read_offset ..... end)
                  context already emitted               not yet emitted

    prefix_text = decode(tokens[prefix_offset:read_offset])
    new_text    = decode(tokens[prefix_offset:])
    emit new_text[len(prefix_text):]      unless new_text ends with "\ufffd"

A trailing U+FFFD (the replacement character) means the last bytes are an unfinished character:
emit nothing and leave the offsets alone, so the next token is decoded together with these bytes.
Decoding a small window (a few tokens of context) keeps each step O(1).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Sequence

# Tokens of prompt context decoded before the first output token (vLLM's value): enough for any
# tokenizer whose decoding of a token depends on the tokens before it.
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
REPLACEMENT_CHAR = "\ufffd"
# The last tokens of a decode that decide whether it ends mid-character: a UTF-8 character is at
# most 4 bytes, and every token of the tokenizer's vocabulary is at least one.
TAIL_TOKENS = 8


class IncrementalDecode(NamedTuple):
    """One step's result: the token strings to append to `seq.tokens`, the text to append to
    `seq.output_text`, and the new offsets."""

    new_tokens: list[str]
    new_text: str
    prefix_offset: int
    read_offset: int


class Detokenizer:
    """Stateless over sequences (the state lives in `Sequence.tokens/prefix_offset/read_offset`, so a
    `fork()` carries it); caches per-tokenizer facts that are costly to recompute every token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_len = len(tokenizer)  # ids >= this exist only in the model's padded vocabulary
        # Every id the tokenizer itself skips in decode(skip_special_tokens=True): the named special
        # tokens plus every added token flagged special (transformers' all_special_ids can miss those).
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.special_ids = frozenset(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        self.special_tokens = frozenset(tokenizer.convert_ids_to_tokens(sorted(self.special_ids)))
        self.added_vocab = frozenset(tokenizer.get_added_vocab())
        # Slow (pure-Python) tokenizers decode added tokens separately from the rest; fast ones don't.
        self.use_added_encoders = not tokenizer.is_fast and bool(self.added_vocab)

    # ---- ids <-> strings -----------------------------------------------------------------------
    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool) -> list[str]:
        """Token strings; a skipped special token yields nothing, an id outside the tokenizer yields
        "" (the model's vocabulary is padded past the tokenizer's and may sample those ids)."""
        tokens = []
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.tokenizer.convert_ids_to_tokens(i) if 0 <= i < self.vocab_len else None
            tokens.append(token or "")
        return tokens

    def convert_tokens_to_string(self, tokens: list[str], params: SamplingParams) -> str:
        if not self.use_added_encoders:
            return self.tokenizer.convert_tokens_to_string(tokens)
        return self._convert_tokens_to_string_with_added_encoders(
            tokens, params.skip_special_tokens, params.spaces_between_special_tokens
        )

    def _convert_tokens_to_string_with_added_encoders(
        self, tokens: list[str], skip_special_tokens: bool, spaces_between_special_tokens: bool
    ) -> str:
        """The slow-tokenizer path (as HF's slow decode): runs of ordinary tokens are decoded
        together, each added token is kept verbatim, and the pieces are joined by " " when
        `spaces_between_special_tokens`."""
        sub_texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if skip_special_tokens and token in self.special_tokens:
                continue
            if token in self.added_vocab:
                if current:
                    sub_texts.append(self.tokenizer.convert_tokens_to_string(current))
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self.tokenizer.convert_tokens_to_string(current))
        return (" " if spaces_between_special_tokens else "").join(sub_texts)

    # ---- the incremental step ------------------------------------------------------------------
    def convert_prompt_ids_to_tokens(
        self, prompt_ids: list[int], skip_special_tokens: bool
    ) -> tuple[list[str], int, int]:
        """The last few prompt tokens as decoding context: (tokens, prefix_offset, read_offset)
        with read_offset at their end, so none of the prompt is ever emitted."""
        tokens = self.convert_ids_to_tokens(
            prompt_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET - 2 :], skip_special_tokens
        )
        read_offset = len(tokens)
        return tokens, max(read_offset - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, 0), read_offset

    def detokenize_incrementally(
        self,
        all_input_ids: list[int],
        prev_tokens: list[str] | None,
        prefix_offset: int,
        read_offset: int,
        params: SamplingParams,
    ) -> IncrementalDecode:
        """Decode `all_input_ids[-1]` given the strings of the tokens before it (`prev_tokens`; None
        on the first output token, when the context is built from the prompt)."""
        is_first_iter = prev_tokens is None
        if is_first_iter:
            prev_tokens, prefix_offset, read_offset = self.convert_prompt_ids_to_tokens(
                all_input_ids[:-1], params.skip_special_tokens
            )
        new_tokens = self.convert_ids_to_tokens(all_input_ids[-1:], params.skip_special_tokens)
        output_tokens = prev_tokens + new_tokens
        if is_first_iter:
            new_tokens = output_tokens  # seq.tokens starts as the prompt context plus this token

        prefix_text = self.convert_tokens_to_string(output_tokens[prefix_offset:read_offset], params)
        new_text = self.convert_tokens_to_string(output_tokens[prefix_offset:], params)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Nothing new, or an unfinished UTF-8 character: wait for more tokens.
            return IncrementalDecode(new_tokens, "", prefix_offset, read_offset)
        return IncrementalDecode(new_tokens, new_text[len(prefix_text) :], read_offset, len(output_tokens))

    def decode_sequence_inplace(self, seq: Sequence, params: SamplingParams) -> int:
        """Decode the token appended since the last call (call once per appended token, as vLLM
        does): extend `seq.output_text`, advance `seq.tokens/prefix_offset/read_offset`, fill the
        `decoded_token` of the newest logprobs entry, and return the number of characters appended
        (which the stop checker needs to search only the new text)."""
        all_input_ids = seq.get_token_ids()
        step = self.detokenize_incrementally(
            all_input_ids, seq.tokens, seq.prefix_offset, seq.read_offset, params
        )
        # Logprobs belong to the newest token only if one entry was stored per output token.
        if seq.output_logprobs and len(seq.output_logprobs) == seq.get_output_len():
            # The prompt context needs at most this many ids before the candidate.
            context = all_input_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET - 3 : -1]
            self._decode_logprobs(seq, context, seq.output_logprobs[-1], params)

        if seq.tokens is None:
            seq.tokens = step.new_tokens
        else:
            seq.tokens.extend(step.new_tokens)
        seq.prefix_offset, seq.read_offset = step.prefix_offset, step.read_offset
        seq.output_text += step.new_text
        return len(step.new_text)

    def decode_all(self, seq: Sequence, params: SamplingParams, drop_last: bool = False) -> str:
        """The text `decode_sequence_inplace` builds token by token, in one pass at the end (the
        engine uses it when no stop string or logprob needs the text during generation).

        Same context (the prompt's last tokens) and the same hold-back rule: the incremental decoder
        emits nothing for a step whose text ends in an unfinished character, so the result is the
        decode of the longest prefix of the output that does not end mid-character (normally all
        of it). `drop_last` leaves out a final stop token whose text the stop checker would cut."""
        ids = seq.data.output_token_ids[:-1] if drop_last else seq.data.output_token_ids
        skip = params.skip_special_tokens
        context, prefix_offset, read_offset = self.convert_prompt_ids_to_tokens(
            list(seq.data.prompt_token_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET - 2 :]), skip
        )
        prefix_text = self.convert_tokens_to_string(context[prefix_offset:read_offset], params)
        # Ids that add no text (skipped special tokens, ids past the tokenizer, which HF's decode
        # drops too) are left out, so the tokens of ids[:end] are the first num_tokens[end] of
        # `tokens` (converted once), and each candidate end below is a different text.
        kept = [0 <= i < self.vocab_len and not (skip and i in self.special_ids) for i in ids]
        tokens = context + self.convert_ids_to_tokens([i for i, k in zip(ids, kept) if k], skip)
        num_tokens = [0, *itertools.accumulate(kept)]
        tried = None
        for end in range(len(ids), 0, -1):
            n = len(context) + num_tokens[end]  # the tokens of context + ids[:end]
            if n == tried:  # the same tokens as the end just tried: the same unfinished text
                continue
            tried = n
            # Whether a decode ends mid-character depends on its last bytes only: test the last few
            # tokens before decoding all of them (a full decode per candidate end made a long run of
            # unfinished bytes quadratic: tens of ms for one finished request).
            tail = self.convert_tokens_to_string(tokens[max(prefix_offset, n - TAIL_TOKENS) : n], params)
            if tail.endswith(REPLACEMENT_CHAR):
                continue
            full = self.convert_tokens_to_string(tokens[prefix_offset:n], params)
            if not full.endswith(REPLACEMENT_CHAR):
                return full[len(prefix_text) :] if len(full) > len(prefix_text) else ""
        return ""

    def _decode_logprobs(
        self, seq: Sequence, previous_ids: list[int], logprobs: dict, params: SamplingParams
    ) -> None:
        """Each candidate's text is what it would have appended had it been sampled instead. Runs
        before `seq.tokens` is advanced, so every candidate sees the same state."""
        for token_id, logprob in logprobs.items():
            if logprob.decoded_token is None:
                step = self.detokenize_incrementally(
                    [*previous_ids, token_id], seq.tokens, seq.prefix_offset, seq.read_offset, params
                )
                logprob.decoded_token = step.new_text
