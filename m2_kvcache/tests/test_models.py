"""The project's models against HF transformers, and the cached path against recomputation."""

from __future__ import annotations

import random

import pytest
import torch

from m0_config.config import ModelConfig
from m0_config.loader import load_hf_model
from m0_config.toy import TOY_PROMPTS, make_hf_config
from m2_kvcache import LLM, SamplingParams
from m2_kvcache.attention import AttentionMetadata, ContiguousCacheBackend, NoCacheBackend, allocate_kv_cache
from m2_kvcache.layers import ModelLayers, RowLinear, rope_config
from m2_kvcache.model_loader import load_model
from m2_kvcache.models import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

pytestmark = pytest.mark.m2

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# (toy arch, config.json updates). Every case has random biases and norm scales (derived_checkpoint).
CASES = {
    "qwen3": ("qwen3", {}),
    "qwen3-attention-bias": ("qwen3", {"attention_bias": True}),  # still Qwen3: q/k norm by architecture
    "qwen2-bias-tied": ("qwen2", {}),
    "llama-untied": ("llama", {}),
    # Llama 3.1's own config.json spelling: rope_theta + rope_scaling.
    "llama-llama3-rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}),
    "llama-linear-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
    ),
    # Newer transformers' spelling of Llama 3.1: the scaling and rope_theta inside rope_parameters.
    "llama-llama3-rope-parameters": ("llama", {"rope_parameters": {**LLAMA3_SCALING, "rope_theta": 5e5}}),
    # Llama 2 long-context fine-tunes: the legacy "type" key.
    "llama-legacy-linear-rope": (
        "llama",
        {"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),  # o_proj and MLP biases too
    # head_dim given and != hidden_size / num_attention_heads (64 / 4 = 16), as in Qwen3 and Llama 3.2.
    "llama-head-dim-given": ("llama", {"toy": {"head_dim": 32}}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
}
PROMPT_LENS = [1, 7, 33, 100]  # ragged; 100 > original_max_position_embeddings of the llama3 case


def checkpoint_for(derived_checkpoint, case: str) -> str:
    arch, updates = CASES[case]
    return derived_checkpoint(arch, **updates)


def random_prompts(lens: list[int], seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


@torch.inference_mode()
def varlen_prefill_logits(
    model, prompts: list[list[int]], slots: list[int] | None = None
) -> list[torch.Tensor]:
    """One flattened forward over all prompts; logits at every position (the runner would keep only
    each sequence's last one), split per prompt."""
    lens = [len(p) for p in prompts]
    md = AttentionMetadata.build(lens, lens, slots)
    input_ids = torch.tensor([t for p in prompts for t in p])
    logits = model.compute_logits(model(input_ids, md.positions, md))
    return list(logits.split(lens))


@pytest.mark.parametrize("backend", ["no_cache", "contiguous"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(derived_checkpoint, case, backend):
    model_config = ModelConfig(checkpoint_for(derived_checkpoint, case), device="cpu")
    hf_model = load_hf_model(model_config)
    if backend == "no_cache":
        model, slots = load_model(model_config, attn_backend=NoCacheBackend()), None
    else:  # sequences in scattered slots of a cache holding stale values from earlier occupants
        model, slots = load_model(model_config, attn_backend=ContiguousCacheBackend()), [3, 0, 4, 1]
        allocate_kv_cache(model, num_slots=5, max_model_len=128).normal_()
    prompts = random_prompts(PROMPT_LENS)
    for prompt, logits in zip(prompts, varlen_prefill_logits(model, prompts, slots)):
        with torch.inference_mode():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_hf_generate(derived_checkpoint, hf_greedy, case):
    """The whole engine on every variant against HF `generate`: ragged prompts through 2 slots (so
    slots are freed and reused), stopping where HF stops (the EOS ids of generation_config)."""
    path = checkpoint_for(derived_checkpoint, case)
    prompts = list(TOY_PROMPTS[:5])
    sp = SamplingParams(temperature=0, max_tokens=12)
    outs = LLM(path, max_num_seqs=2).generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 12)


def test_variants_are_chosen_by_architecture(derived_checkpoint):
    """Qwen3 keeps its q/k norm with attention_bias=True; Qwen2 has biases but never a q/k norm."""
    qwen3 = load_model(ModelConfig(checkpoint_for(derived_checkpoint, "qwen3-attention-bias"), device="cpu"))
    attn = qwen3.model.layers[0].self_attn
    assert type(qwen3) is Qwen3ForCausalLM and attn.qk_norm and attn.qkv_proj.bias is not None
    qwen2 = load_model(ModelConfig(checkpoint_for(derived_checkpoint, "qwen2-bias-tied"), device="cpu"))
    attn = qwen2.model.layers[0].self_attn
    assert type(qwen2) is Qwen2ForCausalLM and not attn.qk_norm and not hasattr(attn, "q_norm")
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None


def test_cases_configure_what_they_name(derived_checkpoint):
    """Guards the cases above: a config edit that never reached the model would test nothing new."""

    def model(case: str):
        return load_model(ModelConfig(checkpoint_for(derived_checkpoint, case), device="cpu"))

    tied, untied = model("llama-tied"), model("qwen2-untied")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert model("llama-head-dim-given").model.layers[0].self_attn.head_dim == 32
    layer = model("llama-biases").model.layers[0]
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
    for case, (theta, rope_type, factor) in {
        "llama-llama3-rope": (5e5, "llama3", 8.0),
        "llama-llama3-rope-parameters": (5e5, "llama3", 8.0),
        "llama-linear-rope": (1e4, "linear", 4.0),
        "llama-legacy-linear-rope": (1e4, "linear", 2.0),
    }.items():
        read_theta, scaling = rope_config(model(case).config)
        assert (read_theta, scaling["rope_type"], scaling["factor"]) == (theta, rope_type, factor), case


class Stepper:
    """Drives a model over a contiguous cache the way a runner does: each step, some sequences send
    their next chunk of tokens (a whole prompt, a prompt chunk, or one decode token)."""

    def __init__(self, model, num_slots: int, max_model_len: int) -> None:
        self.model = model
        allocate_kv_cache(model, num_slots, max_model_len).normal_()  # stale garbage must never leak in
        self.tokens: dict[int, list[int]] = {}  # slot -> tokens in the cache so far

    @torch.inference_mode()
    def step(self, chunks: dict[int, list[int]]) -> torch.Tensor:
        """chunks: slot -> new tokens (a slot absent from self.tokens starts a new sequence).
        Returns each sequence's last-position logits, (num_seqs, vocab)."""
        for slot, new in chunks.items():
            self.tokens[slot] = self.tokens.get(slot, []) + new
        slots = list(chunks)
        md = AttentionMetadata.build(
            [len(chunks[s]) for s in slots], [len(self.tokens[s]) for s in slots], slots
        )
        input_ids = torch.tensor([t for s in slots for t in chunks[s]])
        hidden = self.model(input_ids, md.positions, md)
        return self.model.compute_logits(hidden[md.last_token_indices])

    def free(self, slot: int) -> None:
        del self.tokens[slot]


@pytest.mark.parametrize("case", ["qwen3", "qwen2-bias-tied", "llama-llama3-rope"])
def test_decode_with_cache_equals_recompute(derived_checkpoint, case):
    model_config = ModelConfig(checkpoint_for(derived_checkpoint, case), device="cpu")
    cached = Stepper(load_model(model_config, attn_backend=ContiguousCacheBackend()), 4, 96)
    recompute = load_model(model_config, attn_backend=NoCacheBackend())
    rng = random.Random(1)
    schedule = (
        [
            {2: random_prompts([5])[0], 0: random_prompts([12], 1)[0], 1: [7]},  # ragged prefill
            {2: [], 0: [], 1: []},  # decode (the token is filled in below)
            {2: [], 0: [], 1: [], 3: random_prompts([9], 2)[0][:4]},  # decode + a new prefill joining
            {2: [], 0: [], 1: [], 3: random_prompts([9], 2)[0][4:]},  # decode + the prompt's second chunk
            {2: [], 1: [], 3: []},
            {0: random_prompts([3], 3)[0], 2: [], 1: [], 3: []},  # slot 0 reused by a shorter sequence
        ]
        + [{0: [], 1: [], 2: [], 3: []}] * 4
    )
    for step, chunks in enumerate(schedule):
        if step == 5:
            cached.free(0)
        chunks = {s: c or [rng.randrange(512)] for s, c in chunks.items()}  # decode: a random next token
        logits = cached.step(chunks)
        whole = [cached.tokens[s] for s in chunks]
        expected = torch.stack([seq[-1] for seq in varlen_prefill_logits(recompute, whole)])
        torch.testing.assert_close(
            logits, expected, atol=1e-4, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}"
        )


def test_injected_layers_are_used(qwen3_dir):
    """The m5 extension point: the model builds its projections from the given ModelLayers."""

    class TaggedRowLinear(RowLinear):
        pass

    model = load_model(ModelConfig(qwen3_dir, device="cpu"), layers=ModelLayers(row_linear=TaggedRowLinear))
    rows = [m for m in model.modules() if isinstance(m, RowLinear)]
    assert len(rows) == 4 and all(type(m) is TaggedRowLinear for m in rows)  # o_proj and down_proj x 2


def test_model_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        LlamaForCausalLM(make_hf_config("llama", 512, hidden_act="gelu"))
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen2ForCausalLM(make_hf_config("qwen2", 512, use_sliding_window=True, max_window_layers=1))
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        LlamaForCausalLM(make_hf_config("llama", 512, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
