"""A physical KV-cache block, and the chained content hash that names it for prefix caching.

Every layer's K and V cache is cut into `num_blocks` blocks of `block_size` token slots; block `b`
owns slots `b * block_size ... (b + 1) * block_size - 1` in every layer. A sequence's
`block_table[i]` is the block holding its token positions `i * block_size ... (i + 1) * block_size - 1`,
so position `p` lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Prefix caching names a block that is *full and computed* by a hash of its tokens **and of every
token before them**, because the K/V of a token depends on the whole prefix, not only on the
block's own tokens. Hashing the whole prefix at every block would cost O(len^2); chaining costs
O(len) and is equivalent:

    h_0 = xxh64(NO_PARENT_HASH || tokens_0),   h_i = xxh64(h_{i-1} || tokens_i)

so two blocks get the same hash exactly when (up to a 64-bit collision) their whole prefixes are
equal. The block manager still compares the block's own token ids on every hit, so a collision
can never hand out the wrong tokens for that block.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import numpy as np
import xxhash

NO_PARENT_HASH = -1  # the "parent hash" of a sequence's first block: a fixed sentinel
_U64 = (1 << 64) - 1

# (token_ids of one block, parent block's hash) -> this block's hash; injectable for tests.
HashFn = Callable[[Seq[int], int], int]


def compute_block_hash(token_ids: Seq[int], parent_hash: int = NO_PARENT_HASH) -> int:
    """xxh64 over the parent's hash (8 little-endian bytes; the sentinel -1 becomes 2^64 - 1) followed
    by the block's token ids as int64 bytes. Returns an unsigned 64-bit int, never -1."""
    h = xxhash.xxh64()
    h.update((parent_hash & _U64).to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    """Bookkeeping for one physical block; the K/V tensors themselves live in the model runner.

    - `ref_count`: how many block-table entries of live sequences point here (forks and prefix hits
      share a block). 0 means the block sits in the block manager's free queue.
    - `hash` / `token_ids`: set once the block is full and computed (`BlockManager.cache_full_blocks`);
      `token_ids` are the block's own `block_size` tokens, kept to confirm a hash hit. `hash is None`
      means the block is not (or no longer) a prefix-cache entry; its `token_ids` are then `()`.
      A free block keeps its hash until it is evicted, so it can be revived by a later hit.
    """

    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()

    def set_hash(self, block_hash: int, token_ids: Seq[int]) -> None:
        self.hash = block_hash
        self.token_ids = tuple(token_ids)

    def reset_hash(self) -> None:
        self.hash = None
        self.token_ids = ()

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref_count={self.ref_count}, hash={self.hash}, tokens={self.token_ids})"
