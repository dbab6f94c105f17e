"""The block manager: which physical KV-cache blocks each sequence uses, with prefix caching.

It owns only bookkeeping (block ids, reference counts, hashes); the K/V tensors live in the model
runner, which reads `seq.block_table` to build slot mappings and performs the copy-on-write copies
that `may_append` returns.

Contract with the scheduler (one sequence's life; `bm` is the BlockManager):

1. WAITING -> RUNNING: `if bm.can_allocate(seq): bm.allocate(seq)` (`bm.try_allocate(seq)` does
   both in one call, with one prefix-cache lookup: False when the pool is short). The sequence must
   have an empty block table. Afterwards `seq.block_table` covers *every* current token (prompt,
   plus outputs after a preemption): `len(seq.block_table) == ceil(seq.get_len() / block_size)`; the leading
   `seq.num_cached_tokens` tokens are prefix-cache hits whose K/V is already in the cache, and
   `seq.data.num_computed_tokens == seq.num_cached_tokens`. The model runner computes the tokens
   from `num_computed_tokens` on, in one step or in several chunks (chunked prefill needs no
   further block-manager call until the sequence decodes).
2. After every model step: add the tokens computed to `seq.data.num_computed_tokens`, then call
   `bm.cache_full_blocks(seq, seq.data.num_computed_tokens)`. Only blocks that are full *and*
   computed get a hash, so no other sequence can hit a block whose K/V is not written yet.
3. Before a step that feeds new tokens to a running sequence (decode: the sampled token was just
   appended with `seq.append_token_id`): `if bm.can_append(seq): copies = bm.may_append(seq)`, else
   preempt someone and retry (`copies = bm.allocate_slots(seq)` does both in one call: None when
   the pool is short). Call it before *every* step that computes tokens of a running
   sequence (a no-op for prefill chunks). Afterwards the table covers every token again, and every
   block that the step writes (from position `num_computed_tokens` on) is private to `seq`
   (ref_count 1, no hash). `copies` lists `(src_block_id, dst_block_id)` pairs (copy-on-write of
   a shared or cached block); the model runner must copy block `src` to `dst` in every layer's K
   and V cache before the step writes. It is empty except after a fork or a rewind of
   `num_computed_tokens`.
4. Finished or preempted (recompute): `bm.deallocate(seq)`. It clears the block table and resets
   `seq.num_cached_tokens` and `seq.data.num_computed_tokens` to 0; a preempted sequence goes back
   to step 1, where its cached-token count is looked up afresh.
5. Forks (n > 1, best_of, beam search): `child = seq.fork(new_id); bm.fork(seq, child)`; the child
   shares every block by reference count. Both then go through step 3 before they write. The
   scheduler may set the child's `num_computed_tokens` lower than the parent's (to recompute the
   last prompt token); step 3 then copies the blocks it would write.

Prefix-caching rules: a lookup walks the full blocks from the start and stops at the first miss
(a block's K/V depends on all blocks before it); a hash hit counts only if the cached block's
token ids equal this block's. A sequence's block hashes are computed once (`block_hashes`, kept in
`seq.block_hashes`) and reused by every later lookup and by `cache_full_blocks`; the lookup itself,
and so `num_cached_tokens`, is redone at every allocation (after a preemption the cache has
changed). At most `(len - 1) // block_size` blocks are looked up, so at least
the last token is always recomputed (its logits are needed) and `num_cached_tokens` is a
multiple of `block_size`, strictly below `len`: a fully cached prompt recomputes its whole last
block into a fresh block rather than writing into a cached, possibly shared one (vLLM v1 does the
same). Tokens that were hits are never written again.

Free queue and eviction: `free_block_ids` is an ordered dict whose front is allocated first.
Blocks freed without a hash go to the front (they cache nothing, so they are reused first); blocks
freed with a hash go to the end, so among cached blocks the least recently freed is evicted first
(LRU), and `deallocate` frees a table in reverse so that a sequence's tail is evicted before its
head. Taking a cached block from the queue evicts it: its `hash_to_block_id` entry is removed.
A hit on a free cached block revives it (ref_count 0 -> 1) and keeps its hash.

Duplicates: two sequences may compute the same content in different blocks (neither was hashed
when the other allocated). The first block hashed owns the `hash_to_block_id` entry; the other
keeps its hash while in use (its successors' hashes chain from it). When it is freed it takes
the entry over if the entry has gone, else it drops its hash. So a free block has a hash exactly
when `hash_to_block_id` maps that hash to it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m3_paged.block import NO_PARENT_HASH, Block, HashFn, compute_block_hash, hash_blocks

if TYPE_CHECKING:
    from m0_config.sequence import Sequence


@dataclass
class PrefixCacheStats:
    """Counted by `allocate` (not by `can_allocate`), only while prefix caching is on.
    `queries`: tokens of the sequences allocated; `hits`: those found in the cache."""

    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    """A pool of `num_blocks` KV-cache blocks of `block_size` tokens; see the module docstring for
    the call contract. Besides `seq.block_table` it writes two more fields of the sequences it
    allocates and frees: `seq.num_cached_tokens` and `seq.data.num_computed_tokens`.

    Public state, read-only for everyone else: `blocks[block_id]` (a `Block`), `hash_to_block_id`
    (prefix-cache index: hash -> block id) and `free_block_ids` (the free queue, front first).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: HashFn = compute_block_hash,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Front = allocated next. Values are unused: the ordered dict is a queue with O(1) removal
        # from the middle, which reviving a cached free block needs.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.stats = PrefixCacheStats()

    # ---- sizes -------------------------------------------------------------------------------
    def num_required_blocks(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size). A sequence with
        `num_required_blocks(seq.get_len()) > num_blocks` can never be allocated."""
        return -(-num_tokens // self.block_size)

    def get_num_free_blocks(self) -> int:
        """Blocks with ref_count 0, cached ones included (they can be evicted at any time)."""
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref_count > 0)."""
        return 1.0 - self.get_num_free_blocks() / self.num_blocks

    # ---- allocation --------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `allocate(seq)` would succeed now. Hits on blocks in use cost nothing; hits on
        free cached blocks and misses each take one free block."""
        return self._fits(seq, self._find_cached_blocks(seq))

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence with an empty block table blocks for all its tokens (prefix hits first,
        then fresh blocks), and set `seq.num_cached_tokens = seq.data.num_computed_tokens` to the
        tokens hit. Raises RuntimeError, changing nothing, when `can_allocate` is False."""
        if not self.try_allocate(seq):
            raise RuntimeError(f"not enough free blocks to allocate seq {seq.seq_id}")

    def try_allocate(self, seq: Sequence) -> bool:
        """`allocate(seq)` and True when `can_allocate(seq)`, else False, changing nothing. The
        scheduler's form: it looks the prefix up once instead of twice."""
        if seq.block_table:
            raise ValueError(f"seq {seq.seq_id} already has blocks {seq.block_table}")
        if seq.get_len() == 0:
            raise ValueError(f"seq {seq.seq_id} has no tokens")
        hits = self._find_cached_blocks(seq)
        if not self._fits(seq, hits):
            return False
        for block_id in hits:  # revive before taking fresh blocks, so that no hit is evicted
            self._ref(block_id)
        num_new = self.num_required_blocks(seq.get_len()) - len(hits)
        seq.block_table = hits + [self._allocate_free_block() for _ in range(num_new)]
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.data.num_computed_tokens = seq.num_cached_tokens
        if self.enable_prefix_caching:
            self.stats.requests += 1
            self.stats.queries += seq.get_len()
            self.stats.hits += seq.num_cached_tokens
        return True

    def _fits(self, seq: Sequence, hits: list[int]) -> bool:
        num_revived = len({b for b in hits if self.blocks[b].ref_count == 0})
        num_new = self.num_required_blocks(seq.get_len()) - len(hits)
        return num_new + num_revived <= self.get_num_free_blocks()

    def deallocate(self, seq: Sequence) -> None:
        """Drop the sequence's references, last block first (freed blocks join the queue in that
        order, so the tail is evicted before the head); clear its table and reset
        `seq.num_cached_tokens` and `seq.data.num_computed_tokens` to 0."""
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table.clear()
        seq.num_cached_tokens = 0
        seq.data.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make `child` share all of `parent`'s blocks (ref_count + 1 each); call once per child,
        after `parent.fork()`. Copy-on-write happens later, in `may_append`."""
        child.block_table = list(parent.block_table)
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1
        child.num_cached_tokens = parent.num_cached_tokens

    # ---- appending (decode) --------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Whether `may_append(seq)` would succeed now."""
        num_cow, num_new = self._append_needs(seq)
        return num_cow + num_new <= len(self.free_block_ids)

    def may_append(self, seq: Sequence) -> list[tuple[int, int]]:
        """Prepare the blocks the next step writes: tokens `seq.data.num_computed_tokens ... len - 1`.
        Grows the table to `ceil(len / block_size)` blocks (a new block when the last token starts
        one, i.e. `(len - 1) % block_size == 0`; every token when block_size is 1), and replaces
        every block in the written range that is shared (ref_count > 1) or cached (has a hash) by
        a private copy, so that a step never writes K/V another sequence or the prefix cache
        relies on. Returns the `(src_block_id, dst_block_id)` copies the model runner must make
        before the step (only for blocks that hold computed tokens). Raises RuntimeError when
        `can_append` is False.

        Copies arise after `fork` (the partial last block both sequences append to) and when the
        scheduler rewinds `num_computed_tokens` into a cached block (e.g. a fork that recomputes
        its last prompt token); a plain decode step returns []."""
        copies = self.allocate_slots(seq)
        if copies is None:
            raise RuntimeError(f"not enough free blocks to append to seq {seq.seq_id}")
        return copies

    def allocate_slots(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """`may_append(seq)` when `can_append(seq)`, else None, changing nothing (vLLM v1's
        `allocate_slots` answers a short pool the same way). The scheduler's form: it runs for
        every scheduled sequence in every step, and checks the pool once instead of twice."""
        num_cow, num_new = self._append_needs(seq)
        if num_cow + num_new > len(self.free_block_ids):
            return None
        copies = []
        if num_cow:  # rare (after a fork or a rewind): most steps write only private blocks
            for i in self._written_block_indices(seq):
                if not self._is_writable(seq, i):
                    src = seq.block_table[i]
                    seq.block_table[i] = dst = self._allocate_free_block()  # before freeing src: dst != src
                    self._unref(src)  # a cached src that drops to 0 stays in the cache, as a free block
                    if i * self.block_size < seq.data.num_computed_tokens:
                        copies.append((src, dst))
        for _ in range(num_new):
            seq.block_table.append(self._allocate_free_block())
        return copies

    def _append_needs(self, seq: Sequence) -> tuple[int, int]:
        """(blocks of the written range that need a private copy, blocks to add): what
        `allocate_slots` will take from the pool. `_written_block_indices` and `_is_writable`
        inlined, as this runs for every scheduled sequence in every step (a decode step looks at
        one block, or none)."""
        table, size = seq.block_table, self.block_size
        num_cow = 0
        for block_id in table[seq.data.num_computed_tokens // size :]:
            block = self.blocks[block_id]
            if block.ref_count != 1 or block.hash is not None:
                num_cow += 1
        return num_cow, -(-seq.get_len() // size) - len(table)

    # ---- prefix caching ------------------------------------------------------------------------
    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Hash every block of `seq` that is full and lies below `num_computed_tokens` (block i
        with (i + 1) * block_size <= num_computed_tokens) and has no hash yet, and register it in
        `hash_to_block_id` unless that hash is taken. A block whose tokens were scheduled but not
        yet computed is never hashed, so it can never be a hit for another sequence; nor is one
        holding a placeholder token (m4), whose id is not known yet. A no-op when prefix caching is
        off."""
        if not self.enable_prefix_caching:
            return
        if not 0 <= num_computed_tokens <= seq.data.get_num_known_tokens():
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} outside [0, {seq.data.get_num_known_tokens()}] "
                "(the tokens whose ids are known)"
            )
        table, size = seq.block_table, self.block_size
        num_full = num_computed_tokens // size
        # Hashed blocks are a prefix of the table. Most steps (decode inside a block) end here:
        # the last full block, and so every block before it, is hashed already.
        if num_full == 0 or self.blocks[table[num_full - 1]].hash is not None:
            return
        # Walk back to the first unhashed block.
        first = num_full
        while first > 0 and self.blocks[table[first - 1]].hash is None:
            first -= 1
        hashes, token_ids = self.block_hashes(seq, num_full), seq.get_token_ids()
        for i in range(first, num_full):
            self.blocks[table[i]].set_hash(hashes[i], token_ids[i * size : (i + 1) * size])
            self.hash_to_block_id.setdefault(hashes[i], table[i])

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """`seq.block_hashes`, extended to at least its first `num_blocks` blocks' chained hashes
        (those blocks must be full of known tokens). Each block of a sequence is hashed once: its
        tokens never change once known (they are only appended), so the hashes stay valid through
        later lookups, `cache_full_blocks` and preemption. The list belongs to this block manager's
        `block_size` and `hash_fn` (one block manager allocates a sequence)."""
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            size, done = self.block_size, len(hashes)
            parent_hash = hashes[-1] if done else NO_PARENT_HASH
            new_token_ids = seq.get_token_ids()[done * size : num_blocks * size]
            hashes.extend(hash_blocks(new_token_ids, size, parent_hash, self.hash_fn))
        return hashes

    def _find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Block ids holding the sequence's leading blocks: walk at most (len - 1) // block_size
        full blocks (and only blocks of known tokens: no cached block holds a placeholder), stop at
        the first miss. Pure, but for filling `seq.block_hashes`."""
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        num_blocks = min(seq.get_len() - 1, seq.data.get_num_known_tokens()) // size
        hashes, token_ids = self.block_hashes(seq, num_blocks), seq.get_token_ids()
        hits: list[int] = []
        for i in range(num_blocks):
            block_id = self.hash_to_block_id.get(hashes[i])
            block_token_ids = tuple(token_ids[i * size : (i + 1) * size])
            if block_id is None or self.blocks[block_id].token_ids != block_token_ids:
                break  # a miss, or a hash collision caught by the token comparison
            hits.append(block_id)
        return hits

    # ---- the free queue ------------------------------------------------------------------------
    def _allocate_free_block(self) -> int:
        """Take the front of the free queue with ref_count 1, evicting its cache entry if any."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.reset_hash()
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        """Share a block in use, or revive a free cached one (out of the queue, hash kept)."""
        if self.blocks[block_id].ref_count == 0:
            del self.free_block_ids[block_id]
        self.blocks[block_id].ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is not None and self.hash_to_block_id.setdefault(block.hash, block_id) != block_id:
            block.reset_hash()  # a duplicate of a block that owns the cache entry: caches nothing
        self.free_block_ids[block_id] = None  # the end: evicted last
        if block.hash is None:
            self.free_block_ids.move_to_end(block_id, last=False)  # the front: reused first

    # ---- helpers -------------------------------------------------------------------------------
    def _written_block_indices(self, seq: Sequence) -> range:
        """Indices of existing table entries the next step writes into (from num_computed_tokens)."""
        return range(seq.data.num_computed_tokens // self.block_size, len(seq.block_table))

    def _is_writable(self, seq: Sequence, index: int) -> bool:
        block = self.blocks[seq.block_table[index]]
        return block.ref_count == 1 and block.hash is None
