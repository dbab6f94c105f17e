"""The padded static decode path (what a graph replays) equals m3's eager path, on CPU; graph
replay equals eager on a GPU (marker gpu)."""

from __future__ import annotations

import pytest
import torch

import m3_paged
from m4_cudagraph import LLM, SamplingParams

pytestmark = pytest.mark.m4

PROMPTS = ["Hello, my name is", "The model", "a cache block page attention", "你好", "x", "step decode"]


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_static_padded_decode_equals_m3_all_archs(toy_arch_dir):
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = _tokens(m3_paged.LLM(toy_arch_dir, block_size=4).generate(PROMPTS, sp, use_tqdm=False))
    llm = LLM(toy_arch_dir, block_size=4, max_num_seqs=5)  # 6 prompts, buckets 1, 2, 4, 5: padding happens
    llm.llm_engine.model_runner.use_static_decode = True
    assert _tokens(llm.generate(PROMPTS, sp, use_tqdm=False)) == expected


def test_static_decode_with_sampling_and_forks(qwen3_dir):
    params = [
        SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=30),
    ]
    expected = _tokens(m3_paged.LLM(qwen3_dir, block_size=4).generate(PROMPTS[:2], params, use_tqdm=False))
    llm = LLM(qwen3_dir, block_size=4, max_num_seqs=7)
    llm.llm_engine.model_runner.use_static_decode = True
    assert _tokens(llm.generate(PROMPTS[:2], params, use_tqdm=False)) == expected


def test_mixed_static_steps_equal_m3_with_prefix_cache_and_chunks(qwen3_dir):
    """Steps with prefill work (prompt chunks next to decode rows, prefix-cache hits leaving a few
    new tokens) take the padded mixed path on CPU too, and give m3's tokens."""
    shared = list(range(40, 88))  # 48 tokens = 12 blocks of 4 shared by every prompt
    prompts = [shared + [5 + i] * (1 + 3 * i) for i in range(5)] + [[9, 8, 7]]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kw = dict(block_size=4, max_num_batched_tokens=64, enable_prefix_caching=True, max_num_seqs=6)
    expected = _tokens(m3_paged.LLM(qwen3_dir, **kw).generate(prompts, sp, use_tqdm=False))
    llm = LLM(qwen3_dir, **kw)
    runner = llm.llm_engine.model_runner
    runner.use_static_decode = True
    mixed_steps = []
    original = runner.execute_mixed
    runner.execute_mixed = lambda so, n: mixed_steps.append((len(so.seqs), n)) or original(so, n)
    assert _tokens(llm.generate(prompts, sp, use_tqdm=False)) == expected
    assert len(mixed_steps) >= 3 and any(seqs > 1 for seqs, _ in mixed_steps), mixed_steps


# ---- GPU: real graphs -------------------------------------------------------------------------


def _gpu_pair(model_dir, **kwargs):
    kwargs.setdefault("kv_cache_memory_bytes", 1 << 28)  # two engines share the GPU
    graph = LLM(model_dir, device="cuda", **kwargs)
    eager = LLM(model_dir, device="cuda", enforce_eager=True, **kwargs)
    return graph, eager


@pytest.mark.gpu
@pytest.mark.parametrize("max_num_seqs", [23, 32])
def test_gpu_graph_replay_equals_eager_long_generation(toy_model_dir, max_num_seqs):
    """Long outputs cross many block boundaries; 40 requests > max_num_seqs, so requests finish
    and arrive between replays; different max_tokens make batch sizes change every few steps."""
    model_dir = toy_model_dir("qwen3")
    graph, eager = _gpu_pair(model_dir, dtype="float32", block_size=16, max_num_seqs=max_num_seqs)
    assert graph.llm_engine.model_runner.graphs and not eager.llm_engine.model_runner.graphs
    prompts = [[(7 * i + j) % 400 + 5 for j in range(3 + i % 13)] for i in range(40)]
    params = [SamplingParams(temperature=0, max_tokens=40 + 9 * (i % 11), ignore_eos=True) for i in range(40)]
    assert _tokens(graph.generate(prompts, params, use_tqdm=False)) == _tokens(
        eager.generate(prompts, params, use_tqdm=False)
    )


@pytest.mark.gpu
def test_gpu_graph_replays_are_used(toy_model_dir):
    graph, _ = _gpu_pair(toy_model_dir("llama"), dtype="float32", max_num_seqs=8)
    runner = graph.llm_engine.model_runner
    calls = []
    original = runner.forward_decode_static
    runner.forward_decode_static = lambda bs: calls.append(bs) or original(bs)
    out = graph.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert all(len(o.outputs[0].token_ids) == 20 for o in out)
    assert calls == []  # every decode step was a replay, never an eager static forward
    assert sorted(runner.graphs) == runner.capture_sizes == [1, 2, 4, 8]


@pytest.mark.gpu
def test_gpu_no_attention_kernel_compiles_after_start_up(toy_model_dir):
    """LLM(...) leaves nothing for Triton to compile in the attention kernel: decode and mixed steps
    were captured, and the eager prefill path ran once at start-up
    (m3_paged/model_runner.py::ModelRunner.warm_up). Without that, the first long prompt of a run
    paid for a compile (seconds on a fresh machine) inside its own latency."""
    from m3_paged.ops.paged_attention import _paged_attention_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = toy_model_dir("qwen3", max_position_embeddings=2048)
    llm = LLM(model, dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=2**28)
    try:
        caches = _paged_attention_kernel.device_caches
        variants = lambda: sum(len(cache[0]) for cache in caches.values())  # noqa: E731
        before = variants()
    except (AttributeError, TypeError, IndexError):
        pytest.skip("this Triton version keeps its compiled variants elsewhere")
    prompts = [[5 + i % 400 for i in range(n)] for n in (1500, 700, 30)]  # > 512 tokens: eager path
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [20, 20, 20]
    assert before > 0 and variants() == before
