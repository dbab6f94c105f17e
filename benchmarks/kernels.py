"""Micro-benchmarks of the paged-attention kernel (m3_paged/ops/paged_attention.py) against the two
ceilings of the GPU it runs on.

- Ceilings: a large device-to-device copy (bytes read + bytes written per second) and a large bf16
  matrix product through cuBLAS (TFLOP/s).
- Decode: one query token per sequence over a context of `ctx` cached tokens, Qwen3-0.6B's head
  layout (16 q heads, 8 kv heads, head_dim 128), blocks scattered at random through the cache.
  The bytes that must move are each sequence's K and V once; achieved bandwidth = those bytes / time,
  reported as a fraction of the copy bandwidth. Rows for the automatic split choice and for forced
  ones show what split-K buys.
- Prefill: whole prompts with causal attention; FLOPs = 4 * heads * head_dim * (visible query-key
  pairs), reported in TFLOP/s.

Times are medians of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), so the Python cost of
launching (which dominates a single small decode call) is not counted: inside the engine these
kernels run in a captured graph too. The replays do not flush the L2 cache, and a small decode
batch's K/V fits in it (1 x 4,096 tokens is 16 MB; an H100's L2 is 50 MB), whereas in the engine a
step reads every layer's cache from device memory. So decode rows rotate over enough copies of the
cache (each with its own random block order) to pass `ROTATE_BYTES`: consecutive calls in the graph
never find their K/V in L2. Prints one JSON line per row.

    python -m benchmarks.kernels
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from m3_paged.ops import paged_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
DTYPE = torch.bfloat16
ROTATE_BYTES = 512 * 2**20  # decode rows cycle through this much K/V: ten times an H100's L2


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s)."""
    src = torch.randn(2**30, dtype=DTYPE, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_gbs = 2 * src.numel() * 2 / ms / 1e6
    a, b = (torch.randn(8192, 8192, dtype=DTYPE, device="cuda") for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    tflops = 2 * 8192**3 / ms / 1e9
    emit({"kernel": "ceilings", "copy_GBps": round(copy_gbs), "matmul_TFLOPs": round(tflops)})
    return copy_gbs, tflops


def paged_batch(q_lens: list[int], seq_lens: list[int], block_size: int, seed: int = 0):
    """q and a cache whose blocks are handed out in a random order (as after a long run)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, dtype=DTYPE, device="cuda", generator=g)
    v_cache = torch.randn(cache_shape, dtype=DTYPE, device="cuda", generator=g)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[start : start + n]
        start += n
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=g)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, cu, seq_lens_t, tables


def bench_decode(
    seq_lens: list[int],
    block_size: int,
    copy_gbs: float,
    splits: list[int | None],
    tile_ns=(None,),
    launch=((None, None),),
) -> None:
    """One decode row per sequence over seq_lens[i] cached tokens; every (splits, tile_n, (num_warps,
    num_stages)) combination."""
    bs, ctx = len(seq_lens), max(seq_lens)
    kv_bytes = 2 * sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    copies = max(1, -(-ROTATE_BYTES // kv_bytes))  # so that no call finds its K/V in L2
    batches = [paged_batch([1] * bs, seq_lens, block_size, seed=i) for i in range(copies)]
    out = torch.empty_like(batches[0][0])
    ragged = len(set(seq_lens)) > 1
    for num_splits, tile_n, (warps, stages) in itertools.product(splits, tile_ns, launch):
        options = dict(num_splits=num_splits, tile_n=tile_n, num_warps=warps, num_stages=stages)
        calls = itertools.cycle(batches)  # each call in the captured graph takes the next copy

        def attend(options=options, calls=calls):
            q, k_cache, v_cache, cu, seq_lens_t, tables = next(calls)
            paged_attention(
                q, k_cache, v_cache, cu, seq_lens_t, tables, HEAD_DIM**-0.5,
                out=out, max_seqlen_k=ctx, **options,
            )  # fmt: skip

        ms = triton.testing.do_bench_cudagraph(attend, return_mode="median")
        gbs = kv_bytes / ms / 1e6
        emit({
            "kernel": "decode", "batch": bs,
            "context": f"{min(seq_lens)}-{ctx} (mean {sum(seq_lens) // bs})" if ragged else ctx,
            "block_size": block_size, "num_splits": num_splits or "auto", "tile_n": tile_n or "auto",
            "num_warps": warps or "default", "num_stages": stages or "default", "cache_copies": copies,
            "us": round(ms * 1e3, 1), "GBps": round(gbs), "of_copy": round(gbs / copy_gbs, 3),
        })  # fmt: skip


def ragged_lens(bs: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Context lengths drawn uniformly from [lo, hi]: the mix a throughput run decodes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (bs,), generator=g).tolist()


def bench_prefill(num_seqs: int, length: int, block_size: int, tflops_peak: float) -> None:
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(
        [length] * num_seqs, [length] * num_seqs, block_size
    )
    ms = triton.testing.do_bench_cudagraph(
        lambda: paged_attention(
            q, k_cache, v_cache, cu, seq_lens, tables, HEAD_DIM**-0.5, max_seqlen_k=length
        ),
        return_mode="median",
    )
    pairs = num_seqs * length * (length + 1) // 2  # causal (query, key) pairs
    tflops = 4 * NUM_HEADS * HEAD_DIM * pairs / ms / 1e9
    emit({
        "kernel": "prefill", "seqs": num_seqs, "length": length, "block_size": block_size,
        "us": round(ms * 1e3, 1), "TFLOPs": round(tflops, 1), "of_matmul": round(tflops / tflops_peak, 3),
    })  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="fewer rows")
    p.add_argument("--sweep", action="store_true", help="decode only: split counts x key-tile sizes")
    p.add_argument("--launch-sweep", action="store_true", help="decode only: num_warps x num_stages")
    args = p.parse_args(argv)
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__})
    copy_gbs, tflops = ceilings()
    cases = [(1, 4096), (1, 16384), (8, 4096), (16, 8192), (64, 4096), (256, 4096), (64, 16384), (256, 512)]
    sweep = [None, 1, 2, 4, 8, 16]
    if args.launch_sweep:  # Triton's launch options at the default splits and tiles
        launch = list(itertools.product([2, 4, 8], [2, 3, 4, 5]))
        for lens in ([4096], [16384], ragged_lens(64, 200, 2048), ragged_lens(160, 200, 2048)):
            bench_decode(lens, args.block_size, copy_gbs, [None], (None,), launch)
        return
    if args.sweep:  # split counts and key-tile sizes for batch 1 and for the throughput run's mix
        for lens in ([4096], [16384], ragged_lens(64, 200, 2048), ragged_lens(160, 200, 2048)):
            bench_decode(lens, args.block_size, copy_gbs, [None, 1, 2, 4, 8, 16, 32, 64], (32, 64, 128))
        return
    for bs, ctx in cases[:4] if args.quick else cases:
        bench_decode([ctx] * bs, args.block_size, copy_gbs, [None] if args.quick else sweep)
    for lens in (ragged_lens(64, 200, 2048), ragged_lens(160, 200, 2048)):
        bench_decode(lens, args.block_size, copy_gbs, [None] if args.quick else sweep)
    for num_seqs, length in [(1, 2048), (4, 2048), (1, 8192)]:
        bench_prefill(num_seqs, length, args.block_size, tflops)


if __name__ == "__main__":
    main()
