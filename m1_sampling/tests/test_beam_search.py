"""Beam search against HF's `num_beams` search (no EOS) and a brute-force reference (with EOS)."""

from __future__ import annotations

import pytest
import torch

from m0_config.config import EngineConfig
from m0_config.loader import load_hf_model, load_tokenizer
from m1_sampling import LLM, BeamSearchParams, SamplingParams

pytestmark = pytest.mark.m1


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(qwen3_dir)


@pytest.fixture(scope="module")
def hf(qwen3_dir):
    return load_hf_model(EngineConfig.from_llm_kwargs(qwen3_dir).model_config), load_tokenizer(qwen3_dir)


@pytest.mark.parametrize("width", [2, 3])
def test_matches_hf_num_beams_without_eos(llm, hf, width):
    model, tok = hf
    ids = tok("The model", return_tensors="pt").input_ids
    model.generation_config.eos_token_id = None
    gen = model.generate(
        ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
        do_sample=False, max_new_tokens=5, early_stopping=False, pad_token_id=0,
    )  # fmt: skip
    ours = llm.beam_search(["The model"], BeamSearchParams(beam_width=width, max_tokens=5, ignore_eos=True))[
        0
    ]
    assert [s.tokens for s in ours.sequences] == gen.tolist()


def test_width_one_is_greedy(llm):
    greedy = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )[0]
    beam = llm.beam_search(["Hello"], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))[0]
    assert beam.sequences[0].tokens[len(greedy.prompt_token_ids) :] == greedy.outputs[0].token_ids


def _reference(model, prompt, width, steps, eos, length_penalty):
    """vLLM's beam search written directly on full recomputation, with every candidate kept."""
    beams, done = [(list(prompt), 0.0)], []
    for _ in range(steps):
        cands = []
        for toks, cum in beams:
            logp = torch.log_softmax(model(torch.tensor([toks])).logits[0, -1].float(), -1)
            top = torch.topk(logp, 2 * width)
            for lp, t in zip(top.values.tolist(), top.indices.tolist()):
                (done if t in eos else cands).append((toks + [t], cum + lp))
        beams = sorted(cands, key=lambda c: c[1], reverse=True)[:width]

    def score(c):
        n = len(c[0]) - (c[0][-1] in eos)
        return c[1] / n**length_penalty

    return sorted(done + beams, key=score, reverse=True)[:width]


def test_eos_handling_matches_reference(qwen3_dir, llm, hf):
    """Declare two tokens the model likes as EOS, so that some beams really end early."""
    model, tok = hf
    prompt = tok("Hello, my name is").input_ids
    probe = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True), use_tqdm=False
    )[0]
    eos = sorted(probe.outputs[0].logprobs[1])[:2]
    local = LLM(qwen3_dir)  # a private engine whose EOS ids we may change
    local.llm_engine.eos_token_ids = eos
    ours = local.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=0.7))[0]
    ref = _reference(model, prompt, 3, 4, set(eos), 0.7)
    assert any(c[0][-1] in eos for c in ref), "the workload must exercise EOS"
    assert [s.tokens for s in ours.sequences] == [c[0] for c in ref]
    assert [s.cum_logprob for s in ours.sequences] == pytest.approx([c[1] for c in ref], abs=1e-4)
    for s in ours.sequences:
        assert s.finish_reason == ("stop" if s.tokens[-1] in eos else "length")
