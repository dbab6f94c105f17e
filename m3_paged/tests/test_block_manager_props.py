"""Property-based tests of the block manager: random workloads of allocate / compute (in chunks) /
decode / fork / preempt / finish, with the invariants checked after every step.

Besides the bookkeeping, the machine keeps a fake KV cache: each slot holds the token prefix whose
K/V a real model would have written there (`tokens[:pos + 1]`). Checking every live sequence's
computed positions against it proves what reference counts alone cannot: prefix hits hand out the
right K/V, copy-on-write copies are complete, and no step overwrites a slot another sequence reads.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from m0_config.sequence import Sequence, SequenceStatus
from m3_paged.block import NO_PARENT_HASH, compute_block_hash
from m3_paged.block_manager import BlockManager

pytestmark = pytest.mark.m3

MAX_LEN = 14  # tokens per sequence, outputs included
MAX_SEQS = 6  # waiting or running, each
TOKENS = st.integers(0, 2)  # a small alphabet, so that prefixes are shared by chance too


def reference_hash(prefix: tuple[int, ...], block_size: int) -> int:
    """The chained hash of a block-aligned prefix, recomputed from scratch."""
    h = NO_PARENT_HASH
    for i in range(0, len(prefix), block_size):
        h = compute_block_hash(prefix[i : i + block_size], h)
    return h


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(1, 14),
        caching=st.sampled_from([True, True, False]),
    )
    def setup(self, block_size, num_blocks, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.prompts: list[tuple[int, ...]] = []
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the prefix whose K/V it holds
        self.prefix_of_hash: dict[int, tuple[int, ...]] = {}  # hash -> the prefix it was made from
        self.next_seq_id = 0

    # ---- helpers -------------------------------------------------------------------------------
    def slot(self, seq: Sequence, pos: int) -> int:
        size = self.bm.block_size
        return seq.block_table[pos // size] * size + pos % size

    def new_seq_id(self) -> int:
        self.next_seq_id += 1
        return self.next_seq_id

    def decodable(self):
        return [s for s in self.running if s.data.num_computed_tokens == s.get_len()]

    # ---- the workload: one operation per step, drawn among those that apply now ------------------
    @rule(data=st.data())
    def step(self, data):
        # One rule with a dispatch rather than a rule per operation with preconditions: hypothesis
        # rejects most draws when only a few rules are enabled, which wastes most examples.
        decodable = [s for s in self.decodable() if s.get_len() < MAX_LEN]
        ops = {
            self.add_seq: len(self.waiting) < MAX_SEQS,
            self.allocate: self.waiting and len(self.running) < MAX_SEQS,
            self.compute: any(s.data.num_computed_tokens < s.get_len() for s in self.running),
            self.decode: decodable,
            self.fork: decodable and len(self.running) < MAX_SEQS,
            self.free: self.running,
        }
        data.draw(st.sampled_from([op for op, enabled in ops.items() if enabled]))(data)

    def add_seq(self, data):
        """A new prompt: often an earlier prompt's prefix plus a few tokens."""
        base: tuple[int, ...] = ()
        if self.prompts and data.draw(st.integers(0, 3)):  # reuse 3 times in 4
            base = data.draw(st.sampled_from(self.prompts))
            base = base[: data.draw(st.integers(0, len(base)))]
        suffix = data.draw(st.lists(TOKENS, min_size=0 if base else 1, max_size=MAX_LEN - len(base) - 2))
        prompt = (*base, *suffix)
        self.prompts.append(prompt)
        self.waiting.append(Sequence(self.new_seq_id(), None, prompt))

    def allocate(self, data):
        seq = data.draw(st.sampled_from(self.waiting))
        bm, free = self.bm, self.bm.get_num_free_blocks()
        required = bm.num_required_blocks(seq.get_len())
        ok = bm.can_allocate(seq)
        if required <= free:
            assert ok  # prefix hits can only lower the need
        use_try = data.draw(st.booleans())  # the scheduler's one-call form, or the two calls
        if not ok:
            if use_try:
                assert not bm.try_allocate(seq)
            else:
                with pytest.raises(RuntimeError):
                    bm.allocate(seq)
            assert seq.block_table == [] and bm.get_num_free_blocks() == free
            return
        cached_free = [b for b in bm.free_block_ids if bm.blocks[b].hash is not None]
        if use_try:
            assert bm.try_allocate(seq)
        else:
            bm.allocate(seq)
        # What the workload covered (pytest --hypothesis-show-statistics lists these).
        event(f"allocate: {'hit' if seq.num_cached_tokens else 'miss'}, caching={bm.enable_prefix_caching}")
        if any(b in seq.block_table and bm.blocks[b].hash is not None for b in cached_free):
            event("allocate: revived a free cached block")
        if any(bm.blocks[b].hash is None for b in cached_free):
            event("allocate: evicted a cached block")
        assert free - required <= bm.get_num_free_blocks() <= free
        cached = seq.num_cached_tokens
        assert cached % bm.block_size == 0 and 0 <= cached < seq.get_len()
        assert seq.data.num_computed_tokens == cached
        seq.status = SequenceStatus.RUNNING
        self.waiting.remove(seq)
        self.running.append(seq)

    def compute(self, data):
        """One model step on a chunk of the sequence's uncomputed tokens."""
        seq = data.draw(
            st.sampled_from([s for s in self.running if s.data.num_computed_tokens < s.get_len()])
        )
        start = seq.data.num_computed_tokens
        end = data.draw(st.integers(start + 1, seq.get_len()))
        tokens = tuple(seq.get_token_ids())
        for pos in range(start, end):
            block = self.bm.blocks[seq.block_table[pos // self.bm.block_size]]
            assert block.ref_count == 1 and block.hash is None  # never write a shared or cached block
            self.kv[self.slot(seq, pos)] = tokens[: pos + 1]
        seq.data.num_computed_tokens = end
        self.bm.cache_full_blocks(seq, end)
        size = self.bm.block_size
        for i, block_id in enumerate(seq.block_table[: end // size]):  # what the new hashes stand for
            prefix = tokens[: (i + 1) * size]
            if self.bm.blocks[block_id].hash is not None:
                assert self.prefix_of_hash.setdefault(self.bm.blocks[block_id].hash, prefix) == prefix

    def decode(self, data):
        """Append a sampled token and prepare its slot; preempt the sequence if the pool is full."""
        seq = data.draw(st.sampled_from([s for s in self.decodable() if s.get_len() < MAX_LEN]))
        bm, size = self.bm, self.bm.block_size
        seq.append_token_id(data.draw(TOKENS))
        starts_block = (seq.get_len() - 1) % size == 0
        need = 1 if starts_block or bm.blocks[seq.block_table[-1]].ref_count > 1 else 0
        can_append = bm.can_append(seq)
        assert can_append == (need <= bm.get_num_free_blocks())
        if data.draw(st.booleans(), label="allocate_slots"):  # the scheduler's one-call form
            copies = bm.allocate_slots(seq)
            assert (copies is None) == (not can_append)
        else:
            copies = bm.may_append(seq) if can_append else None
        if copies is None:
            event("decode: preempted, no free block")
            self.preempt_seq(seq)
            return
        self.apply_copies(copies)

    def fork(self, data):
        """Fork a fully computed sequence; sometimes rewind the child by one token, as a scheduler
        does to recompute the last prompt token, which needs `may_append` (and maybe a copy)."""
        parent = data.draw(st.sampled_from(self.decodable()))
        child = parent.fork(self.new_seq_id())
        self.bm.fork(parent, child)
        self.running.append(child)
        if data.draw(st.booleans()):
            child.data.num_computed_tokens -= 1
            if self.bm.can_append(child):
                self.apply_copies(self.bm.may_append(child))
            else:
                self.preempt_seq(child)

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        """The model runner's copy-on-write, on the fake KV cache."""
        if copies:
            event("copy-on-write")
        size = self.bm.block_size
        for src, dst in copies:
            for offset in range(size):
                if src * size + offset in self.kv:
                    self.kv[dst * size + offset] = self.kv[src * size + offset]

    def free(self, data):
        """Finish a sequence, or preempt it by recompute (back to waiting, blocks freed)."""
        seq = data.draw(st.sampled_from(self.running))
        if data.draw(st.booleans()):
            self.bm.deallocate(seq)
            self.running.remove(seq)
        else:
            self.preempt_seq(seq)

    def preempt_seq(self, seq: Sequence) -> None:
        self.bm.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        if len(self.waiting) < MAX_SEQS:
            self.waiting.append(seq)

    # ---- invariants ----------------------------------------------------------------------------
    @invariant()
    def ref_counts_match_block_tables(self):
        occurrences = Counter(b for s in self.running for b in s.block_table)
        assert {b.block_id: b.ref_count for b in self.bm.blocks if b.ref_count} == dict(occurrences)
        assert all(b.ref_count >= 0 for b in self.bm.blocks)

    @invariant()
    def free_queue_holds_exactly_the_unused_blocks(self):
        bm = self.bm
        queue = list(bm.free_block_ids)
        assert len(queue) == len(set(queue)) == bm.get_num_free_blocks()
        assert set(queue) == {b.block_id for b in bm.blocks if b.ref_count == 0}
        cached = [bm.blocks[b].hash is not None for b in queue]
        assert cached == sorted(cached)  # blocks caching nothing come first
        for b in queue:  # a free block has a hash exactly when it owns that hash's entry
            h = bm.blocks[b].hash
            assert h is None or bm.hash_to_block_id[h] == b

    @invariant()
    def live_sequences_cover_their_tokens_and_hash_a_computed_prefix(self):
        bm, size = self.bm, self.bm.block_size
        for seq in self.waiting:
            assert seq.block_table == [] and seq.data.num_computed_tokens == 0
        for seq in self.running:
            tokens, computed = tuple(seq.get_token_ids()), seq.data.num_computed_tokens
            # Every rule that appends calls may_append at once, so the table always covers all tokens.
            assert len(seq.block_table) == bm.num_required_blocks(len(tokens))
            hashed = [bm.blocks[b].hash is not None for b in seq.block_table]
            num_hashed = sum(hashed)
            assert hashed == [True] * num_hashed + [False] * (len(hashed) - num_hashed)
            # Exactly the full computed blocks are hashed (cache_full_blocks runs after each step).
            assert num_hashed == (computed // size if bm.enable_prefix_caching else 0)
            for i in range(num_hashed):
                block, prefix = bm.blocks[seq.block_table[i]], tokens[: (i + 1) * size]
                assert block.token_ids == prefix[-size:]
                assert block.hash == reference_hash(prefix, size)
                assert self.prefix_of_hash.setdefault(block.hash, prefix) == prefix

    @invariant()
    def kept_block_hashes_equal_fresh_ones(self):
        """`seq.block_hashes`, computed once and kept through appends, forks and preemptions, equal
        the chained hashes recomputed from the sequence's tokens now, and cover only full blocks."""
        size = self.bm.block_size
        for seq in self.waiting + self.running:
            tokens = tuple(seq.get_token_ids())
            assert len(seq.block_hashes) <= len(tokens) // size
            for i, h in enumerate(seq.block_hashes):
                assert h == reference_hash(tokens[: (i + 1) * size], size)

    @invariant()
    def hash_index_is_consistent(self):
        bm = self.bm
        if not bm.enable_prefix_caching:
            assert bm.hash_to_block_id == {} and all(b.hash is None for b in bm.blocks)
        for h, block_id in bm.hash_to_block_id.items():
            block = bm.blocks[block_id]
            assert block.hash == h and len(block.token_ids) == bm.block_size
            prefix = self.prefix_of_hash[h]  # recorded when the block was hashed
            assert block.token_ids == prefix[-bm.block_size :] and reference_hash(prefix, bm.block_size) == h
        assert bm.stats.hits <= bm.stats.queries

    @invariant()
    def computed_slots_hold_the_right_kv(self):
        for seq in self.running:
            tokens = tuple(seq.get_token_ids())
            for pos in range(seq.data.num_computed_tokens):
                assert self.kv.get(self.slot(seq, pos)) == tokens[: pos + 1]

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.running):
            self.bm.deallocate(seq)
        self.running.clear()
        assert self.bm.get_num_free_blocks() == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,  # a fixed seed: the same workloads on every run
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_workloads = BlockManagerMachine.TestCase
