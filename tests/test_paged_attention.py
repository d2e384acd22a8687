"""paged_attention (torch.ops.rlhf_engine, CPU kernel; CUDA where built) against dense SDPA on the same K/V."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.kv_cache import BlockPool, copy_blocks, has_cuda, paged_attention, write_kv

DEVICES = ["cpu"] + (["cuda"] if has_cuda() and torch.cuda.is_available() else [])
# (dtype, atol): the kernel's error against a float64 reference may be at most twice eager SDPA's in the same dtype,
# plus atol (fp32 rounding of the reference path itself).
TOLERANCES = [(torch.float32, 2e-6), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)]


def make_problem(seed, num_seqs, num_heads, kv_heads, head_dim, block_size, lens, dtype, device="cpu", spare=5):
    """Random caches holding the sequences' blocks in shuffled order, block tables padded with -1 beyond each
    sequence's blocks, int32 or int64 index tensors alternating with the seed."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    max_blocks = max(blocks_per_seq) + 1  # at least one padding column
    num_blocks = sum(blocks_per_seq) + spare
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(device, dtype)
    value_cache = torch.randn(shape, generator=gen).to(device, dtype)
    query = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(device, dtype)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((num_seqs, max_blocks), -1, dtype=torch.int64)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor(ids[:n], dtype=torch.int64)
        ids = ids[n:]
    index_dtype = torch.int32 if seed % 2 else torch.int64
    context_lens = torch.tensor(lens, dtype=index_dtype)
    return query, key_cache, value_cache, tables.to(device, index_dtype), context_lens.to(device)


def dense_sdpa(query, key_cache, value_cache, block_tables, context_lens, scale, dtype=None):
    """Gathers each sequence's K/V densely through its block table, pads to the longest context and runs
    F.scaled_dot_product_attention with a padding mask, in `dtype` (default: the inputs')."""
    dtype = dtype or query.dtype
    num_seqs, num_heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    max_len = int(context_lens.max())
    used = -(-max_len // block_size)
    ids = block_tables[:, :used].long().clamp(min=0)  # padding ids are masked out below
    keys = key_cache[ids].reshape(num_seqs, used * block_size, kv_heads, head_dim)[:, :max_len]
    values = value_cache[ids].reshape(num_seqs, used * block_size, kv_heads, head_dim)[:, :max_len]
    keys = keys.transpose(1, 2).repeat_interleave(num_heads // kv_heads, 1).to(dtype)  # (B, H, L, D)
    values = values.transpose(1, 2).repeat_interleave(num_heads // kv_heads, 1).to(dtype)
    mask = torch.arange(max_len, device=query.device)[None, :] < context_lens[:, None].to(query.device)
    out = F.scaled_dot_product_attention(
        query.to(dtype)[:, :, None], keys, values, attn_mask=mask[:, None, None, :], scale=scale
    )
    return out[:, :, 0]  # (B, H, D)


def assert_close_to_reference(out, problem, scale, atol):
    query = problem[0]
    reference = dense_sdpa(*problem, scale, dtype=torch.float64)
    eager = dense_sdpa(*problem, scale)  # eager PyTorch in the kernel's dtype
    assert out.dtype == query.dtype and out.shape == query.shape
    ours_err = (out.double() - reference).abs().max().item()
    eager_err = (eager.double() - reference).abs().max().item()
    assert ours_err <= 2 * eager_err + atol, f"error {ours_err:.3g}, eager {query.dtype} SDPA {eager_err:.3g}"


# (num_seqs, kv_heads, head_dim, block_size, lens): lengths 1, exact block multiples and ragged ones; head_dim 36
# and 40 exercise the scalar tail after the 8-wide vectors; block_size 1 makes every token its own block.
SHAPES = [
    (4, 2, 64, 16, [1, 16, 37, 64]),
    (3, 1, 128, 8, [8, 1, 129]),
    (5, 3, 40, 16, [33, 2, 48, 15, 1]),
    (2, 2, 36, 4, [7, 12]),
    (3, 1, 64, 1, [1, 5, 3]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol", TOLERANCES, ids=[str(d) for d, _ in TOLERANCES])
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_matches_dense_sdpa(shape, gqa, dtype, atol, device):
    num_seqs, kv_heads, head_dim, block_size, lens = SHAPES[shape]
    problem = make_problem(
        shape * 10 + gqa, num_seqs, kv_heads * gqa, kv_heads, head_dim, block_size, lens, dtype, device
    )
    scale = 1.0 / math.sqrt(head_dim)
    assert_close_to_reference(paged_attention(*problem), problem, scale, atol)


def windowed_reference(query, key_cache, value_cache, block_tables, context_lens, scale, window, softcap, dtype):
    """Eager attention over each sequence's last ``window`` tokens (all when None), scores soft-capped, in
    ``dtype``: the float64 reference, and eager PyTorch in the kernel's dtype."""
    num_heads, block_size, kv_heads = query.shape[1], key_cache.shape[1], key_cache.shape[2]
    out = []
    for b, n in enumerate(context_lens.tolist()):
        ids = block_tables[b, : -(-n // block_size)].long()
        keys = key_cache[ids].flatten(0, 1)[:n].to(dtype)  # (n, KV, D)
        values = value_cache[ids].flatten(0, 1)[:n].to(dtype)
        first = max(0, n - window) if window else 0
        keys = keys[first:].repeat_interleave(num_heads // kv_heads, 1)  # (n', H, D)
        values = values[first:].repeat_interleave(num_heads // kv_heads, 1)
        scores = torch.einsum("hd,thd->ht", query[b].to(dtype), keys) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), values))
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol", TOLERANCES, ids=[str(d) for d, _ in TOLERANCES])
@pytest.mark.parametrize("window, softcap", [(5, None), (16, None), (1, None), (None, 2.5), (7, 1.0)])
def test_sliding_window_and_softcap(window, softcap, dtype, atol, device):
    """Windows that start mid-block, at a block boundary, of one token; contexts shorter than the window; soft
    caps small enough to bend most scores."""
    problem = make_problem(3, 5, 4, 2, 40, 4, [1, 6, 17, 32, 9], dtype, device)
    scale = 0.4
    out = paged_attention(*problem, scale=scale, sliding_window=window, softcap=softcap)
    reference = windowed_reference(*problem, scale, window, softcap, torch.float64)
    eager = windowed_reference(*problem, scale, window, softcap, dtype)
    ours_err = (out.double() - reference).abs().max().item()
    eager_err = (eager.double() - reference).abs().max().item()
    assert ours_err <= 2 * eager_err + atol, f"error {ours_err:.3g}, eager {dtype} {eager_err:.3g}"
    if window is not None or softcap is not None:  # the options change the result
        assert (out.double() - windowed_reference(*problem, scale, None, None, torch.float64)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        paged_attention(*problem, sliding_window=0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        paged_attention(*problem, softcap=-1.0)


def test_random_shapes():
    rng = random.Random(0)
    for seed in range(12):
        kv_heads, gqa, block_size = rng.choice([1, 2, 4]), rng.choice([1, 2, 4]), rng.choice([2, 8, 16])
        head_dim = rng.choice([8, 24, 64, 80, 128])
        lens = [rng.choice([1, block_size, 3 * block_size, rng.randrange(1, 200)]) for _ in range(rng.randrange(1, 7))]
        problem = make_problem(seed, len(lens), kv_heads * gqa, kv_heads, head_dim, block_size, lens, torch.float32)
        scale = rng.uniform(0.05, 0.5)
        assert_close_to_reference(paged_attention(*problem, scale=scale), problem, scale, 2e-6)


def test_default_scale_and_index_dtypes():
    problem = make_problem(3, 3, 8, 2, 64, 16, [5, 40, 16], torch.float32)
    query, key_cache, value_cache, tables, lens = problem
    out = paged_attention(*problem)
    assert torch.equal(out, paged_attention(*problem, scale=1 / 8))
    # int32 and int64 index tensors read the same blocks: bit-identical outputs.
    assert torch.equal(out, paged_attention(query, key_cache, value_cache, tables.long(), lens.int()))
    assert torch.equal(out, paged_attention(query, key_cache, value_cache, tables.int(), lens.long()))


def test_table_padding_is_never_read_and_empty_contexts_give_zeros():
    query, key_cache, value_cache, tables, lens = make_problem(4, 3, 4, 2, 32, 8, [9, 8, 1], torch.float32)
    out = paged_attention(query, key_cache, value_cache, tables, lens)
    # Garbage past each context's blocks changes nothing.
    garbage = tables.clone()
    garbage[0, 2:] = 10**6
    garbage[1, 1:] = -7
    garbage[2, 1:] = key_cache.shape[0]
    assert torch.equal(paged_attention(query, key_cache, value_cache, garbage, lens), out)
    # A sequence with no context (a padding row of the batch) gets zeros, and the others are unaffected.
    zero_lens = lens.clone()
    zero_lens[1] = 0
    out0 = paged_attention(query, key_cache, value_cache, tables, zero_lens)
    assert torch.equal(out0[1], torch.zeros_like(out0[1]))
    assert torch.equal(out0[[0, 2]], out[[0, 2]])


def test_query_may_be_a_strided_slice():
    query, key_cache, value_cache, tables, lens = make_problem(5, 3, 8, 4, 64, 16, [20, 3, 50], torch.float32)
    qkv = torch.randn(3, 3, 8, 64)
    qkv[:, 0] = query
    assert not qkv[:, 0].is_contiguous()
    expected = paged_attention(query, key_cache, value_cache, tables, lens)
    assert torch.equal(paged_attention(qkv[:, 0], key_cache, value_cache, tables, lens), expected)
    assert torch.equal(
        torch.ops.rlhf_engine.paged_attention(qkv[:, 0], key_cache, value_cache, tables, lens, 0.125), expected
    )


@pytest.mark.parametrize("device", DEVICES)
def test_every_fp16_value_is_read_exactly(device):
    """With one cached token the softmax weight is exactly 1, so the output is the value vector itself: all 65536
    fp16 bit patterns (subnormals, infinities and NaN included) must come back unchanged, which checks the kernel's
    half -> float conversion exhaustively."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16).reshape(512, 1, 1, 128).to(device)  # [num_blocks, block_size, kv_heads, D]
    keys = torch.ones_like(values)
    query = torch.ones(512, 1, 128, dtype=torch.float16, device=device)
    tables = torch.arange(512, dtype=torch.int32, device=device)[:, None]
    out = paged_attention(query, keys, values, tables, torch.ones(512, dtype=torch.int32, device=device))
    expected = values.reshape(512, 1, 128)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan], expected[~nan])  # -0 may come back as +0, which compares equal


def test_baseline_simd_path_matches():
    """The kernel is compiled twice (x86-64 baseline and AVX2+FMA, picked at run time); ATEN_CPU_CAPABILITY=default
    forces the baseline copy, which must agree as well."""
    script = """
import math, sys, torch
sys.path.insert(0, sys.argv[1])
from test_paged_attention import SHAPES, make_problem, assert_close_to_reference, TOLERANCES
from rlhf_engine.kv_cache import paged_attention
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
for dtype, atol in TOLERANCES:
    for i, (num_seqs, kv_heads, head_dim, block_size, lens) in enumerate(SHAPES):
        problem = make_problem(i, num_seqs, 2 * kv_heads, kv_heads, head_dim, block_size, lens, dtype)
        assert_close_to_reference(paged_attention(*problem), problem, 1 / math.sqrt(head_dim), atol)
print("ok")
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", script, tests_dir], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck(dtype, device):
    query, key_cache, value_cache, tables, lens = make_problem(6, 3, 4, 2, 16, 4, [5, 1, 8], dtype, device)
    torch.library.opcheck(
        torch.ops.rlhf_engine.paged_attention.default, (query, key_cache, value_cache, tables, lens, 0.25)
    )


def test_meta_kernel_gives_the_output_shape():
    query = torch.empty(3, 8, 64, device="meta", dtype=torch.bfloat16)
    cache = torch.empty(10, 16, 2, 64, device="meta", dtype=torch.bfloat16)
    tables = torch.empty(3, 4, device="meta", dtype=torch.int32)
    lens = torch.empty(3, device="meta", dtype=torch.int64)
    out = torch.ops.rlhf_engine.paged_attention(query, cache, cache, tables, lens, 0.125)
    assert out.shape == (3, 8, 64) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="kv_heads 2 .* must divide num_heads 7"):
        torch.ops.rlhf_engine.paged_attention(query[:, :7], cache, cache, tables, lens, 0.125)


def test_decode_through_the_block_pool_with_prefix_sharing():
    """Two prompts sharing a cached prefix, each forked into two samples, decoded token by token through the pool
    (allocate_prompt, fork, append_slot with copy-on-write, write_kv, copy_blocks): each sample's paged attention
    must equal dense attention over exactly its own history."""
    torch.manual_seed(7)
    block_size, kv_heads, num_heads, head_dim = 4, 2, 4, 16
    pool = BlockPool(32, block_size)
    key_cache = torch.zeros(32, block_size, kv_heads, head_dim)
    value_cache = torch.zeros_like(key_cache)
    kv_of_token: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # KV is a function of the prefix

    def kv(prefix):
        if prefix not in kv_of_token:
            kv_of_token[prefix] = torch.randn(kv_heads, head_dim), torch.randn(kv_heads, head_dim)
        return kv_of_token[prefix]

    history: dict[int, list[int]] = {}
    system = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    for seq_id, prompt in ((0, system + [10, 11]), (1, system + [12])):
        cached = pool.allocate_prompt(seq_id, prompt)
        slots = pool.slot_mapping(seq_id, cached, len(prompt))
        new = [kv(tuple(prompt[: t + 1])) for t in range(cached, len(prompt))]
        write_kv(
            torch.stack([k for k, _ in new]),
            torch.stack([v for _, v in new]),
            key_cache,
            value_cache,
            torch.tensor(slots),
        )
        history[seq_id] = list(prompt)
    assert pool.prefix_hits() == 2  # the second prompt reused the system prompt's two full blocks
    for parent, child in ((0, 2), (1, 3)):
        pool.fork(parent, child)
        history[child] = list(history[parent])
    for step in range(6):
        for seq_id in sorted(history):
            token = 100 * seq_id + step
            slot, cow_src, cow_dst = pool.append_slot(seq_id)
            if cow_src >= 0:
                copy_blocks(key_cache, value_cache, [(cow_src, cow_dst)])
            history[seq_id].append(token)
            k, v = kv(tuple(history[seq_id]))
            write_kv(k[None], v[None], key_cache, value_cache, torch.tensor([slot]))
        pool.check_invariants()
    seq_ids = sorted(history)
    max_blocks = max(len(pool.block_table(s)) for s in seq_ids)
    tables = torch.tensor([pool.block_table(s) + [-1] * (max_blocks - len(pool.block_table(s))) for s in seq_ids])
    lens = torch.tensor([pool.num_tokens(s) for s in seq_ids])
    query = torch.randn(len(seq_ids), num_heads, head_dim)
    out = paged_attention(query, key_cache, value_cache, tables, lens)
    for i, s in enumerate(seq_ids):
        keys = torch.stack([kv(tuple(history[s][: t + 1]))[0] for t in range(len(history[s]))])  # (L, kv_heads, D)
        values = torch.stack([kv(tuple(history[s][: t + 1]))[1] for t in range(len(history[s]))])
        expected = F.scaled_dot_product_attention(
            query[i][:, None], keys.transpose(0, 1), values.transpose(0, 1), enable_gqa=True
        )[:, 0]
        torch.testing.assert_close(out[i], expected, atol=2e-6, rtol=1e-5)


def _args(**changes):
    query, key_cache, value_cache, tables, lens = make_problem(8, 2, 4, 2, 8, 4, [5, 8], torch.float32, spare=3)
    args = {
        "query": query,
        "key_cache": key_cache,
        "value_cache": value_cache,
        "block_tables": tables,
        "context_lens": lens,
    }
    args.update(changes)
    return args


BAD_ARGS = [
    ({"query": torch.randn(2, 32)}, r"query must be \[num_seqs, num_heads, head_dim\]"),
    ({"query": torch.randn(2, 4, 8).bfloat16()}, "query dtype torch.bfloat16 must match the cache dtype"),
    ({"query": torch.randn(2, 3, 8)}, r"kv_heads 2 \(key_cache.shape\[2\]\) must divide num_heads 3"),
    ({"query": torch.randn(2, 4, 16)}, "query head_dim 16 differs from the cache head_dim 8"),
    (
        {
            "key_cache": torch.randn(7, 4, 2, 8).double(),
            "value_cache": torch.randn(7, 4, 2, 8).double(),
            "query": torch.randn(2, 4, 8).double(),
        },
        "key_cache dtype must be float32, bfloat16 or float16",
    ),
    ({"value_cache": torch.randn(7, 4, 2, 8).half()}, "value_cache dtype torch.float16 differs"),
    ({"block_tables": torch.zeros(2, 3)}, "block_tables must be int32 or int64, found torch.float32"),
    ({"block_tables": torch.zeros(3, 3, dtype=torch.int32)}, r"block_tables must be \[num_seqs, max_blocks_per_seq\]"),
    ({"context_lens": torch.tensor([5.0, 8.0])}, "context_lens must be int32 or int64, found torch.float32"),
    ({"context_lens": torch.tensor([[5, 8]])}, r"context_lens must be \[num_seqs\] = \[2\]"),
    ({"context_lens": torch.tensor([5, 8], device="meta")}, "context_lens is on meta but the caches are on cpu"),
    # Values, checked by the native op (on the CPU) before anything is computed.
    ({"context_lens": torch.tensor([5, 13])}, r"context_lens\[1\] = 13 out of range \[0, 12\] \(max_blocks_per_seq"),
    ({"context_lens": torch.tensor([-1, 8])}, r"context_lens\[0\] = -1 out of range"),
]


@pytest.mark.parametrize("changes, message", BAD_ARGS)
def test_rejects_bad_arguments_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        paged_attention(**_args(**changes))


@pytest.mark.parametrize("bad_id", [-1, 7, 2**40])
def test_rejects_block_ids_out_of_range(bad_id):
    args = _args()
    args["block_tables"] = args["block_tables"].long()
    args["block_tables"][1, 1] = bad_id  # sequence 1 has 8 tokens: its second block is read
    with pytest.raises(ValueError, match=rf"block_tables\[1, 1\] = {bad_id} out of range \[0, 7\) \(num_blocks\)"):
        paged_attention(**args)


def test_native_op_checks_its_inputs():
    """The op itself, called without the Python layer, checks too."""
    args = _args()
    cases = [
        ({"query": torch.randn(2, 3, 8)}, "kv_heads 2 .* must divide num_heads 3"),
        ({"block_tables": args["block_tables"].t()}, r"block_tables must be \[num_seqs, max_blocks_per_seq\]"),
        ({"block_tables": args["block_tables"][:, ::2]}, "block_tables must be contiguous"),
        ({"query": torch.randn(2, 4, 8).half()}, "query dtype Half must be the cache dtype Float"),
        ({"query": torch.randn(2, 4, 16)[:, :, ::2]}, "query must be contiguous in head_dim"),
    ]
    for changes, message in cases:
        bad = {**args, **changes}
        with pytest.raises(RuntimeError, match=message):
            torch.ops.rlhf_engine.paged_attention(*bad.values(), 0.5)
