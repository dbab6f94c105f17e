"""What a worker rebuilds from the driver's StepInput gives exactly the driver's model inputs, step
after step, through chunked prefill, preemption, forks with copy-on-write and decode (no processes:
the check runs beside a one-process engine)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import m4_cudagraph
from m4_cudagraph.static_buffers import host_decode_inputs
from m5_tp import SamplingParams
from m5_tp.step_input import StepInput

pytestmark = pytest.mark.m5

PROMPTS = ["Hello, my name is", "The model", "a cache block page attention query key value batch step", "x"]


def _assert_same_inputs(runner, so, rebuilt) -> None:
    ids, md = runner.prepare_inputs(so)
    ids_w, md_w = runner.prepare_inputs(rebuilt)
    assert torch.equal(ids, ids_w)
    for f in dataclasses.fields(md):
        a, b = getattr(md, f.name), getattr(md_w, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    if not any(s.is_prefill for s in so.seqs):  # m4's static decode inputs (what a graph reads)
        bucket, width = len(so.seqs) + 1, runner.buffers.max_blocks_per_seq
        driver = host_decode_inputs(so.seqs, bucket, runner.block_size, width)
        worker = host_decode_inputs(rebuilt.seqs, bucket, runner.block_size, width)
        assert all(torch.equal(driver[k], worker[k]) for k in driver)
    assert rebuilt.block_copies == so.block_copies and rebuilt.samples == so.samples


def test_rebuilt_inputs_equal_the_drivers(qwen3_dir):
    llm = m4_cudagraph.LLM(
        qwen3_dir, block_size=4, max_num_batched_tokens=8, max_num_seqs=6, num_gpu_blocks_override=16
    )
    runner = llm.llm_engine.model_runner
    execute, known, stats = runner.execute_model, {}, {"steps": 0, "reused": 0, "copies": 0}

    def checked(so):
        previous = dict(known)
        step = pickle.loads(pickle.dumps(StepInput.from_scheduler_output(so)))  # as sent
        rebuilt = step.to_scheduler_output(known)
        _assert_same_inputs(runner, so, rebuilt)
        stats["steps"] += 1
        stats["reused"] += sum(previous.get(s.seq_id) is s for s in rebuilt.seqs)
        stats["copies"] += len(so.block_copies)
        return execute(so)

    runner.execute_model = checked
    params = [SamplingParams(n=2, temperature=0.8, seed=i, max_tokens=14, ignore_eos=True) for i in range(4)]
    llm.generate(PROMPTS, params, use_tqdm=False)
    sched = llm.llm_engine.scheduler
    assert sched.num_preemptions > 0 and stats["copies"] > 0  # the hard cases did happen
    assert stats["reused"] > stats["steps"]  # most decode steps only appended a token


def test_a_decode_step_sends_one_token_per_sequence(qwen3_dir):
    engine = m4_cudagraph.LLM(qwen3_dir, block_size=4).llm_engine
    engine.add_request("r", None, list(range(5, 45)), SamplingParams(temperature=0, max_tokens=8))
    engine.step()  # the prefill
    step = StepInput.from_scheduler_output(engine.scheduler.schedule())
    assert step.token_ids == [[engine.scheduler.running[0].seqs[0].get_last_token_id()]]
    assert step.num_computed_tokens == [40] and step.is_prefill == [False]


def test_a_known_sequence_is_reused_only_when_it_just_grew():
    from m0_config.sequence import Sequence

    grown, stale = Sequence(1, None, [0] * 9 + [4]), Sequence(2, None, [0] * 5)
    known = {1: grown, 2: stale, 3: Sequence(3, None, [7])}
    step = StepInput([1, 2], [10, 10], [[5], [6, 8]], [[0, 1, 2]] * 2, [False, True], [True, True], [])
    so = step.to_scheduler_output(known)
    assert so.seqs[0] is grown and grown.get_token_ids()[-2:] == [4, 5]
    assert so.seqs[1] is not stale and so.seqs[1].get_len() == 12
    assert so.seqs[1].get_token_ids()[10:] == [6, 8] and so.num_scheduled_tokens == [1, 2]
    assert set(known) == {1, 2}  # sequence 3 was not scheduled: forgotten
