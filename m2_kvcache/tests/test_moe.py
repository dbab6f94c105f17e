"""Qwen3-MoE: logits and greedy tokens against HF transformers, the router against HF's, the fused
Triton experts against the torch reference (interpreted on CPU, compiled on a GPU), both checkpoint
layouts, the dense/sparse layer rule, and the variants that are rejected."""

from __future__ import annotations

import os
import random
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from m0_config.config import ModelConfig
from m0_config.loader import load_hf_model
from m0_config.toy import make_hf_config
from m2_kvcache import LLM, SamplingParams
from m2_kvcache.attention import AttentionMetadata, ContiguousCacheBackend, allocate_kv_cache
from m2_kvcache.layers import FusedMoE, ModelLayers, select_experts
from m2_kvcache.layers.fused_moe import fused_experts_for, fused_experts_ref, moe_align_block_size
from m2_kvcache.model_loader import load_model
from m2_kvcache.models import Qwen3MoeForCausalLM, get_model_class
from m2_kvcache.models.qwen3_moe import Qwen3MoeSparseMoeBlock, is_sparse_layer

pytestmark = pytest.mark.m2

# config overrides of the qwen3_moe toy (4 experts, top-2, norm_topk_prob, layer 1 dense).
CASES = {
    "toy": {},
    "no-renorm": {"norm_topk_prob": False},
    # decoder_sparse_step 2 and no mlp_only_layers: layer 0 dense, layer 1 sparse; top-3 of 5 experts,
    # not renormalised
    "sparse-step-2": {
        "decoder_sparse_step": 2,
        "mlp_only_layers": [],
        "num_experts": 5,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
    },
}
_COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="session")
def moe_checkpoint(toy_model_dir, tmp_path_factory):
    """A function: moe_checkpoint(case) -> the toy with the case's config and random norm scales (HF
    initializes them to 1, which would hide a norm loaded into the wrong place), saved by HF."""
    from transformers import AutoModelForCausalLM

    made: dict[str, str] = {}

    def make(case: str) -> str:
        if case not in made:
            src, dst = toy_model_dir("qwen3_moe", **CASES[case]), str(tmp_path_factory.mktemp(f"moe-{case}"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 1:
                        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            model.save_pretrained(dst)
            for name in _COPIED:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy(os.path.join(src, name), dst)
            made[case] = dst
        return made[case]

    return make


def random_prompts(lens: list[int], seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


# --- the model against HF ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(moe_checkpoint, case):
    """Ragged prompts in one flattened batch over scattered slots of a cache full of garbage."""
    model_config = ModelConfig(moe_checkpoint(case), device="cpu")
    hf_model = load_hf_model(model_config)
    model = load_model(model_config, attn_backend=ContiguousCacheBackend())
    allocate_kv_cache(model, num_slots=4, max_model_len=64).normal_()
    prompts = random_prompts([1, 6, 23, 40])
    lens = [len(p) for p in prompts]
    md = AttentionMetadata.build(lens, lens, [2, 0, 3, 1])
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(sum(prompts, [])), md.positions, md))
        for prompt, got in zip(prompts, logits.split(lens)):
            torch.testing.assert_close(got, hf_model(torch.tensor([prompt])).logits[0], atol=2e-5, rtol=2e-5)


def test_dense_and_sparse_layers_follow_hf():
    """mlp_only_layers and decoder_sparse_step pick the same layers as transformers does."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as HFSparse

    config = make_hf_config("qwen3_moe", 512, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    ours = Qwen3MoeForCausalLM(config)
    theirs = AutoModelForCausalLM.from_config(config)
    sparse = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in ours.model.layers]
    assert sparse == [isinstance(layer.mlp, HFSparse) for layer in theirs.model.layers]
    assert sparse == [False, True, False, False, False, True]
    assert sparse == [is_sparse_layer(config, i) for i in range(6)]
    assert not any(is_sparse_layer(make_hf_config("qwen3_moe", 512, num_experts=0), i) for i in range(2))


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_equals_hf(renormalize):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = make_hf_config(
        "qwen3_moe", 512, num_experts=8, num_experts_per_tok=3, norm_topk_prob=renormalize
    )
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(
        router.weight, std=0.05, generator=torch.Generator().manual_seed(0)
    )  # unsure routes
    x = torch.randn(11, config.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, hf_weights, hf_ids = router(x)
    weights, ids = select_experts(logits, 3, renormalize)
    assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights)
    sums = weights.sum(-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(11))
    else:  # each weight keeps its share of the whole softmax
        assert (sums < 1).all()
        torch.testing.assert_close(weights, torch.softmax(logits, -1).gather(1, ids))


def test_greedy_equals_hf(moe_checkpoint, hf_greedy):
    """The default toy goes through every milestone's all-architecture tests; this is the other
    config (dense layer 0, top-3 of 5, not renormalised). m3_paged/tests/test_llm.py runs the same
    config paged and chunked against this engine."""
    path = moe_checkpoint("sparse-step-2")
    prompts = ["Hello, my name is", "The model", "a cache block page attention query key value batch", "x"]
    sp = SamplingParams(temperature=0, max_tokens=16)
    expected = hf_greedy(path, prompts, 16)
    m2 = LLM(path, max_num_seqs=2).generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in m2] == expected


# --- the fused Triton experts against the reference ---------------------------------------------------


def ragged_topk_ids(num_tokens: int, top_k: int, loads: list[float], seed: int) -> torch.Tensor:
    """(num_tokens, top_k) distinct experts per token, drawn with probabilities ∝ loads: an expert
    with load 0 receives no token."""
    probs = torch.tensor(loads, dtype=torch.float32).expand(num_tokens, -1)
    return torch.multinomial(probs, top_k, replacement=False, generator=torch.Generator().manual_seed(seed))


def moe_inputs(num_tokens, hidden, inter, loads, top_k, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    num_experts = len(loads)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    topk_ids = ragged_topk_ids(num_tokens, top_k, loads, seed)
    topk_weights = torch.rand(num_tokens, top_k, generator=gen)
    return [t.to(device, dtype) for t in (x, w13, w2, topk_weights)] + [topk_ids.to(device)]


# (num_tokens, hidden, intermediate, expert loads, top_k, block sizes or None for the default)
KERNEL_CASES = {
    "decode-1-token": (1, 64, 32, [1, 1, 1, 1], 2, None),
    "ragged-empty-experts": (
        37,
        48,
        40,
        [0, 5, 1, 0, 20, 0.5],
        2,
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16},
    ),
    "one-hot-expert": (20, 32, 16, [0, 0, 1, 1, 0], 2, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
    "top-1-many-blocks": (70, 40, 24, [3, 1, 0, 1], 1, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),
    "default-config": (45, 64, 32, [1, 0, 2, 1, 1, 0, 1, 3], 3, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_fused_experts_equal_reference(case, dtype):
    """TRITON_INTERPRET runs the kernel on CPU here (m2_kvcache.layers.fused_moe.ops sets it)."""
    from m2_kvcache.layers.fused_moe.ops import fused_experts

    num_tokens, hidden, inter, loads, top_k, config = KERNEL_CASES[case]
    x, w13, w2, weights, ids = moe_inputs(num_tokens, hidden, inter, loads, top_k, dtype)
    counts = torch.bincount(ids.flatten(), minlength=len(loads))
    assert ((counts == 0) == (torch.tensor(loads) == 0)).all() or num_tokens == 1  # the loads are as designed
    got = fused_experts(x, w13, w2, weights, ids, config)
    expected = fused_experts_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_moe_align_block_size(block_size):
    """Brute-force check of the layout: each slot once, each block one expert, empty experts no block."""
    loads = [2, 0, 7, 1, 0, 3]
    ids = ragged_topk_ids(9, 2, loads, seed=block_size)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_size, len(loads))
    num_slots, flat = ids.numel(), ids.flatten()
    counts = torch.bincount(flat, minlength=len(loads))
    assert num_post.item() == sum(-(-c // block_size) * block_size for c in counts.tolist())
    valid = sorted_ids[: num_post.item()]
    assert sorted(valid[valid < num_slots].tolist()) == list(range(num_slots))
    assert (sorted_ids[num_post.item() :] == num_slots).all()
    used_blocks = valid.view(-1, block_size)
    for block, expert in zip(used_blocks, expert_ids):
        rows = block[block < num_slots].long()
        assert rows.numel() > 0 and (flat[rows] == expert).all()
    assert set(expert_ids[: used_blocks.shape[0]].tolist()) == {e for e, c in enumerate(counts.tolist()) if c}
    assert counts[1] == counts[4] == 0  # experts without tokens, which own no block


def test_layer_uses_the_reference_on_cpu():
    assert fused_experts_for(torch.device("cpu")) is fused_experts_ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 256])
def test_fused_experts_on_cuda(num_tokens, dtype):
    from m2_kvcache.layers.fused_moe.ops import fused_experts

    assert fused_experts_for(torch.device("cuda")) is fused_experts
    loads = [0, 1, 4, 0.5, 2, 0, 1, 1, 3, 0, 1, 1, 2, 1, 1, 0]  # 16 experts, 4 of them never chosen
    x, w13, w2, weights, ids = moe_inputs(num_tokens, 256, 128, loads, 4, dtype, device="cuda")
    got = fused_experts(x, w13, w2, weights, ids)
    expected = fused_experts_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_logits_match_hf_on_cuda(moe_checkpoint):
    """The whole model on CUDA (Triton experts) against HF, float32."""
    model_config = ModelConfig(moe_checkpoint("toy"), device="cuda", dtype="float32")
    hf_model = load_hf_model(model_config)
    model = load_model(model_config, attn_backend=ContiguousCacheBackend())
    allocate_kv_cache(model, num_slots=2, max_model_len=64)
    prompts = random_prompts([5, 30], seed=3)
    lens = [len(p) for p in prompts]
    md = AttentionMetadata.build(lens, lens, [1, 0], device="cuda")
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(sum(prompts, []), device="cuda"), md.positions, md))
        for prompt, got in zip(prompts, logits.split(lens)):
            expected = hf_model(torch.tensor([prompt], device="cuda")).logits[0]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --- checkpoint layouts and errors ------------------------------------------------------------------


def stack_experts(tensors: dict[str, torch.Tensor], num_experts: int, layers: list[int]) -> dict:
    """The per-expert layout rewritten as transformers >= 5 holds it in memory: experts.gate_up_proj
    (num_experts, 2I, H) with rows [gate | up] per expert, and experts.down_proj (num_experts, H, I)."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [
            torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]])
            for e in range(num_experts)
        ]
        out[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        out[f"{p}.down_proj"] = torch.stack(
            [tensors[f"{p}.{e}.down_proj.weight"] for e in range(num_experts)]
        )
    return out


@pytest.fixture(scope="module")
def per_expert(moe_checkpoint):
    """(folder, its tensors): the toy as save_pretrained writes it, one tensor per expert and projection."""
    path = moe_checkpoint("toy")
    return path, load_file(os.path.join(path, "model.safetensors"))


def rewritten(src: str, dst: str, tensors: dict) -> str:
    shutil.copytree(src, dst)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    return dst


def test_per_expert_and_stacked_layouts_load_the_same(per_expert, tmp_path):
    path, tensors = per_expert
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in tensors  # what save_pretrained writes
    a = load_model(ModelConfig(path, device="cpu"))
    stacked = rewritten(path, str(tmp_path / "stacked"), stack_experts(tensors, 4, [0]))
    b = load_model(ModelConfig(stacked, device="cpu"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=0, rtol=0)
    experts = a.model.layers[0].mlp.experts
    prefix = "model.layers.0.mlp.experts.2"
    gate_up = torch.cat([tensors[f"{prefix}.gate_proj.weight"], tensors[f"{prefix}.up_proj.weight"]])
    torch.testing.assert_close(experts.gate_up_proj[2], gate_up, atol=0, rtol=0)
    torch.testing.assert_close(experts.down_proj[2], tensors[f"{prefix}.down_proj.weight"], atol=0, rtol=0)


def test_missing_expert_tensor_is_named(per_expert, tmp_path):
    path, tensors = per_expert
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    broken = rewritten(path, str(tmp_path / "broken"), {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(
        ValueError, match=rf"missing tensor\(s\) in the checkpoint: {name.replace('.', '[.]')}$"
    ):
        load_model(ModelConfig(broken, device="cpu"))


EXPERTS = "model.layers.0.mlp.experts"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: {**t, f"{EXPERTS}.4.up_proj.weight": torch.zeros(32, 64)}, "unexpected tensor"),
        (lambda t: {**t, f"{EXPERTS}.0.down_proj.weight": torch.zeros(64, 31)}, r"\(64, 31\)"),
        (
            lambda t: {**stack_experts(t, 4, [0]), f"{EXPERTS}.0.gate_proj.weight": torch.zeros(32, 64)},
            "twice",
        ),
    ],
    ids=["expert-out-of-range", "misshaped", "both-layouts"],
)
def test_bad_expert_tensors_are_errors(per_expert, tmp_path, edit, message):
    path, tensors = per_expert
    broken = rewritten(path, str(tmp_path / "broken"), edit(dict(tensors)))
    with pytest.raises(ValueError, match=message):
        load_model(ModelConfig(broken, device="cpu"))


def test_injected_experts_layer_is_used(per_expert):
    """The m5 extension point: the experts come from ModelLayers.fused_moe."""

    class TaggedMoE(FusedMoE):
        pass

    model = load_model(ModelConfig(per_expert[0], device="cpu"), layers=ModelLayers(fused_moe=TaggedMoE))
    assert [type(m) for m in model.modules() if isinstance(m, FusedMoE)] == [TaggedMoE]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shared_expert_intermediate_size": 64}, "shared expert"),
        ({"n_shared_experts": 1}, "shared experts"),
        ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid' is not supported"),
        ({"n_group": 2, "topk_group": 1}, "grouped"),
        ({"routed_scaling_factor": 2.5}, "routed_scaling_factor"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok must be in 1\.\.num_experts=4"),
    ],
)
def test_unsupported_moe_variants_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        Qwen3MoeForCausalLM(make_hf_config("qwen3_moe", 512, **overrides))


def test_other_moe_architectures_are_rejected():
    for arch in ("Qwen2MoeForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM"):
        with pytest.raises(ValueError, match=f"unsupported architecture '{arch}'.*Qwen3MoeForCausalLM"):
            get_model_class(arch)
