"""Tensor-parallel experts: `FusedMoEParallel` on 2 ranks (real processes, gloo) equals m2's dense
`FusedMoE` on ragged routing, from both checkpoint layouts; the qwen3_moe toy under TP=2 gives m4's
and HF transformers' greedy tokens. One engine start: process start-up dominates the time here."""

from __future__ import annotations

import pytest
import torch

import m4_cudagraph
from m0_config import ModelConfig, load_hf_model
from m2_kvcache.layers.fused_moe import FusedMoE, select_experts
from m5_tp import LLM, SamplingParams
from m5_tp.layers import FusedMoEParallel
from m5_tp.parallel_state import TensorParallelGroup
from m5_tp.spawn import run_on_ranks

pytestmark = pytest.mark.m5

EXPERTS, TOP_K, HIDDEN, INTER, TOKENS, TP = 5, 2, 16, 12, 11, 2
IDLE = 4  # the expert no token chooses


def checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full per-expert tensors (Hub layout) and router logits skewed towards expert 0 and away from
    expert IDLE: a ragged load with one expert left empty. Identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    logits = r(TOKENS, EXPERTS)
    logits[:, 0] += 2.0
    logits[:, IDLE] = -30.0
    ck = {"x": r(TOKENS, HIDDEN), "logits": logits}
    for e in range(EXPERTS):
        ck[f"{e}.gate"], ck[f"{e}.up"] = r(INTER, HIDDEN) / 4, r(INTER, HIDDEN) / 4
        ck[f"{e}.down"] = r(HIDDEN, INTER) / 4
    return ck


def stacked(ck: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' in-memory layout: gate_up_proj (E, 2I, H) with [gate | up] rows, down_proj (E, H, I)."""
    w13 = torch.stack([torch.cat([ck[f"{e}.gate"], ck[f"{e}.up"]]) for e in range(EXPERTS)])
    return w13, torch.stack([ck[f"{e}.down"] for e in range(EXPERTS)])


def load_per_expert(layer: FusedMoE, ck: dict) -> None:
    for e in range(EXPERTS):
        layer.weight_loader(layer.gate_up_proj, ck[f"{e}.gate"], (e, 0))
        layer.weight_loader(layer.gate_up_proj, ck[f"{e}.up"], (e, 1))
        layer.weight_loader(layer.down_proj, ck[f"{e}.down"], (e, None))


def load_stacked(layer: FusedMoE, ck: dict) -> None:
    w13, w2 = stacked(ck)
    layer.weight_loader(layer.gate_up_proj, w13)
    layer.weight_loader(layer.down_proj, w2)


def rank_outputs(group: TensorParallelGroup, seed: int) -> dict[str, torch.Tensor]:
    """On every rank: the parallel layer's output after loading each layout, for both router modes."""
    ck, out = checkpoint(seed), {}
    for renormalize in (True, False):
        for name, load in (("per_expert", load_per_expert), ("stacked", load_stacked)):
            layer = FusedMoEParallel(EXPERTS, TOP_K, HIDDEN, INTER, renormalize, tp_group=group)
            load(layer, ck)
            with torch.inference_mode():
                out[f"{name}/{renormalize}"] = layer(ck["x"], ck["logits"])
    return out


def dense_output(ck: dict, renormalize: bool) -> torch.Tensor:
    layer = FusedMoE(EXPERTS, TOP_K, HIDDEN, INTER, renormalize)
    load_per_expert(layer, ck)
    with torch.inference_mode():
        return layer(ck["x"], ck["logits"])


def test_routing_is_ragged_with_an_idle_expert():
    """The case below covers what it claims: an expert with no token, and unequal loads."""
    _, ids = select_experts(checkpoint(0)["logits"], TOP_K, True)
    counts = torch.bincount(ids.flatten(), minlength=EXPERTS).tolist()
    assert counts[IDLE] == 0 and counts[0] == TOKENS and len(set(counts)) > 2


def test_tp2_experts_equal_dense_fused_moe():
    ck = checkpoint(0)
    outs = run_on_ranks(rank_outputs, TP, 0)
    for renormalize in (True, False):
        expected = dense_output(ck, renormalize)
        for o in outs:  # every rank ends with the full sum, from either checkpoint layout
            torch.testing.assert_close(o[f"per_expert/{renormalize}"], expected)
            torch.testing.assert_close(o[f"stacked/{renormalize}"], expected)


def test_each_rank_holds_its_slice_of_every_expert():
    """In-process (loading needs no collective): the partial outputs of the ranks sum to the dense one."""
    ck, n = checkpoint(1), INTER // TP
    partials = []
    for rank in range(TP):
        layer = FusedMoEParallel(EXPERTS, TOP_K, HIDDEN, INTER, True, tp_group=TensorParallelGroup(rank, TP))
        load_stacked(layer, ck)
        assert layer.gate_up_proj.shape == (EXPERTS, 2 * n, HIDDEN)
        rows = slice(rank * n, (rank + 1) * n)
        for e in range(EXPERTS):
            expected = torch.cat([ck[f"{e}.gate"][rows], ck[f"{e}.up"][rows]])
            torch.testing.assert_close(layer.gate_up_proj.data[e], expected)
            torch.testing.assert_close(layer.down_proj.data[e], ck[f"{e}.down"][:, rows])
        with torch.inference_mode():
            partials.append(FusedMoE.forward(layer, ck["x"], ck["logits"]))  # before the all-reduce
    torch.testing.assert_close(sum(partials), dense_output(ck, True))


def test_full_checkpoint_shapes_are_required():
    layer = FusedMoEParallel(EXPERTS, TOP_K, HIDDEN, INTER, True, tp_group=TensorParallelGroup(1, TP))
    half = torch.zeros(INTER // TP, HIDDEN)  # already a slice: it would fit the local rows
    with pytest.raises(ValueError, match="full .unsharded. model has 12"):
        layer.weight_loader(layer.gate_up_proj, half, (0, 1))


# ---- the engine ----------------------------------------------------------------------------------

PROMPTS = ["Hello, my name is", "The model", "a cache block page attention query key value batch", "x"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
CHUNKED = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=8)  # prompts prefilled in chunks


def experts_of_rank(worker):
    experts = worker.model_runner.model.model.layers[0].mlp.experts
    return type(experts).__name__, tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)


def hf_greedy(model_dir: str, prompt_ids: list[list[int]], n: int) -> list[list[int]]:
    """Brute force on HF's model: the full sequence each step, argmax of the last position."""
    model, outs = load_hf_model(ModelConfig(model_dir, device="cpu")), []
    with torch.inference_mode():
        for ids in prompt_ids:
            seq = list(ids)
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            outs.append(seq[len(ids) :])
    return outs


def test_qwen3_moe_tp2_greedy_equals_m4_and_hf(toy_model_dir):
    model_dir = toy_model_dir("qwen3_moe")  # layer 0 sparse (4 experts, top-2), layer 1 dense
    with LLM(model_dir, tensor_parallel_size=2, **CHUNKED) as llm:
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        ranks = llm.collective_rpc(experts_of_rank)
    inter = 32 // 2  # moe_intermediate_size of the toy, split
    assert ranks == [("FusedMoEParallel", (4, 2 * inter, 64), (4, 64, inter))] * 2
    tokens = [o.outputs[0].token_ids for o in got]
    m4 = m4_cudagraph.LLM(model_dir, block_size=4).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tokens == [o.outputs[0].token_ids for o in m4]
    assert tokens == hf_greedy(model_dir, [o.prompt_token_ids for o in got], GREEDY.max_tokens)
