"""BlockPool (rlhf_engine._C) against a pure-Python model of the same allocator, plus targeted cases."""

from __future__ import annotations

import random
from collections import deque

import pytest

from rlhf_engine.kv_cache import BlockPool, OutOfBlocksError


class ModelOutOfBlocks(Exception):
    pass


class PoolModel:
    """The allocator spelled out in Python: FIFO free list (allocate takes the least recently freed block, free
    returns a sequence's blocks tail first), refcounts, copy-on-write of a shared last block."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free_list = deque(range(num_blocks))
        self.refcount = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}

    def _take(self, needed: int) -> list[int]:
        if needed > len(self.free_list):
            raise ModelOutOfBlocks
        blocks = [self.free_list.popleft() for _ in range(needed)]
        for b in blocks:
            self.refcount[b] = 1
        return blocks

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        assert seq_id not in self.tables
        self.tables[seq_id] = self._take(-(-num_tokens // self.block_size))
        self.tokens[seq_id] = num_tokens
        return list(self.tables[seq_id])

    def append_slot(self, seq_id: int) -> tuple[int, int, int]:
        table, offset = self.tables[seq_id], self.tokens[seq_id] % self.block_size
        src = dst = -1
        if offset == 0:
            table.append(self._take(1)[0])
        elif self.refcount[table[-1]] > 1:
            dst = self._take(1)[0]
            src = table[-1]
            self.refcount[src] -= 1
            table[-1] = dst
        self.tokens[seq_id] += 1
        return table[-1] * self.block_size + offset, src, dst

    def fork(self, parent_id: int, child_id: int) -> None:
        self.tables[child_id] = list(self.tables[parent_id])
        self.tokens[child_id] = self.tokens[parent_id]
        for b in self.tables[child_id]:
            self.refcount[b] += 1

    def free(self, seq_id: int) -> None:
        for b in reversed(self.tables.pop(seq_id)):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self.free_list.append(b)
        del self.tokens[seq_id]


def assert_same_state(pool: BlockPool, model: PoolModel, refcounts: bool) -> None:
    assert pool.num_free_blocks() == len(model.free_list)
    assert pool.num_sequences() == len(model.tables)
    for seq_id, table in model.tables.items():
        assert pool.block_table(seq_id) == table, seq_id
        assert pool.num_tokens(seq_id) == model.tokens[seq_id], seq_id
    if refcounts:
        assert [pool.refcount(b) for b in range(pool.num_blocks())] == model.refcount


def test_fuzz_against_python_model():
    rng = random.Random(1234)
    num_blocks, block_size = 48, 4
    pool, model = BlockPool(num_blocks, block_size), PoolModel(num_blocks, block_size)
    live: list[int] = []
    seen = {"allocate": 0, "append": 0, "cow": 0, "fork": 0, "free": 0, "out_of_blocks": 0, "bad_id": 0}

    def new_id() -> int:
        while True:  # the whole int64 range, negative ids included
            seq_id = rng.randrange(-(2**63), 2**63)
            if seq_id not in model.tables:
                return seq_id

    for step in range(20_000):
        r = rng.random()
        try:
            if not live or r < 0.2:
                seq_id, num_tokens = new_id(), rng.randrange(0, 41)
                try:
                    expected = model.allocate(seq_id, num_tokens)
                except ModelOutOfBlocks:
                    with pytest.raises(OutOfBlocksError, match="BlockPool.allocate: out of KV blocks"):
                        pool.allocate(seq_id, num_tokens)
                    raise
                assert pool.allocate(seq_id, num_tokens) == expected
                live.append(seq_id)
                seen["allocate"] += 1
            elif r < 0.55:
                seq_id = rng.choice(live)
                try:
                    expected = model.append_slot(seq_id)
                except ModelOutOfBlocks:
                    with pytest.raises(OutOfBlocksError, match="BlockPool.append_slot: out of KV blocks: need 1"):
                        pool.append_slot(seq_id)
                    raise
                assert pool.append_slot(seq_id) == expected
                seen["append"] += 1
                seen["cow"] += expected[1] >= 0
            elif r < 0.68:
                parent, child = rng.choice(live), new_id()
                model.fork(parent, child)
                pool.fork(parent, child)
                live.append(child)
                seen["fork"] += 1
            elif r < 0.99:
                seq_id = live.pop(rng.randrange(len(live)))
                model.free(seq_id)
                pool.free(seq_id)
                seen["free"] += 1
            else:  # an id that is not live: every entry point must refuse it and change nothing
                seq_id = new_id()
                for call in (pool.free, pool.append_slot, pool.block_table, pool.num_tokens):
                    with pytest.raises(ValueError, match=f"unknown seq_id {seq_id}"):
                        call(seq_id)
                seen["bad_id"] += 1
        except ModelOutOfBlocks:
            seen["out_of_blocks"] += 1  # the pool raised too; the state comparison below proves it is unchanged
        pool.check_invariants()
        assert_same_state(pool, model, refcounts=step % 16 == 0)

    # The fuzz must have reached every branch, or it proves little.
    assert min(seen.values()) >= 50, seen
    for seq_id in live:
        model.free(seq_id)
        pool.free(seq_id)
    pool.check_invariants()
    assert_same_state(pool, model, refcounts=True)
    assert pool.num_free_blocks() == num_blocks and pool.num_sequences() == 0
    assert all(pool.refcount(b) == 0 for b in range(num_blocks))


def test_copy_on_write_of_a_shared_partial_block():
    pool = BlockPool(8, 4)
    assert pool.allocate(1, 6) == [0, 1]  # block 1 holds tokens 4, 5 and has room for two more
    pool.fork(1, 2)
    assert (pool.refcount(0), pool.refcount(1)) == (2, 2)
    # Token 6 of seq 1 goes into the shared block 1: seq 1 gets block 2, a copy of block 1.
    assert pool.append_slot(1) == (2 * 4 + 2, 1, 2)
    assert pool.block_table(1) == [0, 2] and pool.block_table(2) == [0, 1]
    assert [pool.refcount(b) for b in range(3)] == [2, 1, 1]
    # Block 1 now belongs to seq 2 alone: it writes in place, and so does seq 1 in its copy.
    assert pool.append_slot(2) == (1 * 4 + 2, -1, -1)
    assert pool.append_slot(1) == (2 * 4 + 3, -1, -1)
    pool.check_invariants()
    pool.free(1)
    pool.free(2)
    assert pool.num_free_blocks() == 8
    pool.check_invariants()


def test_fork_at_a_block_boundary_takes_a_new_block_without_copy():
    pool = BlockPool(8, 4)
    pool.allocate(1, 8)
    pool.fork(1, 2)
    assert pool.append_slot(1) == (2 * 4, -1, -1)
    assert pool.append_slot(2) == (3 * 4, -1, -1)
    assert pool.block_table(1) == [0, 1, 2] and pool.block_table(2) == [0, 1, 3]
    assert pool.num_tokens(1) == pool.num_tokens(2) == 9
    pool.check_invariants()


def test_empty_sequence_gets_its_first_block_on_append():
    pool = BlockPool(2, 4)
    assert pool.allocate(7, 0) == []
    assert pool.append_slot(7) == (0, -1, -1)
    assert pool.block_table(7) == [0] and pool.num_tokens(7) == 1


def test_freed_blocks_are_reused_least_recently_freed_first():
    pool = BlockPool(6, 2)
    pool.allocate(1, 4)  # [0, 1]
    pool.allocate(2, 4)  # [2, 3]
    pool.free(2)  # frees 3 then 2
    pool.free(1)  # frees 1 then 0
    assert pool.allocate(3, 12) == [4, 5, 3, 2, 1, 0]


def test_out_of_blocks_names_the_numbers_and_changes_nothing():
    pool = BlockPool(4, 2)
    pool.allocate(1, 8)
    assert not pool.can_allocate(1) and pool.can_allocate(0)
    msg = r"^BlockPool.append_slot: out of KV blocks: need 1, free 0 of 4; free finished sequences or raise num_blocks$"
    with pytest.raises(OutOfBlocksError, match=msg):
        pool.append_slot(1)
    assert pool.num_tokens(1) == 8 and pool.block_table(1) == [0, 1, 2, 3]
    pool.free(1)
    with pytest.raises(OutOfBlocksError, match=r"BlockPool.allocate: out of KV blocks: need 5, free 4 of 4"):
        pool.allocate(2, 9)
    assert not pool.has_sequence(2) and pool.num_free_blocks() == 4
    assert issubclass(OutOfBlocksError, RuntimeError)
    pool.check_invariants()


def test_copy_on_write_without_a_free_block_changes_nothing():
    pool = BlockPool(2, 4)
    pool.allocate(1, 2)
    pool.fork(1, 2)
    pool.allocate(3, 4)  # takes the last free block
    with pytest.raises(OutOfBlocksError, match="need 1, free 0 of 2"):
        pool.append_slot(1)
    assert pool.block_table(1) == [0] and pool.num_tokens(1) == 2 and pool.refcount(0) == 2
    pool.free(3)
    assert pool.append_slot(1) == (1 * 4 + 2, 0, 1)
    pool.check_invariants()


def test_unknown_duplicate_and_double_freed_ids():
    pool = BlockPool(8, 4)
    pool.allocate(1, 5)
    with pytest.raises(ValueError, match="BlockPool.allocate: seq_id 1 already exists"):
        pool.allocate(1, 3)
    with pytest.raises(ValueError, match="BlockPool.fork: child_id 1 already exists"):
        pool.fork(1, 1)
    with pytest.raises(ValueError, match="BlockPool.fork: unknown parent_id 9"):
        pool.fork(9, 2)
    for name in ("append_slot", "block_table", "num_tokens"):
        with pytest.raises(ValueError, match=f"BlockPool.{name}: unknown seq_id 9"):
            getattr(pool, name)(9)
    with pytest.raises(ValueError, match="BlockPool.slot_mapping: unknown seq_id 9"):
        pool.slot_mapping(9, 0, 1)
    pool.free(1)
    with pytest.raises(ValueError, match=r"BlockPool.free: unknown seq_id 1 .*double free"):
        pool.free(1)
    assert pool.num_free_blocks() == 8
    pool.check_invariants()


def test_bad_sizes_and_block_ids():
    with pytest.raises(ValueError, match="BlockPool: num_blocks must be > 0, found 0"):
        BlockPool(0, 4)
    with pytest.raises(ValueError, match="BlockPool: block_size must be > 0, found -2"):
        BlockPool(4, -2)
    pool = BlockPool(8, 4)
    for bad in (-1, 8):
        with pytest.raises(ValueError, match=rf"BlockPool.refcount: block_id {bad} out of range \[0, 8\)"):
            pool.refcount(bad)
    with pytest.raises(ValueError, match="num_tokens must be >= 0, found -1"):
        pool.allocate(1, -1)
    with pytest.raises(ValueError, match="num_tokens must be >= 0, found -3"):
        pool.can_allocate(-3)
    assert not pool.has_sequence(1)


def test_slot_mapping_and_block_arithmetic():
    pool = BlockPool(16, 4)
    pool.allocate(0, 3)  # block 0, so seq 5 starts elsewhere
    table = pool.allocate(5, 10)
    assert table == [1, 2, 3]
    expected = [table[t // 4] * 4 + t % 4 for t in range(10)]
    assert pool.slot_mapping(5, 0, 10) == expected
    assert pool.slot_mapping(5, 3, 7) == expected[3:7]
    assert pool.slot_mapping(5, 10, 10) == []
    with pytest.raises(ValueError, match=r"need 0 <= start <= end <= num_tokens\(5\) = 10, found start 2, end 11"):
        pool.slot_mapping(5, 2, 11)
    with pytest.raises(ValueError, match="found start 4, end 3"):
        pool.slot_mapping(5, 4, 3)
    assert pool.blocks_needed(0) == 0 and pool.blocks_needed(4) == 1 and pool.blocks_needed(5) == 2
    assert (pool.num_blocks(), pool.block_size()) == (16, 4)
    assert "free=12" in repr(pool)
