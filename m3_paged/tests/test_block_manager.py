"""Unit tests of the block manager: allocation, prefix caching, eviction, appends, forks."""

from __future__ import annotations

import pytest

from m0_config.sequence import Sequence
from m3_paged.block import NO_PARENT_HASH, compute_block_hash, hash_blocks
from m3_paged.block_manager import BlockManager

pytestmark = pytest.mark.m3


def make_seq(token_ids, seq_id=0) -> Sequence:
    return Sequence(seq_id, None, token_ids)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does after a step that computed every remaining token."""
    seq.data.num_computed_tokens = seq.get_len()
    bm.cache_full_blocks(seq, seq.get_len())


def refs(bm: BlockManager, block_ids) -> list[int]:
    return [bm.blocks[b].ref_count for b in block_ids]


def test_compute_block_hash_chains_parent():
    block = [5, 6, 7, 8]
    first = compute_block_hash(block)
    assert first == compute_block_hash(tuple(block), NO_PARENT_HASH)  # list or tuple, same bytes
    assert first != compute_block_hash(block, parent_hash=first)
    assert compute_block_hash(block, 1) != compute_block_hash(block, 2)
    assert compute_block_hash([1, 2]) != compute_block_hash([2, 1])
    assert 0 <= first < 2**64


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("num_blocks", [0, 1, 5])
@pytest.mark.parametrize("parent", [NO_PARENT_HASH, 12345])
def test_hash_blocks_equals_the_per_block_chain(block_size, num_blocks, parent):
    tokens = [(7 * i + 3) % 151_000 for i in range(block_size * num_blocks)]
    expected, h = [], parent
    for i in range(num_blocks):
        h = compute_block_hash(tokens[i * block_size : (i + 1) * block_size], h)
        expected.append(h)
    assert hash_blocks(tokens, block_size, parent) == expected
    assert hash_blocks(tuple(tokens), block_size, parent) == expected
    # an injected hash function is called once per block, chained the same way
    calls = []
    fake = hash_blocks(tokens, block_size, parent, lambda t, p: calls.append((list(t), p)) or len(calls))
    assert fake == list(range(1, num_blocks + 1))
    assert calls == [(tokens[i * block_size : (i + 1) * block_size], i or parent) for i in range(num_blocks)]
    with pytest.raises(ValueError, match="whole blocks"):
        hash_blocks([0] * (2 * block_size + 1), 2 * block_size)


def chained_hashes(token_ids, block_size) -> list[int]:
    """Every full block's chained hash, recomputed from scratch."""
    hashes, h = [], NO_PARENT_HASH
    for i in range(len(token_ids) // block_size):
        h = compute_block_hash(token_ids[i * block_size : (i + 1) * block_size], h)
        hashes.append(h)
    return hashes


def test_each_block_of_a_sequence_is_hashed_once():
    """Lookups (can_allocate, allocate, re-allocation after a preemption) and cache_full_blocks share
    the sequence's kept hashes, which stay equal to freshly computed ones as the sequence grows."""
    calls = []

    def counting_hash(token_ids, parent_hash):
        calls.append(tuple(token_ids))
        return compute_block_hash(token_ids, parent_hash)

    bm = BlockManager(num_blocks=16, block_size=4, hash_fn=counting_hash)
    seq = make_seq(range(14))
    assert bm.can_allocate(seq) and bm.try_allocate(seq)
    assert len(calls) == 3 and seq.block_hashes == chained_hashes(list(range(14)), 4)
    compute_all(bm, seq)
    for token in range(100, 106):  # decode: block 3 fills at the second token, block 4 at the sixth
        seq.append_token_id(token)
        bm.may_append(seq)
        compute_all(bm, seq)
    assert len(calls) == 5 == len(set(calls))
    bm.deallocate(seq)  # preempted: the hashes stay, the cached-token count is looked up again
    assert bm.try_allocate(seq) and seq.num_cached_tokens == 16
    assert len(calls) == 5 and seq.block_hashes == chained_hashes(seq.get_token_ids(), 4)
    assert [bm.blocks[b].hash for b in seq.block_table[:4]] == seq.block_hashes[:4]  # the hits
    child = seq.fork(1)  # a fork starts with its parent's hashes, in a list of its own
    assert child.block_hashes == seq.block_hashes and child.block_hashes is not seq.block_hashes


def test_placeholder_tokens_are_never_hashed():
    """m4's async placeholders (negative stand-in ids) are not tokens yet: the lookup stops before
    their block and cache_full_blocks refuses to hash them."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(9), 0)
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(range(7), 1)
    b.data.append_placeholder(-1)
    b.data.append_placeholder(-2)  # tokens 0..6, ?, ?: block 1 holds a placeholder
    assert bm.try_allocate(b) and b.num_cached_tokens == 4 and len(b.block_hashes) == 1
    with pytest.raises(ValueError, match="known"):
        bm.cache_full_blocks(b, 8)
    b.data.pop_placeholder()
    b.data.pop_placeholder()
    b.append_token_id(7)
    bm.cache_full_blocks(b, 8)
    assert b.block_hashes == chained_hashes(list(range(8)), 4)


def test_allocate_deallocate():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 == len(set(seq.block_table))
    assert refs(bm, seq.block_table) == [1, 1, 1]
    assert bm.get_num_free_blocks() == 7 and bm.usage == pytest.approx(0.3)
    assert seq.num_cached_tokens == 0 == seq.data.num_computed_tokens
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.get_num_free_blocks() == 10
    assert refs(bm, range(10)) == [0] * 10


def test_allocate_refuses_without_changing_anything():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(9))  # needs 3 blocks
    assert bm.num_required_blocks(9) == 3 and not bm.can_allocate(seq)
    with pytest.raises(RuntimeError):
        bm.allocate(seq)
    assert not bm.try_allocate(seq)
    assert seq.block_table == [] and bm.get_num_free_blocks() == 2


def test_prefix_hit_shares_blocks_across_sequences():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0)
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43, 44], 1)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert refs(bm, b.block_table) == [2, 2, 1]
    assert b.num_cached_tokens == 8 == b.data.num_computed_tokens
    assert bm.get_num_free_blocks() == 10 - 3 - 1
    assert (bm.stats.requests, bm.stats.queries, bm.stats.hits) == (2, 21, 8)
    assert bm.stats.hit_rate == pytest.approx(8 / 21)


def test_hash_chaining_same_block_after_different_prefix_is_not_a_hit():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], 0)
    c = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9], 1)
    bm.allocate(a)
    compute_all(bm, a)
    bm.allocate(c)
    assert c.num_cached_tokens == 0 and set(c.block_table).isdisjoint(a.block_table)
    compute_all(bm, c)
    a1, c1 = bm.blocks[a.block_table[1]], bm.blocks[c.block_table[1]]
    assert a1.token_ids == c1.token_ids == (5, 6, 7, 8)
    assert a1.hash != c1.hash  # the parent's hash is part of the block's
    assert a1.hash == compute_block_hash([5, 6, 7, 8], compute_block_hash([1, 2, 3, 4]))


def test_hash_collision_is_caught_by_token_ids():
    bm = BlockManager(num_blocks=10, block_size=4, hash_fn=lambda token_ids, parent_hash: 7)
    a = make_seq([1, 2, 3, 4, 5], 0)
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.hash_to_block_id == {7: a.block_table[0]}
    b = make_seq([9, 9, 9, 9, 5], 1)  # same (constant) hash, different tokens
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and b.block_table[0] != a.block_table[0]
    compute_all(bm, b)
    assert bm.hash_to_block_id == {7: a.block_table[0]}  # the first block hashed keeps the entry
    c = make_seq([1, 2, 3, 4, 6], 2)  # same tokens: a genuine hit
    bm.allocate(c)
    assert c.block_table[0] == a.block_table[0] and c.num_cached_tokens == 4


def test_no_hit_after_the_first_miss():
    """A block's K/V depends on every block before it: once a block misses, later blocks cannot be
    hits even when the hash function (here one that ignores the parent) says they are."""
    bm = BlockManager(
        num_blocks=10, block_size=2, hash_fn=lambda token_ids, parent_hash: hash(tuple(token_ids))
    )
    a = make_seq([1, 2, 3, 4, 5], 0)
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq([9, 9, 3, 4, 5], 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and set(b.block_table).isdisjoint(a.block_table)


@pytest.mark.parametrize(
    "block_size, prompt_len, expected_cached",
    [(4, 8, 4), (4, 9, 8), (4, 5, 4), (4, 4, 0), (4, 1, 0), (1, 3, 2), (1, 1, 0), (16, 32, 16)],
)
def test_full_prompt_hit_still_recomputes_last_token(block_size, prompt_len, expected_cached):
    """Only whole blocks within the first len - 1 tokens can be hits: num_cached_tokens is
    floor((len - 1) / block_size) * block_size, so at least one token (the last) is computed."""
    bm = BlockManager(num_blocks=8, block_size=block_size)
    a = make_seq(range(prompt_len), 0)
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(range(prompt_len), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == expected_cached == b.data.num_computed_tokens
    num_hit_blocks = expected_cached // block_size
    assert b.block_table[:num_hit_blocks] == a.block_table[:num_hit_blocks]
    # Blocks holding tokens to recompute are fresh and private: nobody writes into a shared block.
    assert set(b.block_table[num_hit_blocks:]).isdisjoint(a.block_table)


def test_duplicate_block_keeps_hash_while_used_and_drops_it_when_freed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(range(8), 0), make_seq(range(8), 1)
    bm.allocate(a)
    compute_all(bm, a)
    bm.allocate(b)  # hits block 0, recomputes block 1 into a fresh block
    compute_all(bm, b)
    a1, b1 = a.block_table[1], b.block_table[1]
    assert bm.blocks[b1].hash == bm.blocks[a1].hash and bm.hash_to_block_id[bm.blocks[a1].hash] == a1
    bm.deallocate(b)
    assert bm.blocks[b1].hash is None and next(iter(bm.free_block_ids)) == b1  # reused first
    assert bm.blocks[a1].hash is not None


def test_duplicate_takes_over_the_cache_entry_once_the_owner_was_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq([1, 2, 3, 4], 0), make_seq([1, 2, 3, 4], 1)
    bm.allocate(a)
    bm.allocate(b)  # neither is hashed yet: no hits, two copies of the same content
    compute_all(bm, a)
    compute_all(bm, b)
    a_table, b_table = list(a.block_table), list(b.block_table)
    assert sorted(bm.hash_to_block_id.values()) == sorted(a_table)  # first hashed owns the entries
    bm.deallocate(a)
    filler = make_seq([9, 9, 8, 8], 2)
    bm.allocate(filler)  # evicts a's two cached blocks, tail first
    assert filler.block_table == a_table[::-1] and bm.hash_to_block_id == {}
    bm.deallocate(b)  # b's copies take the free entries over, keeping their hashes
    assert sorted(bm.hash_to_block_id.values()) == sorted(b_table)
    bm.deallocate(filler)
    c = make_seq([1, 2, 3, 4, 5], 3)
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[:2] == b_table


def test_revived_block_keeps_its_hash_and_can_be_hit_again():
    bm = BlockManager(num_blocks=6, block_size=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    a = make_seq(prompt, 0)
    bm.allocate(a)
    compute_all(bm, a)
    cached = a.block_table[:2]
    hashes = [bm.blocks[i].hash for i in cached]
    bm.deallocate(a)
    assert bm.get_num_free_blocks() == 6 and [bm.blocks[i].hash for i in cached] == hashes

    b = make_seq(prompt, 1)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == cached and b.num_cached_tokens == 8
    assert refs(bm, cached) == [1, 1] and not set(cached) & set(bm.free_block_ids)
    assert [bm.blocks[i].hash for i in cached] == hashes
    assert all(bm.hash_to_block_id[h] == i for h, i in zip(hashes, cached))

    c = make_seq(prompt, 2)
    bm.allocate(c)  # shares the revived blocks
    assert c.block_table[:2] == cached and refs(bm, cached) == [2, 2]
    bm.deallocate(b)
    bm.deallocate(c)
    assert bm.get_num_free_blocks() == 6


def test_lru_eviction_order_and_uncached_blocks_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq([1, 2, 3, 4], 0), make_seq([5, 6, 7, 8], 1)
    for seq in (a, b):
        bm.allocate(seq)
        compute_all(bm, seq)
    unused = list(bm.free_block_ids)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    assert len(unused) == 2
    bm.deallocate(a)  # freed first: evicted first; within a, the tail before the head
    bm.deallocate(b)
    assert list(bm.free_block_ids) == [*unused, a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]

    # A partial block freed without a hash goes to the front and is reused before any cached one.
    p = make_seq([9], 2)
    bm.allocate(p)
    assert p.block_table == [unused[0]]
    bm.deallocate(p)
    assert list(bm.free_block_ids)[0] == unused[0]

    # Three fresh blocks: the two unused ones, then a's tail is evicted (its head survives).
    x = make_seq([0, 0, 0, 0, 0, 0], 3)
    bm.allocate(x)
    assert x.block_table == [unused[0], unused[1], a_blocks[1]]
    assert bm.blocks[a_blocks[1]].hash is None and a_blocks[1] not in bm.hash_to_block_id.values()
    a2 = make_seq([1, 2, 3, 4, 5], 4)
    bm.allocate(a2)
    assert a2.num_cached_tokens == 2 and a2.block_table[0] == a_blocks[0]


def test_can_allocate_counts_hits_on_blocks_in_use_as_free():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], 0)
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.get_num_free_blocks() == 1
    b = make_seq([1, 2, 3, 4, 6], 1)  # 3 blocks, 2 shared hits: needs 1
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert bm.get_num_free_blocks() == 0 and refs(bm, a.block_table[:2]) == [2, 2]
    bm.deallocate(a)
    bm.deallocate(b)
    # Hits on free cached blocks do take a free block each.
    small = BlockManager(num_blocks=2, block_size=2)
    c = make_seq([1, 2, 3, 4], 2)
    small.allocate(c)
    compute_all(small, c)
    small.deallocate(c)
    d = make_seq([1, 2, 3, 4, 5, 6], 3)  # 3 blocks needed, 2 of them revivable: still 3 > 2
    assert not small.can_allocate(d)


def test_deallocate_then_reallocate_recomputes_cached_tokens():
    """Preemption by recompute: the cached-token count is looked up again on re-allocation."""
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(6), 0)
    bm.allocate(seq)
    compute_all(bm, seq)
    for token in (6, 7, 8):  # decode three tokens
        seq.append_token_id(token)
        bm.may_append(seq)
        compute_all(bm, seq)
    bm.deallocate(seq)
    assert seq.num_cached_tokens == 0 == seq.data.num_computed_tokens and seq.block_table == []
    bm.allocate(seq)  # 9 tokens: blocks [0..3], [4..7] cached, token 8 recomputed
    assert seq.num_cached_tokens == 8 == seq.data.num_computed_tokens


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
@pytest.mark.parametrize("prompt_len", [1, 3, 16])
def test_may_append_allocates_exactly_at_block_boundaries(block_size, prompt_len):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    seq = make_seq(range(prompt_len))
    bm.allocate(seq)
    for step in range(2 * block_size + 3):
        compute_all(bm, seq)
        seq.append_token_id(1000 + step)
        num_blocks_before = len(seq.block_table)
        assert bm.can_append(seq)
        assert bm.may_append(seq) == []
        new_block = (seq.get_len() - 1) % block_size == 0  # the new token starts a block
        assert len(seq.block_table) == num_blocks_before + new_block
        assert len(seq.block_table) == -(-seq.get_len() // block_size)
        assert bm.get_num_free_blocks() == 64 - len(seq.block_table)
    bm.deallocate(seq)
    assert bm.get_num_free_blocks() == 64


def test_can_append_false_when_pool_is_full():
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = make_seq([1, 2, 3, 4])
    bm.allocate(seq)
    compute_all(bm, seq)
    seq.append_token_id(5)
    assert not bm.can_append(seq)
    with pytest.raises(RuntimeError):
        bm.may_append(seq)
    assert len(seq.block_table) == 2


def test_fork_shares_blocks_and_copy_on_write_of_the_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4, 5, 6], 0)
    bm.allocate(parent)
    compute_all(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    full, partial = parent.block_table
    assert child.block_table == [full, partial] and refs(bm, [full, partial]) == [2, 2]
    assert bm.get_num_free_blocks() == 6

    parent.append_token_id(7)
    assert bm.can_append(parent)
    copies = bm.may_append(parent)
    new = parent.block_table[1]
    assert copies == [(partial, new)] and new not in (full, partial)
    assert parent.block_table[0] == full  # full shared blocks stay shared
    assert refs(bm, [full, partial, new]) == [2, 1, 1]

    child.append_token_id(8)
    assert bm.may_append(child) == []  # the old partial block is the child's alone now
    assert child.block_table == [full, partial]
    assert refs(bm, [full, partial, new]) == [2, 1, 1]
    bm.deallocate(parent)
    bm.deallocate(child)
    assert bm.get_num_free_blocks() == 8


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(range(8), 0)
    bm.allocate(parent)
    compute_all(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    for seq, token in ((parent, 100), (child, 200)):
        seq.append_token_id(token)
        assert bm.may_append(seq) == []
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]
    assert refs(bm, parent.block_table) == [2, 2, 1]


def test_fork_that_recomputes_its_last_prompt_token_copies_the_cached_block():
    """A child forked after the prompt, rewound to recompute the last prompt token (the scheduler's
    way of giving each fork its own first sample): the full, cached last block is copied, never
    written; the parent keeps the cached original."""
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(range(8), 0)
    bm.allocate(parent)
    compute_all(bm, parent)
    child = make_seq(range(8), 1)
    bm.fork(parent, child)
    child.data.num_computed_tokens = 7
    first, last = parent.block_table
    assert bm.blocks[last].ref_count == 2 and bm.blocks[last].hash is not None
    assert bm.can_append(child)
    copies = bm.may_append(child)
    assert copies == [(last, child.block_table[1])] and child.block_table[0] == first
    assert refs(bm, [first, last, child.block_table[1]]) == [2, 1, 1]
    assert bm.blocks[child.block_table[1]].hash is None and bm.blocks[last].hash is not None


def test_rewind_into_a_private_cached_block_copies_it_and_keeps_the_original_cached():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3, 4])
    bm.allocate(seq)
    compute_all(bm, seq)
    old = seq.block_table[1]
    seq.data.num_computed_tokens = 3
    assert bm.may_append(seq) == [(old, seq.block_table[1])]
    assert bm.blocks[old].ref_count == 0 and old in bm.free_block_ids
    assert bm.hash_to_block_id[bm.blocks[old].hash] == old  # still a cache entry, revivable


def test_chunked_prefill_hashes_only_computed_full_blocks():
    bm = BlockManager(num_blocks=12, block_size=4)
    prompt = list(range(10))
    a = make_seq(prompt, 0)
    bm.allocate(a)
    for num_computed, num_hashed in ((3, 0), (6, 1), (8, 2), (10, 2)):  # chunk by chunk
        a.data.num_computed_tokens = num_computed
        bm.cache_full_blocks(a, num_computed)
        assert [bm.blocks[i].hash is not None for i in a.block_table] == [i < num_hashed for i in range(3)]
        if num_computed == 6:
            b = make_seq(prompt, 1)  # block 1 is scheduled but not computed yet: no hit on it
            bm.allocate(b)
            assert b.num_cached_tokens == 4 and b.block_table[1] != a.block_table[1]
            bm.deallocate(b)
    # Decode: the block the last token fills is hashed only once that token is computed.
    a.append_token_id(10)
    a.append_token_id(11)
    bm.may_append(a)
    bm.cache_full_blocks(a, 11)
    assert bm.blocks[a.block_table[2]].hash is None
    bm.cache_full_blocks(a, 12)
    assert bm.blocks[a.block_table[2]].hash is not None


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = make_seq(range(9), 0), make_seq(range(9), 1)
    bm.allocate(a)
    compute_all(bm, a)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)
    assert bm.hash_to_block_id == {} and all(blk.hash is None for blk in bm.blocks)
    assert bm.stats.queries == 0 and bm.stats.hit_rate == 0.0
