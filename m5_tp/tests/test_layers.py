"""Each parallel layer on 2 and 4 ranks (real processes, gloo) equals its dense m2 version, with
each rank's weights cut from the same full checkpoint tensors by its own weight_loader."""

from __future__ import annotations

import functools

import pytest
import torch

from m2_kvcache.layers.embedding import LMHead, VocabEmbedding
from m2_kvcache.layers.linear import ColumnLinear, MergedColumnLinear, QKVLinear, RowLinear
from m5_tp.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from m5_tp.parallel_state import TensorParallelGroup
from m5_tp.spawn import run_on_ranks

pytestmark = pytest.mark.m5

HIDDEN, HEAD, HEADS, KV_HEADS, INTER, VOCAB, TOKENS = 16, 4, 4, 2, 24, 10, 5  # VOCAB % 4 != 0: padding


def checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors, as a checkpoint holds them, and the input; identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    return {
        "x": r(TOKENS, HIDDEN),
        "ids": torch.tensor([0, 3, 9, 5, 7]),
        "col.w": r(INTER, HIDDEN), "col.b": r(INTER),
        "gate": r(INTER, HIDDEN), "up": r(INTER, HIDDEN),
        "q": r(HEADS * HEAD, HIDDEN), "k": r(KV_HEADS * HEAD, HIDDEN), "v": r(KV_HEADS * HEAD, HIDDEN),
        "qb": r(HEADS * HEAD), "kb": r(KV_HEADS * HEAD), "vb": r(KV_HEADS * HEAD),
        "row.in": r(TOKENS, INTER), "row.w": r(HIDDEN, INTER), "row.b": r(HIDDEN),
        "emb": r(VOCAB, HIDDEN), "head": r(VOCAB, HIDDEN),
    }  # fmt: skip


def load(layer, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    layer.weight_loader(getattr(layer, name), tensor, shard_id)


def build_all(make: dict, ck: dict) -> dict[str, torch.nn.Module]:
    """Every layer from `make` (dense classes or parallel partials), loaded from the full tensors."""
    col = make["column"](HIDDEN, INTER, True)
    load(col, "weight", ck["col.w"]), load(col, "bias", ck["col.b"])
    merged = make["merged"](HIDDEN, [INTER, INTER], False)
    load(merged, "weight", ck["gate"], 0), load(merged, "weight", ck["up"], 1)
    qkv = make["qkv"](HIDDEN, HEAD, HEADS, KV_HEADS, True)
    for sid in "qkv":
        load(qkv, "weight", ck[sid], sid), load(qkv, "bias", ck[sid + "b"], sid)
    row = make["row"](INTER, HIDDEN, True)
    load(row, "weight", ck["row.w"]), load(row, "bias", ck["row.b"])
    emb = make["embedding"](VOCAB, HIDDEN)
    load(emb, "weight", ck["emb"])
    head = make["lm_head"](VOCAB, HIDDEN, False)
    load(head, "weight", ck["head"])
    tied = make["lm_head"](VOCAB, HIDDEN, False)
    tied.tie_weights(emb)
    return dict(column=col, merged=merged, qkv=qkv, row=row, embedding=emb, lm_head=head, tied=tied)


def run_all(layers: dict, ck: dict) -> dict[str, torch.Tensor]:
    x = ck["x"]
    return {
        "column": layers["column"](x),
        "merged": layers["merged"](x),
        "qkv": layers["qkv"](x),
        "row": layers["row"](ck["row.in"]),
        "embedding": layers["embedding"](ck["ids"]),
        "lm_head": layers["lm_head"](x),
        # into a buffer, as m4's graphs call it: on the driver all logits, elsewhere nothing written
        "lm_head_out": layers["lm_head"](x, out=torch.zeros(x.shape[0], VOCAB)),
        "tied": layers["tied"](x),
    }


DENSE = dict(
    column=ColumnLinear,
    merged=MergedColumnLinear,
    qkv=QKVLinear,
    row=RowLinear,
    embedding=VocabEmbedding,
    lm_head=LMHead,
)


def rank_outputs(group: TensorParallelGroup, seed: int) -> dict:
    """On every rank: the parallel layers' outputs, plus what the parent needs to place them."""
    ck = checkpoint(seed)
    parallel = dict(
        column=ColumnParallelLinear,
        merged=MergedColumnParallelLinear,
        qkv=QKVParallelLinear,
        row=RowParallelLinear,
        embedding=VocabParallelEmbedding,
        lm_head=ParallelLMHead,
    )
    make = {k: functools.partial(cls, tp_group=group) for k, cls in parallel.items()}
    # The row layer's input on this rank is its slice of the features, as the column layer leaves it.
    n = INTER // group.world_size
    ck["row.in"] = ck["row.in"][:, group.rank * n : (group.rank + 1) * n]
    layers = build_all(make, ck)
    with torch.inference_mode():
        out = run_all(layers, ck)
    out["kv_head_start"] = layers["qkv"].kv_head_start
    return out


@pytest.fixture(scope="module")
def dense():
    ck = checkpoint(0)
    with torch.inference_mode():
        return run_all(build_all(DENSE, ck), ck)


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request):
    return request.param, run_on_ranks(rank_outputs, request.param, 0)


def _cat(outs, key):
    return torch.cat([o[key] for o in outs], dim=-1)


def test_column_and_merged_split_outputs(dense, ranks):
    tp, outs = ranks
    torch.testing.assert_close(_cat(outs, "column"), dense["column"])
    # merged: each rank holds [gate_r | up_r]; the dense output is [gate | up]
    halves = [o["merged"].chunk(2, dim=-1) for o in outs]
    gate, up = torch.cat([h[0] for h in halves], -1), torch.cat([h[1] for h in halves], -1)
    torch.testing.assert_close(torch.cat([gate, up], -1), dense["merged"])


def test_qkv_splits_query_heads_and_splits_or_replicates_kv_heads(dense, ranks):
    tp, outs = ranks
    q, k, v = dense["qkv"].split([HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD], -1)
    q_heads, kv_local = HEADS // tp, max(1, KV_HEADS // tp)
    for rank, o in enumerate(outs):
        q_r, k_r, v_r = o["qkv"].split([q_heads * HEAD, kv_local * HEAD, kv_local * HEAD], -1)
        torch.testing.assert_close(q_r, q[:, rank * q_heads * HEAD : (rank + 1) * q_heads * HEAD])
        kv = o["kv_head_start"]
        # GQA: the rank's query heads must be grouped with the KV heads it holds
        assert kv == rank * q_heads // (HEADS // KV_HEADS)
        torch.testing.assert_close(k_r, k[:, kv * HEAD : (kv + kv_local) * HEAD])
        torch.testing.assert_close(v_r, v[:, kv * HEAD : (kv + kv_local) * HEAD])
    if tp == 4:  # 2 KV heads on 4 ranks: each is replicated on 2 ranks
        assert [o["kv_head_start"] for o in outs] == [0, 0, 1, 1]


def test_row_all_reduces_and_adds_bias_once(dense, ranks):
    _, outs = ranks
    for o in outs:  # every rank ends with the full sum
        torch.testing.assert_close(o["row"], dense["row"])


def test_vocab_parallel_embedding_and_lm_head(dense, ranks):
    tp, outs = ranks
    for o in outs:
        torch.testing.assert_close(o["embedding"], dense["embedding"])
    torch.testing.assert_close(outs[0]["lm_head"], dense["lm_head"])  # gathered on the driver only
    torch.testing.assert_close(outs[0]["lm_head_out"], dense["lm_head"])
    assert all(o["lm_head"].shape == (TOKENS, 0) for o in outs[1:])
    dense_tied = torch.nn.functional.linear(checkpoint(0)["x"], checkpoint(0)["emb"])
    torch.testing.assert_close(outs[0]["tied"], dense_tied)


# ---- in-process checks: construction and loading need no collectives ----------------------------


def test_weight_loader_takes_this_ranks_rows():
    ck = checkpoint(1)
    for rank in range(2):
        group = TensorParallelGroup(rank=rank, world_size=2)
        layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], tp_group=group)
        layer.weight_loader(layer.weight, torch.cat([ck["gate"], ck["up"]]))  # an already fused tensor
        half = INTER // 2
        expected = torch.cat(
            [ck["gate"][rank * half : (rank + 1) * half], ck["up"][rank * half : (rank + 1) * half]]
        )
        torch.testing.assert_close(layer.weight.data, expected)
        row = RowParallelLinear(INTER, HIDDEN, True, tp_group=group)
        row.weight_loader(row.weight, ck["row.w"])
        row.weight_loader(row.bias, ck["row.b"])
        torch.testing.assert_close(row.weight.data, ck["row.w"][:, rank * half : (rank + 1) * half])
        torch.testing.assert_close(row.bias.data, ck["row.b"])  # whole on every rank, added once


def test_vocab_padding_rows_are_zero():
    ck = checkpoint(0)
    last = VocabParallelEmbedding(VOCAB, HIDDEN, tp_group=TensorParallelGroup(rank=3, world_size=4))
    last.weight_loader(last.weight, ck["emb"])
    assert (last.vocab_start_index, last.vocab_end_index, last.num_embeddings_per_partition) == (9, 10, 3)
    torch.testing.assert_close(last.weight.data[0], ck["emb"][9])
    assert not last.weight.data[1:].any()


def test_wrong_checkpoint_shape_is_refused():
    layer = ColumnParallelLinear(HIDDEN, INTER, tp_group=TensorParallelGroup(rank=1, world_size=2))
    with pytest.raises(ValueError, match="full .unsharded. model has 24"):
        layer.weight_loader(layer.weight, torch.zeros(2 * INTER, HIDDEN))  # rank 1's slice would fit


def test_tied_head_must_match_the_embedding_split():
    emb = VocabParallelEmbedding(VOCAB, HIDDEN, tp_group=TensorParallelGroup(rank=0, world_size=2))
    head = ParallelLMHead(VOCAB, HIDDEN, tp_group=TensorParallelGroup(rank=1, world_size=2))
    with pytest.raises(ValueError, match="same vocabulary ranges"):
        head.tie_weights(emb)


@pytest.mark.parametrize("vocab", [VOCAB, 7])
def test_lm_head_writes_into_out(vocab):
    """m4's graphs pass their logits buffer as `out`: the same logits as m2's head, written there."""
    torch.manual_seed(0)
    head = ParallelLMHead(vocab, HIDDEN, tp_group=TensorParallelGroup(rank=0, world_size=1))
    reference = LMHead(vocab, HIDDEN)
    head.weight.data.normal_()
    reference.weight.data.copy_(head.weight.data[:vocab])
    x, buffer = torch.randn(TOKENS, HIDDEN), torch.full((TOKENS + 2, vocab), float("nan"))
    with torch.inference_mode():
        expected = reference(x)
        torch.testing.assert_close(reference(x, out=buffer[:TOKENS]), expected)
        buffer.fill_(float("nan"))
        assert head(x, out=buffer[:TOKENS]).data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer[:TOKENS], expected)
    assert buffer[TOKENS:].isnan().all()
