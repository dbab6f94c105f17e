"""Paged attention in Triton for batches that mix prefill chunks and decode rows, with split-K.

What it computes: exactly `paged_attention_ref` (paged_attention_ref.py, which also documents the
batch layout). Per sequence s and query token i (absolute position p = seq_lens[s] - q_len + i):

    out[i, h] = sum_{j <= p} softmax_j(scale * q[i, h] . k[j, h // group]) * v[j, h // group]

where k[j] / v[j] live in cache block block_tables[s, j // block_size] at offset j % block_size.

How the work is cut (one program = one query tile x one kv head x one KV split):

* Query tile. BLOCK_Q consecutive query tokens of one sequence, times the `group` q heads that share a
  kv head (GQA), flattened into BLOCK_M = BLOCK_Q * group rows (row r: token r // group, head
  r % group). Each K/V tile is therefore loaded once for the whole group, and a decode row (1 token)
  still fills a tile with its group of heads.
* Finding the sequence without a host sync. Sequence s's tiles are numbered from
  cu_seqlens_q[s] // BLOCK_Q + s upwards; these start numbers increase with s, so a program finds
  its sequence by binary search, and num_tokens // BLOCK_Q + num_seqs programs cover every tile of
  every sequence (some exit at once). No max_seqlen_q is needed.
* KV loop. Key positions are walked in tiles of TILE_N; each position looks up its own block in the
  block table, so TILE_N and block_size are independent (any block size works). Keys past the tile's
  last query position are not visited; masked lanes load nothing, so positions >= seq_len and the
  block table's padding are never read. Online softmax in base 2 (exp2, scale folded with log2(e)).
* Any head_dim and GQA group: tiles are rounded up to powers of two (tl.arange needs them; tl.dot
  needs >= 16) and the extra lanes are masked, so head_dim 24 or a group of 3 work too.
* Split-K (flash-decoding). A decode row attends to its whole context from one program; with few
  sequences and long contexts most of the GPU idles. With NUM_SPLITS > 1 each program takes a
  contiguous share of its KV tiles and writes a normalised partial output plus its log-sum-exp;
  `_merge_splits_kernel` then combines: out = sum_s w_s o_s with w_s = 2^(lse_s - lse_max) / sum(...).
  The kernel is general (any batch can be split); the wrapper turns it on automatically only for
  decode-only batches with long contexts (`choose_num_splits`), and `num_splits` forces it.
* Programmatic dependent launch (PDL, Hopper GPUs: `pdl.py::use_pdl`). Both kernels are launched with `launch_pdl=True`:
  a program may start before the previous kernel has finished, as soon as every program of that
  kernel has called `gdc_launch_dependents` (m4's RoPE + cache-write kernel does so first thing).
  The attention kernel reads the step's metadata (launch order, query ranges, sequence lengths: all
  written by the host before the step) and only then waits (`gdc_wait`) for the previous kernel's
  q and newest keys and values; the merge waits first thing. So the launch latency and the first
  dependent loads overlap the previous kernel. Every program waits, even one with no work, so a
  kernel's completion still implies its predecessor's. The attention kernel itself does not let its
  successor in early: measured on an H100, that made decode steps of 16 sequences 6% slower, while
  without it every batch size got faster (1 sequence -13%, 256 -0.6%).
* Launch order (decode-only batches). The GPU starts programs roughly in launch order, so whatever is
  launched last decides how long the last wave keeps a few SMs busy while the rest idle. Given
  `seq_order` (longest context first, built by the host: `m3_paged/attention/metadata.py`), program i
  takes sequence seq_order[i], so the last wave holds the shortest work, as in longest-processing-
  time-first scheduling. The result does not depend on the order; only the tail does.

The file reads top-down: the reference (imported), the split heuristic, the kernels, the wrapper.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .paged_attention_ref import paged_attention_ref
from .pdl import use_pdl

__all__ = ["choose_num_splits", "paged_attention", "paged_attention_ref"]

SPLIT_MIN_TOKENS = 256  # each split reads at least this many keys: shorter contexts are not split
MAX_SPLITS = 32  # the merge pass reads num_splits partial rows per output row


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_seqlen_k: int, decode_only: bool, num_sms: int
) -> int:
    """How many KV splits a batch gets when the caller does not force it (1 = no split-K).

    Split only decode-only batches (a prefill tile already has plenty of work), only contexts of at
    least 2 * SPLIT_MIN_TOKENS keys, and only as far as needed to give about two programs per SM.
    A batch of up to four waves of (sequence, kv head) programs still gets two splits: with ragged
    contexts its last wave is a long tail (measured on an H100 with 59 sequences of the throughput
    workload: 80% -> 87% of copy bandwidth).
    """
    if not decode_only:
        return 1
    by_length = max_seqlen_k // SPLIT_MIN_TOKENS
    programs = num_seqs * num_kv_heads
    by_occupancy = max(-(-2 * num_sms // programs), 2 if programs <= 4 * num_sms else 1)
    return max(1, min(MAX_SPLITS, by_length, by_occupancy))


@triton.jit
def _find_seq(cu_seqlens_q_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first tile number cu_seqlens_q[s] // BLOCK_Q + s is <= tile_idx."""
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Triton compiles a variant per "== 1 / divisible by 16 / other" value of every int argument; the
# batch-dependent ones would compile new variants in the middle of a run (seconds each, the first time).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt_s"])
def _paged_attention_kernel(
    out_ptr,
    o_partial_ptr,  # (num_tokens, num_heads, NUM_SPLITS, HEAD_DIM) float32, used when NUM_SPLITS > 1
    lse_partial_ptr,  # (num_tokens, num_heads, NUM_SPLITS) float32, used when NUM_SPLITS > 1
    seq_order_ptr,  # (num_seqs,) int32 launch order of a decode-only batch, used when HAS_SEQ_ORDER
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    scale_log2,  # softmax scale * log2(e): scores are kept in base-2 units
    num_seqs,
    block_size,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_cache_b,  # k_cache and v_cache share one layout (checked by the wrapper)
    stride_cache_o,
    stride_cache_h,
    stride_bt_s,
    GROUP: tl.constexpr,  # q heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (>= 16 for tl.dot)
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # BLOCK_M // GROUP query tokens per tile
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_SEQ_ORDER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (see the module docstring)
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    # Which sequence, and which of its query tiles, this program owns.
    if HAS_SEQ_ORDER:  # decode-only: one tile per sequence, taken in the host's order
        seq = tl.load(seq_order_ptr + tile_idx)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_tile = 0
    else:
        seq = _find_seq(cu_seqlens_q_ptr, tile_idx, num_seqs, BLOCK_Q)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_tile = tile_idx - (q_start // BLOCK_Q + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    if USE_PDL:
        # Everything above is step metadata the host wrote before the step; q and the newest keys
        # and values are the previous kernel's output, so wait for it here (every program does, so
        # this kernel's completion still implies the previous one's).
        gdc_wait()
    if q_tile * BLOCK_Q >= q_len:  # the grid over-counts by up to one tile per sequence
        return
    prefix_len = seq_len - q_len  # tokens cached before this step's queries

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP  # (BLOCK_M,) query index within the sequence
    heads = kv_head * GROUP + rows % GROUP  # (BLOCK_M,) q head of each row
    row_mask = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = prefix_len + q_idx  # absolute position of each row's query token
    tokens = q_start + q_idx  # row of q / out
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q_offsets = tokens[:, None] * stride_q_t + heads[:, None] * stride_q_h + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    # Keys this tile can see end at its last query's position (causal); this split takes a share.
    kv_len = prefix_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max score
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    block_table = block_tables_ptr + seq * stride_bt_s
    for t in range(tile_start, tile_end):
        k_pos = t * TILE_N + tl.arange(0, TILE_N)  # (TILE_N,) absolute key positions
        k_mask = k_pos < kv_len
        # Masked lanes load nothing: padding entries of the block table are never dereferenced.
        block_ids = tl.load(block_table + k_pos // block_size, mask=k_mask, other=0).to(tl.int64)
        kv_offsets = (
            block_ids * stride_cache_b + (k_pos % block_size) * stride_cache_o + kv_head * stride_cache_h
        )
        kv_ptrs = kv_offsets[:, None] + dims[None, :]  # (TILE_N, BLOCK_D)
        kv_mask = k_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, TILE_N)
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # l = 0 only for a split that saw no key of this row
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        o_offsets = tokens[:, None] * stride_o_t + heads[:, None] * stride_o_h + dims[None, :]
        tl.store(out_ptr + o_offsets, o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part = (tokens * num_heads + heads) * NUM_SPLITS + split  # (BLOCK_M,) row of the partials
        tl.store(o_partial_ptr + part[:, None] * HEAD_DIM + dims[None, :], o, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))  # base-2 log-sum-exp
        tl.store(lse_partial_ptr + part, lse, mask=row_mask)


@triton.jit(do_not_specialize=["num_seqs"])
def _merge_splits_kernel(
    out_ptr,
    o_partial_ptr,
    lse_partial_ptr,
    cu_seqlens_q_ptr,
    num_seqs,
    stride_o_t,
    stride_o_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()  # the partials are the attention kernel's output
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(cu_seqlens_q_ptr + num_seqs):  # padding rows have no partials
        return
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    part = (token * tl.num_programs(1) + head) * NUM_SPLITS + splits  # (BLOCK_S,)
    lse = tl.load(lse_partial_ptr + part, mask=splits < NUM_SPLITS, other=float("-inf"))
    # Split s's share of the softmax denominator; at least one split saw a key, so lse_max is finite.
    weights = tl.exp2(lse - tl.max(lse, axis=0))
    weights = weights / tl.sum(weights, axis=0)
    o_mask = (splits < NUM_SPLITS)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(o_partial_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=o_mask, other=0.0)
    merged = tl.sum(o * weights[:, None], axis=0)  # (BLOCK_D,)
    out_offsets = token * stride_o_t + head * stride_o_h + dims
    tl.store(out_ptr + out_offsets, merged.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the CPU interpreter runs programs one after another: splitting buys nothing


def _big_smem(device: torch.device) -> bool:
    """Room for 128-key tiles in the software pipeline (H100/A100 class, not consumer GPUs)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) >= 160 * 1024


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seqlen_k: int | None = None,
    seq_order: torch.Tensor | None = None,
    block_m: int | None = None,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton version of `paged_attention_ref`; same arguments, same result, same padding contract.

    Every sequence must bring at least one query token (cu_seqlens_q strictly increasing) for the
    automatic split choice; the kernel itself tolerates empty ones.
    num_splits: None = automatic (`choose_num_splits`), 1 = off, n > 1 = forced (any batch).
    max_seqlen_k: max(seq_lens), used only by the automatic choice on decode-only batches; pass it
        to avoid a device-to-host sync (CUDA graphs should pass num_splits instead).
    seq_order: decode-only batches: (num_seqs,) int32, a permutation of 0..num_seqs-1 giving the order
        in which the sequences' programs are launched (longest context first shortens the tail).
        None: batch order. The output is the same for every order.
    block_m, tile_n: tile sizes (powers of two, >= 16; block_m >= group); None picks defaults.
    num_warps, num_stages: Triton launch options for the attention kernel (None: Triton's defaults,
        except 2 stages for prefill batches and for unsplit decode batches with 128-key tiles).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0, (q.shape, k_cache.shape)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    assert q.stride(-1) == k_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert cu_seqlens_q.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert block_tables.stride(1) == 1, "a block-table row must be contiguous (rows may be strided)"
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_tokens == 0 or num_seqs == 0:
        return out

    decode_only = num_tokens == num_seqs  # one query per sequence
    if seq_order is not None:
        assert decode_only, "seq_order is for decode-only batches (one query token per sequence)"
        assert seq_order.shape == (num_seqs,) and seq_order.dtype == torch.int32, seq_order
    if num_splits is None:
        if decode_only and max_seqlen_k is None:
            max_seqlen_k = int(seq_lens.max())
        num_splits = choose_num_splits(
            num_seqs, num_kv_heads, max_seqlen_k or 0, decode_only, _num_sms(q.device)
        )
    on_gpu = q.device.type == "cuda"
    pdl = use_pdl(q.device)
    # Prefill tiles amortise each K/V load over many queries; decode tiles only need the group.
    block_m = block_m or max(16, triton.next_power_of_2(group), 64 if on_gpu and not decode_only else 16)
    # Decode streams K/V with almost no compute: bigger key tiles keep more loads in flight (measured
    # on an H100: batch 1 x 4k context 46% -> 56% of copy bandwidth, a ragged batch of 160 87% -> 91%).
    # Prefill tiles are compute-bound: 32-key tiles in two stages beat 64 in three (H100: the
    # throughput workload's prefill step -11%, 1 x 2,048 -10%, a prefix-cached request's 32 new
    # tokens -8%, a 512-token mixed step -1%).
    if not decode_only or not on_gpu or head_dim > 128:
        tile_n = tile_n or 32
    else:
        tile_n = tile_n or (128 if _big_smem(q.device) else 64)
    if num_stages is None and on_gpu and (not decode_only or (tile_n == 128 and num_splits == 1)):
        # Two buffers of K/V tiles, not Triton's three. Decode: measured on an H100 on the throughput
        # workload's batches of 101-256 sequences, 94.5% -> 95.9% of copy bandwidth (128-key tiles).
        num_stages = 2
    assert block_m >= max(16, group) and tile_n >= 16, (block_m, tile_n, group)
    assert block_m & (block_m - 1) == 0 and tile_n & (tile_n - 1) == 0, "tile sizes must be powers of two"
    block_q = block_m // group

    if num_splits > 1:
        o_partial = torch.empty(
            num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        lse_partial = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        o_partial = lse_partial = out  # unused by the NUM_SPLITS == 1 branch
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_tiles = num_seqs if seq_order is not None else num_tokens // block_q + num_seqs
    grid = (num_tiles, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        out,
        o_partial,
        lse_partial,
        seq_order if seq_order is not None else seq_lens,  # (a placeholder pointer when unused)
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        scale * math.log2(math.e),
        num_seqs,
        block_size,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n,
        NUM_SPLITS=num_splits,
        HAS_SEQ_ORDER=seq_order is not None,
        # float32 runs use true fp32 products (not TF32) so that they match the reference closely.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
        **{k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None},
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            o_partial,
            lse_partial,
            cu_seqlens_q,
            num_seqs,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            USE_PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out
