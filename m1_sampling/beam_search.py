"""Beam search on top of `LLM.generate`, with beams as forked `Sequence`s (vLLM's algorithm).

Each step asks the engine for one token of every live beam with the top 2 * beam_width logprobs,
expands each beam into candidates with `Sequence.fork()`, and keeps the beam_width best by
cumulative logprob. A candidate ending in EOS is set aside as completed (unless ignore_eos). At the
end completed and live beams are ranked by the length-penalised score and the best are returned.
Because it only calls `generate`, it runs unchanged on every later milestone (m3's prefix cache
makes the repeated prefixes cheap).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from m0_config.sampling_params import BeamSearchParams, SamplingParams
from m0_config.sequence import Sequence
from m1_sampling.inputs import normalize_prompts, parse_prompt


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated
    cum_logprob: float
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)


def beam_search_score(seq: Sequence, eos_token_ids: set[int], length_penalty: float) -> float:
    """cum_logprob / len ** length_penalty, as vLLM scores (len counts the prompt; a final EOS
    does not count). length_penalty > 1 favours longer sequences, < 1 shorter ones."""
    length = seq.get_len() - (seq.get_last_token_id() in eos_token_ids)
    return seq.cumulative_logprob / (length**length_penalty)


def beam_search(llm, prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
    engine = llm.llm_engine
    mc = engine.config.model_config
    eos = set(engine.eos_token_ids)
    ids = itertools.count()
    parsed = [
        parse_prompt(i, p, engine.tokenizer, mc.vocab_size, mc.max_model_len)
        for i, p in enumerate(normalize_prompts(prompts))
    ]
    beams = [[Sequence(next(ids), p.prompt, p.prompt_token_ids)] for p in parsed]
    completed: list[list[Sequence]] = [[] for _ in parsed]
    step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=0, ignore_eos=True)
    for _ in range(params.max_tokens):
        for i, bs in enumerate(beams):  # a beam that reached max_model_len is complete ("length")
            completed[i].extend(b for b in bs if b.get_len() >= mc.max_model_len)
            beams[i] = [b for b in bs if b.get_len() < mc.max_model_len]
        live = [(i, b) for i, bs in enumerate(beams) for b in bs]
        if not live:
            break
        outs = llm.generate(
            [{"prompt_token_ids": b.get_token_ids()} for _, b in live], step_params, use_tqdm=False
        )
        candidates: list[list[Sequence]] = [[] for _ in parsed]
        for (i, beam), out in zip(live, outs):
            for token_id, lp in out.outputs[0].logprobs[0].items():
                child = beam.fork(next(ids))
                child.append_token_id(token_id, lp.logprob)
                if token_id in eos and not params.ignore_eos:
                    completed[i].append(child)
                else:
                    candidates[i].append(child)
        beams = [
            sorted(c, key=lambda s: s.cumulative_logprob, reverse=True)[: params.beam_width]
            for c in candidates
        ]
    return [_finish(engine, completed[i] + beams[i], eos, params) for i in range(len(parsed))]


def _finish(engine, seqs: list[Sequence], eos: set[int], params: BeamSearchParams) -> BeamSearchOutput:
    best = sorted(seqs, key=lambda s: beam_search_score(s, eos, params.length_penalty), reverse=True)
    out = BeamSearchOutput()
    for seq in best[: params.beam_width]:
        ended = seq.get_output_len() > 0 and seq.get_last_token_id() in eos and not params.ignore_eos
        text = engine.tokenizer.decode(seq.data.output_token_ids, skip_special_tokens=True)
        out.sequences.append(
            BeamSearchSequence(
                list(seq.get_token_ids()), seq.cumulative_logprob, text, "stop" if ended else "length"
            )
        )
    return out
