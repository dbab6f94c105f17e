"""Async scheduling on a GPU (marker gpu): the same tokens as the synchronous engine with graphs on,
and the host never waits for the GPU while it schedules and launches a step."""

from __future__ import annotations

import time

import pytest
import torch

from m4_cudagraph import LLM, SamplingParams

pytestmark = [pytest.mark.m4, pytest.mark.gpu]


def _llm(model_dir, **kwargs):
    return LLM(model_dir, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28, **kwargs)


def _workload(n: int = 40):
    prompts = [[(7 * i + j) % 400 + 5 for j in range(3 + i % 13)] for i in range(n)]
    params = [
        SamplingParams(temperature=0, max_tokens=20 + 9 * (i % 11), ignore_eos=i % 3 > 0) for i in range(n)
    ]
    return prompts, params


def test_gpu_async_equals_sync_with_graphs(toy_model_dir):
    model_dir = toy_model_dir("qwen3")
    fast, slow = _llm(model_dir, max_num_seqs=16), _llm(model_dir, max_num_seqs=16, async_scheduling=False)
    assert fast.llm_engine.async_scheduling and not slow.llm_engine.async_scheduling  # default on CUDA
    prompts, params = _workload()
    got = fast.generate(prompts, params, use_tqdm=False)
    want = slow.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]


def test_gpu_async_steps_never_synchronize(toy_model_dir):
    """torch's sync debug mode raises on every host wait torch issues (.item(), .tolist() of a GPU
    tensor, a blocking copy). In the async engine the only wait is on the previous step's copy
    event, so whole steps run clean; the synchronous engine fails the same check."""
    prompts, params = _workload(24)
    for async_scheduling in (True, False):
        llm = _llm(toy_model_dir("qwen3"), max_num_seqs=8, async_scheduling=async_scheduling)
        engine = llm.llm_engine
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), None, p, sp)
        for _ in range(3):  # prefill steps: eager prompt processing may sync (not the steady state)
            engine.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if async_scheduling:
                for _ in range(20):
                    engine.step()
            else:
                with pytest.raises(RuntimeError, match="synchroniz"):
                    engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_gpu_async_step_returns_while_the_gpu_is_busy(toy_model_dir):
    """The overlap itself, timed. The sync debug mode above sees only the waits torch requests; a
    stall inside the driver (a "non_blocking" copy from pageable memory) slips past it. So: with a
    step in flight, queue a long GPU spin and call step() once more. The async step queues its work
    behind the spin and reads the previous step, which finished before the spin: it returns long
    before the GPU is free. The synchronous step must wait the spin out."""
    prompts, params = _workload(16)
    for async_scheduling in (True, False):
        engine = _llm(toy_model_dir("qwen3"), max_num_seqs=8, async_scheduling=async_scheduling).llm_engine
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), None, p, sp)
        for _ in range(4):  # past the prefills; async: a decode step is now in flight
            engine.step()
        assert (engine.in_flight is not None) == async_scheduling
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.cuda._sleep(1_000_000_000)  # about half a second of GPU clock cycles
        torch.cuda.synchronize()
        busy = time.perf_counter() - start
        torch.cuda._sleep(1_000_000_000)
        start = time.perf_counter()
        engine.step()
        took = time.perf_counter() - start
        torch.cuda.synchronize()
        assert busy > 0.2, busy
        if async_scheduling:
            assert took < busy / 2, (took, busy)
        else:
            assert took > busy * 0.8, (took, busy)
