"""write_kv / copy_blocks (torch.ops.rlhf_engine, CPU kernels) against plain torch indexing."""

from __future__ import annotations

import pytest
import torch

from rlhf_engine.kv_cache import BlockPool, copy_blocks, has_cuda, write_kv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The CUDA kernels run through the same tests wherever they were built and a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if has_cuda() and torch.cuda.is_available() else [])
# Deliberately awkward: 37 blocks of 16 slots, 3 kv heads of dim 40, 301 tokens.
NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, NUM_TOKENS = 37, 16, 3, 40, 301


def make_caches(
    dtype, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, kv_heads=KV_HEADS, head_dim=HEAD_DIM, device="cpu"
):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape).to(device, dtype), torch.randn(shape).to(device, dtype)


def make_slots(num_tokens, num_slots, pad_every=7):
    slots = torch.randperm(num_slots)[:num_tokens]
    slots[::pad_every] = -1  # padding
    return slots


def reference_write_kv(key, value, key_cache, value_cache, slot_mapping):
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    keep = slot_mapping >= 0
    key_cache.view(-1, *key_cache.shape[2:]).index_put_((slot_mapping[keep],), key[keep])
    value_cache.view(-1, *value_cache.shape[2:]).index_put_((slot_mapping[keep],), value[keep])
    return key_cache, value_cache


def reference_copy_blocks(key_cache, value_cache, pairs):
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    for src, dst in pairs:
        key_cache[dst] = key_cache[src]
        value_cache[dst] = value_cache[src]
    return key_cache, value_cache


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_index_put(dtype, device):
    torch.manual_seed(0)
    key_cache, value_cache = make_caches(dtype, device=device)
    key = torch.randn(NUM_TOKENS, KV_HEADS, HEAD_DIM).to(device, dtype)
    value = torch.randn(NUM_TOKENS, KV_HEADS, HEAD_DIM).to(device, dtype)
    slots = make_slots(NUM_TOKENS, NUM_BLOCKS * BLOCK_SIZE).to(device)
    expected = reference_write_kv(key, value, key_cache, value_cache, slots)
    write_kv(key, value, key_cache, value_cache, slots)
    # A copy is exact: every cache slot, written or not, must match bit for bit.
    assert torch.equal(key_cache, expected[0]) and torch.equal(value_cache, expected[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_from_a_fused_qkv_slice(dtype, device):
    torch.manual_seed(1)
    key_cache, value_cache = make_caches(dtype, device=device)
    qkv = torch.randn(NUM_TOKENS, 3, KV_HEADS, HEAD_DIM).to(device, dtype)
    key, value = qkv[:, 1], qkv[:, 2]  # token stride 3 * kv_heads * head_dim
    assert not key.is_contiguous()
    slots = make_slots(NUM_TOKENS, NUM_BLOCKS * BLOCK_SIZE, pad_every=5).to(device)
    expected = reference_write_kv(key, value, key_cache, value_cache, slots)
    write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected[0]) and torch.equal(value_cache, expected[1])


def test_write_kv_all_padding_and_no_tokens_change_nothing():
    key_cache, value_cache = make_caches(torch.float32)
    before = key_cache.clone(), value_cache.clone()
    key = torch.randn(4, KV_HEADS, HEAD_DIM)
    write_kv(key, key, key_cache, value_cache, torch.full((4,), -1))
    empty = torch.empty(0, KV_HEADS, HEAD_DIM)
    write_kv(empty, empty, key_cache, value_cache, torch.empty(0, dtype=torch.int64))
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_matches_reference(dtype, device):
    torch.manual_seed(2)
    key_cache, value_cache = make_caches(dtype, device=device)
    pairs = [(3, 0), (3, 36), (10, 11), (35, 2), (20, 21)]  # a source may be copied more than once
    expected = reference_copy_blocks(key_cache, value_cache, pairs)
    copy_blocks(key_cache, value_cache, torch.tensor(pairs))
    assert torch.equal(key_cache, expected[0]) and torch.equal(value_cache, expected[1])
    copy_blocks(key_cache, value_cache, [])  # nothing to copy
    assert torch.equal(key_cache, expected[0])


def test_block_pool_drives_the_cache_through_fork_and_copy_on_write():
    """Prefill a prompt, fork it into two samples, decode both: each sample must read back exactly its own
    tokens through its block table, although they shared the prompt's blocks."""
    torch.manual_seed(3)
    block_size, kv_heads, head_dim = 4, 2, 8
    pool = BlockPool(16, block_size)
    key_cache, value_cache = make_caches(torch.float32, 16, block_size, kv_heads, head_dim)
    prompt_k, prompt_v = torch.randn(6, kv_heads, head_dim), torch.randn(6, kv_heads, head_dim)
    pool.allocate(0, 6)
    write_kv(prompt_k, prompt_v, key_cache, value_cache, torch.tensor(pool.slot_mapping(0, 0, 6)))
    pool.fork(0, 1)
    history = {0: [prompt_k, prompt_v], 1: [prompt_k, prompt_v]}
    copies = 0
    for _ in range(7):
        for seq_id in (0, 1):
            slot, cow_src, cow_dst = pool.append_slot(seq_id)
            if cow_src >= 0:
                copy_blocks(key_cache, value_cache, [(cow_src, cow_dst)])
                copies += 1
            k, v = torch.randn(1, kv_heads, head_dim), torch.randn(1, kv_heads, head_dim)
            write_kv(k, v, key_cache, value_cache, torch.tensor([slot]))
            history[seq_id] = [torch.cat([history[seq_id][0], k]), torch.cat([history[seq_id][1], v])]
    assert copies == 1  # only seq 0's first write into the shared, half-full block 1
    for seq_id, (keys, values) in history.items():
        slots = torch.tensor(pool.slot_mapping(seq_id, 0, pool.num_tokens(seq_id)))
        assert torch.equal(key_cache.view(-1, kv_heads, head_dim)[slots], keys)
        assert torch.equal(value_cache.view(-1, kv_heads, head_dim)[slots], values)
    pool.check_invariants()


def _write_kv_args(**changes):
    key_cache, value_cache = make_caches(torch.float32, 4, 2, 2, 8)
    args = {
        "key": torch.randn(3, 2, 8),
        "value": torch.randn(3, 2, 8),
        "key_cache": key_cache,
        "value_cache": value_cache,
        "slot_mapping": torch.tensor([0, 5, -1]),
    }
    args.update(changes)
    return args


WRITE_KV_BAD = [
    ({"key": torch.randn(3, 16)}, r"key must be \[num_tokens, kv_heads, head_dim\]"),
    ({"value": torch.randn(3, 2, 4)}, r"value must be \[num_tokens, kv_heads, head_dim\].*\(2, 8\)"),
    ({"key": torch.randn(3, 2, 8, dtype=torch.float64)}, "key dtype torch.float64 must match the cache dtype"),
    ({"value": torch.randn(3, 2, 8).half()}, "value dtype torch.float16 must match"),
    ({"key": torch.randn(3, 8, 2).transpose(1, 2)}, r"key must be contiguous in \(kv_heads, head_dim\)"),
    ({"value_cache": torch.randn(4, 2, 2, 4)}, "value_cache must have the shape of key_cache"),
    ({"key_cache": torch.randn(8, 2, 8)}, r"key_cache must be \[num_blocks, block_size, kv_heads, head_dim\]"),
    ({"value_cache": torch.randn(4, 2, 2, 8).bfloat16()}, "value_cache dtype torch.bfloat16 differs"),
    ({"key_cache": torch.randn(2, 4, 2, 8).transpose(0, 1)}, "key_cache must be contiguous"),
    (
        {"key_cache": torch.randn(4, 2, 2, 8).double(), "value_cache": torch.randn(4, 2, 2, 8).double()},
        "key_cache dtype must be float32, bfloat16 or float16",
    ),
    ({"slot_mapping": torch.tensor([0, 5, -1], dtype=torch.int32)}, r"slot_mapping must be int64.*\.long\(\)"),
    ({"slot_mapping": torch.tensor([0, 5])}, r"slot_mapping must be \[num_tokens\] = \[3\]"),
    ({"key_cache": torch.randn(4, 2, 2, 8, device="meta")}, "value_cache is on cpu but key_cache is on meta"),
]


@pytest.mark.parametrize("changes, message", WRITE_KV_BAD)
def test_write_kv_rejects_bad_arguments_by_name(changes, message):
    args = _write_kv_args(**changes)
    with pytest.raises(ValueError, match=message):
        write_kv(**args)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"key": torch.randn(3, 2, 4)}, r"write_kv: key .* does not match key_cache"),
        ({"value": torch.randn(3, 2, 8).half()}, "write_kv: key Float and value Half must have the cache dtype"),
        ({"key": torch.randn(3, 8, 2).transpose(1, 2)}, r"must be contiguous in \(kv_heads, head_dim\)"),
        ({"slot_mapping": torch.tensor([0, 5, -1], dtype=torch.int32)}, "slot_mapping must be int64, found Int"),
        ({"slot_mapping": torch.tensor([0, 8, -1])}, r"slot_mapping\[1\] = 8 out of range \[-1, 8\)"),
        ({"slot_mapping": torch.tensor([0, 1, -2])}, r"slot_mapping\[2\] = -2 out of range"),
    ],
)
def test_native_write_kv_checks_its_inputs(changes, message):
    """The op itself, called without the Python layer, checks too; a bad slot leaves the caches untouched."""
    args = _write_kv_args(**changes)
    before = args["key_cache"].clone(), args["value_cache"].clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rlhf_engine.write_kv(*args.values())
    assert torch.equal(args["key_cache"], before[0]) and torch.equal(args["value_cache"], before[1])


@pytest.mark.parametrize(
    "block_mapping, error, message",
    [
        (torch.tensor([[0, 1, 2]]), ValueError, r"block_mapping must be \[num_pairs, 2\]"),
        (torch.tensor([[0, 1]], dtype=torch.int32), ValueError, "block_mapping must be int64"),
        (torch.tensor([[0, 1]], device="meta"), ValueError, "block_mapping must stay on the CPU"),
        ([(0, 4)], RuntimeError, r"block_mapping\[0\] = \(0, 4\) out of range \[0, 4\)"),
        ([(1, 0), (-1, 2)], RuntimeError, r"block_mapping\[1\] = \(-1, 2\) out of range"),
        ([(0, 1), (2, 1)], RuntimeError, "block 1 is a destination twice"),
        ([(0, 1), (1, 2)], RuntimeError, "block 1 is both a source and a destination"),
    ],
)
def test_copy_blocks_rejects_bad_mappings(block_mapping, error, message):
    key_cache, value_cache = make_caches(torch.float32, 4, 2, 2, 8)
    before = key_cache.clone(), value_cache.clone()
    with pytest.raises(error, match=message):
        copy_blocks(key_cache, value_cache, block_mapping)
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    torch.manual_seed(4)
    key_cache, value_cache = make_caches(dtype, 5, 4, 2, 8, device=device)
    key, value = torch.randn(6, 2, 8).to(device, dtype), torch.randn(6, 2, 8).to(device, dtype)
    slots = torch.tensor([0, 3, -1, 19, 7, 12], device=device)
    torch.library.opcheck(torch.ops.rlhf_engine.write_kv.default, (key, value, key_cache, value_cache, slots))
    mapping = torch.tensor([[0, 1], [0, 2], [4, 3]])
    torch.library.opcheck(torch.ops.rlhf_engine.copy_blocks.default, (key_cache, value_cache, mapping))


def test_meta_kernels_check_shapes_without_data():
    """FakeTensor / torch.compile trace through the Meta kernels: they must accept good shapes and refuse bad ones."""
    key_cache, value_cache = (torch.empty(4, 2, 2, 8, device="meta") for _ in range(2))
    key = torch.empty(3, 2, 8, device="meta")
    slots = torch.empty(3, dtype=torch.int64, device="meta")
    torch.ops.rlhf_engine.write_kv(key, key, key_cache, value_cache, slots)
    torch.ops.rlhf_engine.copy_blocks(key_cache, value_cache, torch.empty(2, 2, dtype=torch.int64, device="meta"))
    with pytest.raises(RuntimeError, match=r"slot_mapping must be \[num_tokens\] = \[3\]"):
        torch.ops.rlhf_engine.write_kv(key, key, key_cache, value_cache, slots[:2])
    with pytest.raises(RuntimeError, match=r"block_mapping must be \[num_pairs, 2\]"):
        torch.ops.rlhf_engine.copy_blocks(key_cache, value_cache, torch.empty(2, 3, dtype=torch.int64, device="meta"))
