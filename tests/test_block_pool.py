"""BlockPool (rlhf_engine._C) against a pure-Python model of the same allocator, plus targeted cases."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from rlhf_engine.kv_cache import BlockPool, OutOfBlocksError


class ModelOutOfBlocks(Exception):
    pass


class PoolModel:
    """The allocator spelled out in Python: an LRU free list (allocate takes the least recently freed block, free
    returns a sequence's blocks tail first), refcounts, copy-on-write of a shared last block, and prefix caching
    keyed by the exact token prefix up to a full block's end (the pool hashes that chain; a hit is verified, so the
    two agree)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free_list: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = next to go
        self.refcount = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}
        self.block_key: dict[int, tuple[int, ...]] = {}  # block -> the prompt prefix it ends
        self.cached: dict[tuple[int, ...], int] = {}  # prefix -> block
        self.queries = self.hits = 0
        self.evicted = self.duplicates = 0  # keyed blocks taken from the free list; keys not taken (already cached)

    def _take(self, needed: int) -> list[int]:
        if needed > len(self.free_list):
            raise ModelOutOfBlocks
        blocks = [self.free_list.popitem(last=False)[0] for _ in range(needed)]
        for b in blocks:
            self.refcount[b] = 1
            if b in self.block_key:
                del self.cached[self.block_key.pop(b)]
                self.evicted += 1
        return blocks

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        assert seq_id not in self.tables
        self.tables[seq_id] = self._take(-(-num_tokens // self.block_size))
        self.tokens[seq_id] = num_tokens
        return list(self.tables[seq_id])

    def allocate_prompt(self, seq_id: int, token_ids: list[int]) -> tuple[int, int]:
        """Returns (cached tokens, blocks revived from the free list)."""
        assert seq_id not in self.tables
        n, bs = len(token_ids), self.block_size
        matchable = (n - 1) // bs if n > 0 else 0
        hits = []
        for i in range(matchable):
            b = self.cached.get(tuple(token_ids[: (i + 1) * bs]))
            if b is None:
                break
            hits.append(b)
        revived = [b for b in hits if self.refcount[b] == 0]
        needed = -(-n // bs) - len(hits)
        if needed > len(self.free_list) - len(revived):  # the hits in the free list cannot serve as fresh blocks
            raise ModelOutOfBlocks
        for b in hits:
            self.free_list.pop(b, None)
            self.refcount[b] += 1
        fresh = self._take(needed)
        for i, b in enumerate(fresh, start=len(hits)):
            prefix = tuple(token_ids[: (i + 1) * bs])
            if len(prefix) < (i + 1) * bs:
                break  # a partial last block
            if prefix in self.cached:  # cached elsewhere (the last block of a fully cached prompt): rest unkeyed
                self.duplicates += 1
                break
            self.cached[prefix], self.block_key[b] = b, prefix
        self.tables[seq_id], self.tokens[seq_id] = hits + fresh, n
        self.queries += matchable
        self.hits += len(hits)
        return len(hits) * bs, len(revived)

    def reset_prefix_cache(self) -> None:
        self.cached.clear()
        self.block_key.clear()

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
                self.free_list[b] = None
        del self.tokens[seq_id]


def assert_same_state(pool: BlockPool, model: PoolModel, full: bool) -> None:
    assert pool.num_free_blocks() == len(model.free_list)
    assert pool.num_sequences() == len(model.tables)
    assert pool.num_cached_blocks() == len(model.cached)
    assert (pool.prefix_queries(), pool.prefix_hits()) == (model.queries, model.hits)
    for seq_id, table in model.tables.items():
        assert pool.block_table(seq_id) == table, seq_id
        assert pool.num_tokens(seq_id) == model.tokens[seq_id], seq_id
    if full:
        assert [pool.refcount(b) for b in range(pool.num_blocks())] == model.refcount
        assert {b for b in range(pool.num_blocks()) if pool.block_key(b) is not None} == set(model.block_key)


def make_prompts(rng: random.Random, block_size: int) -> list[list[int]]:
    """A small set of prompts sharing prefixes: a few system prompts (0 to 3 blocks, some of odd length) times a
    few questions; token ids from a small alphabet plus a few near the int64 limits."""
    alphabet = list(range(8)) + [2**63 - 1, -(2**63), 151935]
    systems = [[rng.choice(alphabet) for _ in range(n)] for n in (0, block_size, 2 * block_size, 3 * block_size - 1)]
    questions = [[rng.choice(alphabet) for _ in range(rng.randrange(1, 3 * block_size))] for _ in range(4)]
    return [s + q for s in systems for q in questions]


def test_fuzz_against_python_model():
    """100,000 random operations on a small pool (so the invariants, checked after every step, stay cheap and the
    free list runs dry often); the pool must return exactly what the model predicts, block ids included."""
    rng = random.Random(1234)
    num_blocks, block_size = 64, 4
    pool, model = BlockPool(num_blocks, block_size), PoolModel(num_blocks, block_size)
    prompts = make_prompts(rng, block_size)
    live: list[int] = []
    branches = "allocate prompt prompt_hit revived evicted append cow fork free reset out_of_blocks bad_id"
    seen = dict.fromkeys(branches.split(), 0)

    def new_id() -> int:
        while True:  # the whole int64 range, negative ids included
            seq_id = rng.randrange(-(2**63), 2**63)
            if seq_id not in model.tables:
                return seq_id

    for step in range(100_000):
        r = rng.random()
        try:
            if not live or r < 0.09:
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
            elif r < 0.22:
                seq_id, prompt = new_id(), rng.choice(prompts)
                prompt = prompt[: rng.randrange(len(prompt) + 1)] if rng.random() < 0.3 else prompt
                try:
                    cached, revived = model.allocate_prompt(seq_id, prompt)
                except ModelOutOfBlocks:
                    with pytest.raises(OutOfBlocksError, match="BlockPool.allocate_prompt: out of KV blocks"):
                        pool.allocate_prompt(seq_id, prompt)
                    raise
                assert pool.allocate_prompt(seq_id, prompt) == cached
                assert cached < len(prompt) or cached == len(prompt) == 0  # always a token to prefill
                live.append(seq_id)
                seen["prompt"] += 1
                seen["prompt_hit"] += cached > 0
                seen["revived"] += revived
            elif r < 0.52:
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
            elif r < 0.64:
                parent, child = rng.choice(live), new_id()
                model.fork(parent, child)
                pool.fork(parent, child)
                live.append(child)
                seen["fork"] += 1
            elif r < 0.985:
                seq_id = live.pop(rng.randrange(len(live)))
                model.free(seq_id)
                pool.free(seq_id)
                seen["free"] += 1
            elif r < 0.99:
                model.reset_prefix_cache()
                pool.reset_prefix_cache()
                seen["reset"] += 1
            else:  # an id that is not live: every entry point must refuse it and change nothing
                seq_id = new_id()
                for call in (pool.free, pool.append_slot, pool.block_table, pool.num_tokens):
                    with pytest.raises(ValueError, match=f"unknown seq_id {seq_id}"):
                        call(seq_id)
                seen["bad_id"] += 1
        except ModelOutOfBlocks:
            seen["out_of_blocks"] += 1  # the pool raised too; the state comparison below proves it is unchanged
        pool.check_invariants()
        assert_same_state(pool, model, full=step % 16 == 0)

    # The fuzz must have reached every branch, or it proves little.
    seen["evicted"], seen["duplicate_key"] = model.evicted, model.duplicates
    assert min(seen.values()) >= 50, seen
    for seq_id in live:
        model.free(seq_id)
        pool.free(seq_id)
    pool.check_invariants()
    assert_same_state(pool, model, full=True)
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


# ---- prefix caching ----------------------------------------------------------------------------------------


def keyed_blocks(pool: BlockPool) -> list[int]:
    return [b for b in range(pool.num_blocks()) if pool.block_key(b) is not None]


def test_prefix_is_reused_across_sequences():
    pool = BlockPool(8, 4)
    prompt = [10, 11, 12, 13, 20, 21, 22, 23, 30, 31]  # two full blocks and two tokens
    assert pool.allocate_prompt(1, prompt) == 0
    assert pool.block_table(1) == [0, 1, 2] and keyed_blocks(pool) == [0, 1]  # the partial block is not keyed
    assert pool.allocate_prompt(2, prompt[:8] + [99, 98, 97]) == 8  # same two blocks, another question
    assert pool.block_table(2) == [0, 1, 3]
    assert [pool.refcount(b) for b in range(4)] == [2, 2, 1, 1]
    assert pool.allocate_prompt(3, prompt[:4] + [0, 0, 0, 0, 1]) == 4  # diverges in the second block
    assert pool.block_table(3) == [0, 4, 5] and keyed_blocks(pool) == [0, 1, 4]
    assert (pool.prefix_queries(), pool.prefix_hits(), pool.num_cached_blocks()) == (6, 3, 3)
    pool.check_invariants()


def test_keys_chain_the_whole_prefix():
    """Equal block contents at another depth, or after another first block, are a different prefix."""
    pool = BlockPool(8, 4)
    pool.allocate_prompt(1, [1, 1, 1, 1, 1, 1, 1, 1, 5])
    assert pool.block_key(0) != pool.block_key(1)
    assert pool.allocate_prompt(2, [9, 9, 9, 9, 1, 1, 1, 1, 5]) == 0
    assert pool.allocate_prompt(3, [1, 1, 1, 1, 7]) == 4 and pool.block_table(3)[0] == 0
    pool.check_invariants()


def test_a_fully_cached_prompt_still_prefills_its_last_block():
    pool = BlockPool(8, 4)
    prompt = list(range(8))
    assert pool.allocate_prompt(1, prompt) == 0 and keyed_blocks(pool) == [0, 1]
    # Both blocks are cached, but the caller needs a token to compute logits from: the last block is recomputed
    # into a fresh block, which stays unkeyed (its prefix is block 1's), and block 1 is never written.
    assert pool.allocate_prompt(2, prompt) == 4
    assert pool.block_table(2) == [0, 2] and pool.block_key(2) is None and pool.refcount(1) == 1
    assert pool.allocate_prompt(3, prompt[:4]) == 0 and pool.block_table(3) == [3]  # one full block: no hit
    assert pool.allocate_prompt(4, []) == 0 and pool.block_table(4) == []
    assert (pool.prefix_queries(), pool.prefix_hits()) == (2, 1)
    pool.check_invariants()


def test_appends_never_write_a_keyed_block():
    pool = BlockPool(8, 4)
    pool.allocate_prompt(1, list(range(8)))  # blocks 0, 1 keyed and full
    pool.fork(1, 2)
    assert pool.append_slot(1) == (2 * 4, -1, -1)  # a new block: no copy of the keyed block 1
    pool.allocate_prompt(3, list(range(6)))  # block 0 reused, block 3 holds the two extra tokens, unkeyed
    pool.fork(3, 4)
    assert pool.append_slot(3) == (4 * 4 + 2, 3, 4)  # copy-on-write of the shared, partial, unkeyed block
    assert keyed_blocks(pool) == [0, 1]
    pool.check_invariants()


def test_freed_keyed_blocks_are_revived_from_the_middle_of_the_free_list():
    pool = BlockPool(8, 4)
    pool.allocate_prompt(1, [5, 5, 5, 5, 6, 6, 6, 6, 7])  # blocks 0, 1 keyed, 2 partial
    pool.allocate(2, 4)  # block 3
    pool.free(1)  # frees 2, 1, 0: free list 4 5 6 7 2 1 0
    pool.free(2)  # free list 4 5 6 7 2 1 0 3
    assert pool.num_free_blocks() == 8 and pool.num_cached_blocks() == 2
    assert pool.allocate_prompt(3, [5, 5, 5, 5, 6, 6, 6, 6, 8, 8]) == 8
    assert pool.block_table(3) == [0, 1, 4]  # 0 and 1 revived out of the middle, 4 from the head
    assert pool.num_free_blocks() == 5 and pool.refcount(0) == pool.refcount(1) == 1
    # The rest of the free list kept its order.
    assert pool.allocate(4, 5 * 4) == [5, 6, 7, 2, 3]
    pool.check_invariants()


def test_lru_eviction_drops_the_least_recently_freed_keys_first():
    pool = BlockPool(6, 2)
    prompt_a, prompt_b = [1, 1, 2, 2, 3], [4, 4, 5, 5, 6]
    pool.allocate_prompt(1, prompt_a)  # [0, 1, 2], keyed 0, 1
    pool.allocate_prompt(2, prompt_b)  # [3, 4, 5], keyed 3, 4
    pool.free(1)  # free list 2 1 0: a's tail block first, so a chain loses its end before its start
    pool.free(2)  # free list 2 1 0 5 4 3
    assert pool.num_cached_blocks() == 4
    assert pool.allocate(3, 2) == [2]  # unkeyed: nothing evicted
    assert pool.allocate(4, 2) == [1] and keyed_blocks(pool) == [0, 3, 4]  # a's second block evicted
    assert pool.allocate(5, 2) == [0] and keyed_blocks(pool) == [3, 4]  # then a's first
    assert pool.allocate_prompt(6, prompt_b) == 4 and pool.block_table(6) == [3, 4, 5]  # b's blocks survived
    for seq_id in (3, 4, 5):
        pool.free(seq_id)
    assert pool.allocate_prompt(7, prompt_a) == 0  # a was forgotten
    pool.check_invariants()


def test_reset_prefix_cache_forgets_every_prefix_but_keeps_the_sequences():
    pool = BlockPool(8, 4)
    prompt = list(range(9))
    pool.allocate_prompt(1, prompt)
    pool.allocate_prompt(2, prompt)
    pool.free(2)
    assert pool.num_cached_blocks() == 2
    pool.reset_prefix_cache()
    assert pool.num_cached_blocks() == 0 and keyed_blocks(pool) == []
    assert pool.block_table(1) == [0, 1, 2] and pool.num_tokens(1) == 9  # live sequences are untouched
    pool.check_invariants()
    assert pool.allocate_prompt(3, prompt) == 0  # stale KV is never served
    assert 0 not in pool.block_table(3) and keyed_blocks(pool) == pool.block_table(3)[:2]
    pool.check_invariants()


def test_allocate_prompt_out_of_blocks_changes_nothing():
    pool = BlockPool(5, 2)
    prompt = [1, 2, 3, 4, 5]
    pool.allocate_prompt(1, prompt)  # [0, 1, 2], keyed 0, 1
    pool.allocate(2, 4)  # [3, 4]
    pool.free(1)  # 3 free blocks, two of them cached
    queries, hits = pool.prefix_queries(), pool.prefix_hits()
    # Two cached blocks revive, and the other three must be fresh: but the revived ones cannot double as fresh
    # blocks, so only 1 of the 3 free blocks is available.
    msg = r"BlockPool.allocate_prompt: out of KV blocks: need 3 \(2 of the prompt's 5 blocks cached\), free 1 of 5"
    with pytest.raises(OutOfBlocksError, match=msg):
        pool.allocate_prompt(3, prompt[:4] + [7, 7, 7, 7, 7])
    assert not pool.has_sequence(3) and pool.num_free_blocks() == 3 and keyed_blocks(pool) == [0, 1]
    assert (pool.prefix_queries(), pool.prefix_hits()) == (queries, hits)
    pool.check_invariants()
    assert pool.allocate(4, 6) == [2, 1, 0]  # the free list kept its order (and the keys were evicted now)
    assert pool.num_cached_blocks() == 0
    with pytest.raises(ValueError, match="BlockPool.allocate_prompt: seq_id 4 already exists"):
        pool.allocate_prompt(4, [1])
    with pytest.raises(ValueError, match=r"BlockPool.block_key: block_id 5 out of range \[0, 5\)"):
        pool.block_key(5)
