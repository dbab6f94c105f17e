"""Batch-size buckets for decode graphs, and how a batch is padded up to one.

A CUDA graph replays fixed shapes, so one graph is captured per bucket and a batch of `bs`
sequences replays the smallest bucket >= bs, with `bucket - bs` padding rows. Small batches get
their own buckets (1, 2, 4, 8), larger ones a step of 16, and `max_num_seqs` is always a bucket so
that every decode batch the scheduler can form has a graph.
"""

from __future__ import annotations

import bisect


def capture_sizes(max_num_seqs: int, step: int = 16) -> list[int]:
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes |= set(range(step, max_num_seqs + 1, step))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def pick_bucket(sizes: list[int], batch_size: int) -> int | None:
    """The smallest captured size that holds `batch_size` rows; None when none does."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None
