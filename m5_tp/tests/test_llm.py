"""The TP engine on 2 and 4 CPU processes (gloo): the same tokens as m4 (and so m3, m2, m1, HF),
logits equal to TP=1, shutdown on close / garbage collection / failure, two engines at once.

Process start-up dominates the time here (each worker imports torch), so one TP=2 engine serves
most tests; it runs with a small token budget, so that prompts are chunked, and the second engine
with a small block pool, so that sequences are preempted."""

from __future__ import annotations

import gc
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import m4_cudagraph
from m0_config.toy import TOY_PROMPTS
from m5_tp import LLM, SamplingParams

pytestmark = pytest.mark.m5

PROMPTS = list(TOY_PROMPTS)
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
CHUNKED = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=16)  # 16 tokens a step: chunks
# 24 blocks of 4 tokens for 6 sequences of up to ~45 tokens: preemption.
SMALL_POOL = dict(block_size=4, num_gpu_blocks_override=24, max_num_seqs=6)


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def _m4_tokens(model_dir, prompts=PROMPTS, params=GREEDY):
    return _tokens(m4_cudagraph.LLM(model_dir, block_size=4).generate(prompts, params, use_tqdm=False))


def _workers(llm):
    return list(llm.llm_engine.model_runner.handles.processes)


# Run on every rank through collective_rpc (module-level, so the workers can unpickle them).
def kv_heads_of_rank(worker):
    qkv = worker.model_runner.model.model.layers[0].self_attn.qkv_proj
    return worker.rank, qkv.num_heads, qkv.num_kv_heads, qkv.kv_head_start, worker.model_runner.num_blocks


def set_static_decode(worker, on: bool):
    worker.model_runner.use_static_decode = on  # m4's padded decode path (what a CUDA graph replays)


def fail_on_rank_1(worker):
    if worker.rank == 1:
        raise ValueError("injected fault")


class CollectiveRecorder:
    """Stands in for a rank's device group: logs each collective (its name and the shapes and
    dtypes of its inputs, the last list argument), then runs it."""

    def __init__(self, group, log: list):
        self.group, self.log = group, log

    def __getattr__(self, name):
        method = getattr(self.group, name)

        def record(*args):
            inputs = [a for a in args if isinstance(a, list)][-1]
            self.log.append((name, tuple((tuple(t.shape), t.dtype) for t in inputs)))
            return method(*args)

        return record


def _logged(log: list, name: str, choose):
    def choice(so):
        log.append((name, choose(so), len(so.seqs), sum(so.num_scheduled_tokens)))
        return log[-1][1]

    return choice


def record_collectives(worker, on: bool):
    """Start recording this rank's model collectives and graph choices (m4's decode bucket and
    mixed-batch bucket, where the runner has one); stop and return them."""
    runner, group = worker.model_runner, worker.tp_group
    choices = [name for name in ("decode_bucket", "mixed_bucket") if hasattr(runner, name)]
    if on:
        worker.collective_log = log = []
        object.__setattr__(group, "device_group", CollectiveRecorder(group.device_group, log))  # frozen
        for name in choices:
            setattr(runner, name, _logged(log, name, getattr(runner, name)))
        return None
    object.__setattr__(group, "device_group", group.device_group.group)
    for name in choices:
        delattr(runner, name)  # back to the class's method
    return worker.collective_log


@pytest.fixture(scope="module")
def tp2(qwen3_dir):
    with LLM(qwen3_dir, tensor_parallel_size=2, **CHUNKED) as llm:
        yield llm


@pytest.fixture(scope="module")
def m4_greedy(qwen3_dir):
    return _m4_tokens(qwen3_dir)


def test_greedy_equals_m4_with_chunked_prefill(tp2, m4_greedy, spy_chunks):
    engine = tp2.llm_engine
    chunked = spy_chunks(engine)  # tp2 is shared by the module: the spy is removed below
    try:
        assert _tokens(tp2.generate(PROMPTS, GREEDY, use_tqdm=False)) == m4_greedy
    finally:
        del engine.scheduler.schedule
    assert any(chunked)  # some steps computed a non-final chunk, on both ranks


def test_sampling_forks_and_logprobs_equal_m4(tp2, qwen3_dir):
    """n / best_of fork sequences that share prompt blocks: the copy-on-write copies run on every rank."""
    params = [
        SamplingParams(n=2, best_of=3, temperature=0.9, seed=5, max_tokens=10),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=9, max_tokens=12, logprobs=2),
        SamplingParams(n=3, temperature=1.0, seed=1, repetition_penalty=1.3, max_tokens=8),
    ]
    expected = m4_cudagraph.LLM(qwen3_dir, block_size=4).generate(PROMPTS[:3], params, use_tqdm=False)
    got = tp2.generate(PROMPTS[:3], params, use_tqdm=False)
    assert _tokens(got) == _tokens(expected)
    for a, b in zip(expected, got):
        for x, y in zip(a.outputs, b.outputs):
            assert y.cumulative_logprob == pytest.approx(x.cumulative_logprob, abs=1e-3)


def test_logits_of_tp2_equal_tp1(tp2, qwen3_dir):
    def first_step_logits(llm):
        engine = llm.llm_engine
        engine.add_request("probe", None, list(range(5, 17)), SamplingParams(max_tokens=1))  # one chunk
        logits = engine.model_runner.execute_model(engine.scheduler.schedule())
        engine.abort_request("probe")
        engine.scheduler.pop_finished_requests()
        return logits

    tp1 = LLM(qwen3_dir, block_size=4)  # same code path, no worker process
    assert _workers(tp1) == []
    expected = first_step_logits(tp1)
    actual = first_step_logits(tp2)
    assert actual.shape == expected.shape == (1, 512)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_static_decode_path_of_m4_on_every_rank(tp2, m4_greedy):
    assert tp2.collective_rpc(set_static_decode, (True,)) == [None, None]
    try:
        assert _tokens(tp2.generate(PROMPTS, GREEDY, use_tqdm=False)) == m4_greedy
    finally:
        tp2.collective_rpc(set_static_decode, (False,))


def test_ranks_launch_the_same_collectives_in_the_same_order(tp2):
    """What NCCL needs (and CUDA graphs, which replay the collectives they captured): every rank
    launches the same collectives, with the same shapes and dtypes, in the same order, and picks the
    same decode bucket, through chunked prefill, sampling and m4's padded decode (a graph's path).
    A decision taken from one rank's own state would show here as a difference."""
    prompts = [[(13 * i + 7 * j) % 480 for j in range(5 + 9 * i % 37)] for i in range(7)]
    params = [
        SamplingParams(temperature=0.6, seed=i, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(7)
    ]
    tp2.collective_rpc(set_static_decode, (True,))
    tp2.collective_rpc(record_collectives, (True,))
    try:
        tp2.generate(["Benchmark: "], SamplingParams(max_tokens=5), use_tqdm=False)  # the warm-up request
        tp2.generate(prompts, params, use_tqdm=False)
    finally:
        driver, worker = tp2.collective_rpc(record_collectives, (False,))
        tp2.collective_rpc(set_static_decode, (False,))
    decode = [entry for entry in driver if entry[0] == "decode_bucket"]
    assert sum(b[1] is None for b in decode) > 3 and sum(b[1] is not None for b in decode) > 10
    assert {"allreduce", "gather", "decode_bucket"} <= {name for name, *_ in driver}
    assert driver == worker


def test_tp2_on_the_rope_cache_triton_backend_equals_m4(qwen3_dir, m4_greedy):
    """Every rank runs m4's RoPE + KV-cache-write kernel and the Triton attention on its share of the
    heads (Triton's interpreter on a CPU): the tokens of m4 at TP=1 on the torch backend."""
    from m4_cudagraph.fused_attention import RopeCacheTritonBackend

    with LLM(qwen3_dir, tensor_parallel_size=2, attention_backend="triton", **CHUNKED) as llm:
        driver = llm.llm_engine.model_runner.handles.driver_runner
        assert isinstance(driver.attn_backend, RopeCacheTritonBackend)
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == m4_greedy


def test_llama_tp2_context_manager_stops_workers(toy_model_dir):
    model_dir = toy_model_dir("llama")  # untied LM head: its own vocabulary shards
    with LLM(model_dir, tensor_parallel_size=2, block_size=4) as llm:
        workers = _workers(llm)
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _m4_tokens(model_dir)
    assert workers and not any(p.is_alive() for p in workers)


def test_qwen2_tp2_garbage_collection_stops_workers(toy_model_dir):
    model_dir = toy_model_dir("qwen2")  # biases on q/k/v: split with their heads
    llm = LLM(model_dir, tensor_parallel_size=2, block_size=4)
    workers = _workers(llm)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _m4_tokens(model_dir)
    del llm
    gc.collect()
    assert workers and not any(p.is_alive() for p in workers)


def test_tp4_replicates_kv_heads_and_a_killed_worker_surfaces(qwen3_dir, m4_greedy):
    """4 query heads, 2 KV heads on 4 ranks: one query head and a copy of its KV head per rank."""
    llm = LLM(qwen3_dir, tensor_parallel_size=4, block_size=4)
    workers = _workers(llm)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == m4_greedy
    ranks = llm.collective_rpc(kv_heads_of_rank)
    assert [r[:4] for r in ranks] == [(0, 1, 1, 0), (1, 1, 1, 0), (2, 1, 1, 1), (3, 1, 1, 1)]
    assert len({r[4] for r in ranks}) == 1  # the ranks agreed on one number of KV blocks

    os.kill(workers[1].pid, signal.SIGKILL)  # rank 2 disappears (say, the OOM killer)
    workers[1].join()
    with pytest.raises(RuntimeError, match=r"worker rank 2 died \(exit code -9\)"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert not any(p.is_alive() for p in workers)


def test_two_engines_side_by_side_then_a_worker_raises(tp2, qwen3_dir, m4_greedy, capfd):
    other = LLM(qwen3_dir, tensor_parallel_size=2, **SMALL_POOL)
    workers = _workers(other)
    for llm in (other, tp2, other):  # interleaved: each engine's collectives stay in its own groups
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == m4_greedy
    assert other.llm_engine.scheduler.num_preemptions > 0  # preempted and recomputed on both ranks

    with pytest.raises(RuntimeError, match="worker rank 1 failed: ValueError: injected fault"):
        other.collective_rpc(fail_on_rank_1)
    assert not any(p.is_alive() for p in workers)
    # The worker logged it too: with NCCL a driver blocked on the GPU reads the pipe only later.
    assert "tensor-parallel worker rank 1 failed" in capfd.readouterr().err
    with pytest.raises(RuntimeError, match="has been shut down"):
        other.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert _tokens(tp2.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == m4_greedy[:2]  # unaffected


def test_bad_checkpoint_fails_cleanly_at_start_up(qwen3_dir, tmp_path):
    """Every rank refuses a mis-shaped tensor; the driver raises its own ValueError, no process stays."""
    from safetensors.torch import load_file, save_file

    for name in os.listdir(qwen3_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(qwen3_dir, name), tmp_path)
    tensors = load_file(os.path.join(qwen3_dir, "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = torch.cat([tensors[name], tensors[name]])  # rank 1's slice alone would fit
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    before = set(multiprocessing.active_children())  # other engines' workers
    with pytest.raises(ValueError, match=r"q_proj.*the full \(unsharded\) model has 128"):
        LLM(str(tmp_path), tensor_parallel_size=2)
    assert set(multiprocessing.active_children()) <= before


def test_torchrun_two_processes(qwen3_dir):
    """The same CLI under torchrun: rank 0 drives and prints, rank 1 serves it and exits 0."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun, "--standalone", "--nproc-per-node", "2", "-m", "m5_tp", "--model", qwen3_dir,
        "--tensor-parallel-size", "2", "--block-size", "4", "--max-tokens", "12", "Hello, my name is",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.findall(r"Output\[0\]: (.*)  \(", done.stdout)
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = m4_cudagraph.LLM(qwen3_dir).generate(["Hello, my name is"], params, use_tqdm=False)
    assert printed == [repr(expected[0].outputs[0].text)]  # printed once: by the driver only


# ---- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_gpu_tp2_equals_tp1(toy_model_dir, arch, enforce_eager):
    """Two GPUs (NCCL; with CUDA graphs unless enforce_eager) give one GPU's tokens, in float32."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    model_dir = toy_model_dir(arch)
    # A fixed KV budget: the one-GPU engine is still alive on cuda:0 when the TP engine starts.
    kwargs = dict(
        device="cuda", dtype="float32", enforce_eager=enforce_eager, kv_cache_memory_bytes=256 << 20
    )
    prompts = [[(7 * i + j) % 400 + 5 for j in range(3 + i % 13)] for i in range(24)]
    params = [SamplingParams(temperature=0, max_tokens=30 + 5 * (i % 7), ignore_eos=True) for i in range(24)]
    expected = _tokens(m4_cudagraph.LLM(model_dir, **kwargs).generate(prompts, params, use_tqdm=False))
    with LLM(model_dir, tensor_parallel_size=2, **kwargs) as llm:
        assert (llm.llm_engine.model_runner.driver_runner.graphs != {}) == (not enforce_eager)
        assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
