"""How dimensions split over ranks, and the clear errors for what does not split (no processes)."""

from __future__ import annotations

import multiprocessing
from types import SimpleNamespace

import pytest

from m5_tp import LLM
from m5_tp.executor import launched_by_torchrun
from m5_tp.partition import (
    check_devices,
    check_tensor_parallel,
    kv_head_start,
    kv_heads_per_rank,
    vocab_range,
)

pytestmark = pytest.mark.m5


@pytest.mark.parametrize(
    "heads,kv_heads,tp",
    [(4, 2, 1), (4, 2, 2), (4, 2, 4), (32, 8, 8), (32, 8, 2), (16, 2, 8), (8, 8, 8), (8, 1, 4), (64, 8, 16)],
)
def test_each_rank_holds_the_kv_heads_its_query_heads_use(heads, kv_heads, tp):
    """Brute force: query head h reads KV head h // (heads / kv_heads) (GQA); every query head of
    rank r must find that KV head among the ones rank r holds."""
    group_size = heads // kv_heads
    q_per_rank = heads // tp
    num_kv, replicas = kv_heads_per_rank(kv_heads, tp)
    assert num_kv * tp == kv_heads * replicas
    held = []
    for rank in range(tp):
        start = kv_head_start(rank, kv_heads, tp)
        held.append(range(start, start + num_kv))
        for h in range(rank * q_per_rank, (rank + 1) * q_per_rank):
            assert h // group_size in held[-1]
    assert sorted({h for r in held for h in r}) == list(range(kv_heads))  # every KV head somewhere


@pytest.mark.parametrize("vocab,tp", [(512, 2), (512, 4), (10, 4), (151936, 8), (7, 3)])
def test_vocab_ranges_cover_every_token_once(vocab, tp):
    ranges = [vocab_range(vocab, r, tp) for r in range(tp)]
    ids = [i for start, end, _ in ranges for i in range(start, end)]
    assert ids == list(range(vocab))
    assert len({per for _, _, per in ranges}) == 1  # same shard shape on every rank (padding)
    # the gather concatenates per-rank shards: token t sits at column t of the gathered logits
    assert all(start == r * ranges[0][2] for r, (start, _, _) in enumerate(ranges) if start < vocab)


def _config(heads=4, kv=2, inter=128, **extra):
    return SimpleNamespace(
        num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter, **extra
    )


@pytest.mark.parametrize(
    "config,tp,message",
    [
        (_config(), 3, r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"),
        (_config(), 8, "num_attention_heads"),
        (_config(heads=12, kv=4, inter=12), 3, r"num_key_value_heads \(4\) and tensor_parallel_size \(3\)"),
        (_config(heads=4, kv=4, inter=6), 4, r"intermediate_size \(6\)"),
        (_config(num_experts=8, moe_intermediate_size=6), 4, r"moe_intermediate_size \(6\)"),
    ],
)
def test_clear_errors_for_what_does_not_split(config, tp, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config, tp)


def test_more_ranks_than_gpus_is_refused():
    with pytest.raises(ValueError, match="need 4 CUDA devices, but 2 are visible"):
        check_devices("cuda", 4, 2)
    check_devices("cpu", 4, 0)  # CPU ranks share the cores


def test_llm_refuses_before_starting_any_process(qwen3_dir):
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(qwen3_dir, tensor_parallel_size=3)
    assert set(multiprocessing.active_children()) <= before


def test_torchrun_world_size_must_match(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="WORLD_SIZE=4 processes but tensor_parallel_size=2"):
        launched_by_torchrun(2)
    assert launched_by_torchrun(4) and not launched_by_torchrun(1)
    monkeypatch.delenv("WORLD_SIZE")
    assert not launched_by_torchrun(2)
