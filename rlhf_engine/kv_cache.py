"""Python face of the paged KV cache: the block pool and the cache ops of rlhf_engine._C.

A layer's cache is a pair of tensors ``key_cache``, ``value_cache`` of shape
``[num_blocks, block_size, kv_heads, head_dim]``. Token ``t`` of a sequence lives in slot
``block_table[t // block_size] * block_size + t % block_size`` of the flattened ``[num_blocks * block_size, ...]``
view. :class:`BlockPool` does the bookkeeping (which blocks a sequence holds, which full prompt blocks are cached);
:func:`write_kv` and :func:`copy_blocks` move the tensor data and :func:`paged_attention` reads it (CPU kernels
always, CUDA kernels when :func:`has_cuda`).

Prefill of a prompt, reusing the cached KV of its longest cached prefix, then ``n`` samples sharing it::

    cached = pool.allocate_prompt(seq_id, prompt_ids)  # tokens [0, cached) already have their KV
    slots = torch.tensor(pool.slot_mapping(seq_id, cached, len(prompt_ids)))
    ...  # run the model on prompt_ids[cached:] (attending to the cached prefix), write_kv(k, v, ..., slots)
    for child_id in sample_ids:
        pool.fork(seq_id, child_id)

A decode step, per live sequence::

    slot, cow_src, cow_dst = pool.append_slot(seq_id)
    if cow_src >= 0:  # the last block was shared with a fork: this sequence now owns a copy
        copy_blocks(key_cache, value_cache, [(cow_src, cow_dst)])
    write_kv(key, value, key_cache, value_cache, torch.tensor([slot], device=key.device))

and for the whole batch, ``paged_attention(query, key_cache, value_cache, block_tables, context_lens)``. After every
optimizer step the cached prefixes are stale: call ``pool.reset_prefix_cache()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlhf_engine import _C

__all__ = ["BlockPool", "OutOfBlocksError", "copy_blocks", "has_cuda", "paged_attention", "write_kv"]

BlockPool = _C.BlockPool
"""Paged block pool with prefix caching: ``BlockPool(num_blocks, block_size)``; see ``help(BlockPool)``."""

OutOfBlocksError = _C.OutOfBlocksError
"""Raised (a RuntimeError) when the pool has too few free blocks; the pool is left unchanged."""

_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def has_cuda() -> bool:
    """Whether the CUDA kernels of the cache ops were compiled into this build."""
    return _C.has_cuda()


def _check_caches(fn: str, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4:
        raise ValueError(
            f"{fn}: key_cache must be [num_blocks, block_size, kv_heads, head_dim], "
            f"found shape {tuple(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"{fn}: value_cache must have the shape of key_cache {tuple(key_cache.shape)}, "
            f"found {tuple(value_cache.shape)}"
        )
    if key_cache.dtype not in _KV_DTYPES:
        raise ValueError(f"{fn}: key_cache dtype must be float32, bfloat16 or float16, found {key_cache.dtype}")
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(f"{fn}: value_cache dtype {value_cache.dtype} differs from key_cache dtype {key_cache.dtype}")
    if value_cache.device != key_cache.device:
        raise ValueError(f"{fn}: value_cache is on {value_cache.device} but key_cache is on {key_cache.device}")
    if key_cache.device.type == "cuda" and not has_cuda():
        raise ValueError(
            f"{fn}: the caches are on {key_cache.device} but rlhf_engine._C was built without CUDA; "
            "rebuild with RLHF_ENGINE_CUDA=1 or keep the cache on the CPU"
        )
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not cache.is_contiguous():
            raise ValueError(
                f"{fn}: {name} must be contiguous (the kernels address it by block), found strides {cache.stride()}"
            )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its cache slot, in place.

    Args:
        key, value: ``[num_tokens, kv_heads, head_dim]``; a token stride is fine (e.g. a slice of a fused qkv
            output) as long as each token's ``(kv_heads, head_dim)`` block is contiguous.
        key_cache, value_cache: ``[num_blocks, block_size, kv_heads, head_dim]``, contiguous, dtype of ``key``.
        slot_mapping: int64 ``[num_tokens]`` on the cache device; ``key_cache.view(-1, kv_heads, head_dim)[slot]
            = key[t]`` for ``slot = slot_mapping[t]``; ``-1`` marks padding, skipped. Each slot at most once.

    On the CPU an out-of-range slot raises before anything is written; on CUDA (where checking would sync the
    stream) such a slot is skipped.
    """
    _check_caches("write_kv", key_cache, value_cache)
    cache_row = tuple(key_cache.shape[2:])
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or tuple(t.shape[1:]) != cache_row:
            raise ValueError(
                f"write_kv: {name} must be [num_tokens, kv_heads, head_dim] with (kv_heads, head_dim) = {cache_row} "
                f"from key_cache, found shape {tuple(t.shape)}"
            )
        if t.dtype != key_cache.dtype:
            raise ValueError(f"write_kv: {name} dtype {t.dtype} must match the cache dtype {key_cache.dtype}")
        if t.device != key_cache.device:
            raise ValueError(f"write_kv: {name} is on {t.device} but the caches are on {key_cache.device}")
        if t.shape[0] > 0 and not t[0].is_contiguous():
            raise ValueError(
                f"write_kv: {name} must be contiguous in (kv_heads, head_dim), found strides {t.stride()}; "
                "call .contiguous()"
            )
    if value.shape[0] != key.shape[0]:
        raise ValueError(f"write_kv: value has {value.shape[0]} tokens but key has {key.shape[0]}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(
            f"write_kv: slot_mapping must be [num_tokens] = [{key.shape[0]}], found shape {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"write_kv: slot_mapping must be int64, found {slot_mapping.dtype}; use .long()")
    if slot_mapping.device != key_cache.device:
        raise ValueError(
            f"write_kv: slot_mapping is on {slot_mapping.device} but the caches are on {key_cache.device}; "
            f"use .to({str(key_cache.device)!r})"
        )
    torch.ops.rlhf_engine.write_kv(key, value, key_cache, value_cache, slot_mapping.contiguous())


def copy_blocks(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_mapping: torch.Tensor | Sequence[tuple[int, int]],
) -> None:
    """Copy whole blocks inside both caches, in place: ``cache[dst] = cache[src]`` for each ``(src, dst)`` pair.

    Args:
        key_cache, value_cache: ``[num_blocks, block_size, kv_heads, head_dim]``, contiguous.
        block_mapping: int64 ``[num_pairs, 2]`` of ``(src, dst)`` block ids on the CPU (the ids are read on the
            host and copied to the device by the CUDA op), or a list of pairs such as the ``(cow_src, cow_dst)``
            reports of :meth:`BlockPool.append_slot`. No block may be a destination twice or both a source and a
            destination, so the copies are independent.
    """
    _check_caches("copy_blocks", key_cache, value_cache)
    if not isinstance(block_mapping, torch.Tensor):
        block_mapping = torch.tensor(block_mapping, dtype=torch.int64, device="cpu").reshape(-1, 2)
    if block_mapping.dim() != 2 or block_mapping.shape[1] != 2:
        raise ValueError(
            f"copy_blocks: block_mapping must be [num_pairs, 2] of (src, dst), found shape {tuple(block_mapping.shape)}"
        )
    if block_mapping.dtype != torch.int64:
        raise ValueError(f"copy_blocks: block_mapping must be int64, found {block_mapping.dtype}; use .long()")
    if block_mapping.device.type != "cpu":
        raise ValueError(
            f"copy_blocks: block_mapping must stay on the CPU (its ids are read on the host), found "
            f"{block_mapping.device}; build it on the host or call .cpu()"
        )
    torch.ops.rlhf_engine.copy_blocks(key_cache, value_cache, block_mapping.contiguous())


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache: one query token per sequence against its cached tokens.

    ``out[b, h] = softmax(scale * K_b @ query[b, h]) @ V_b`` where ``K_b``, ``V_b`` are the first ``context_lens[b]``
    tokens of sequence ``b`` (token ``t`` in block ``block_tables[b, t // block_size]`` at offset
    ``t % block_size``), kv head ``h // (num_heads // kv_heads)`` (grouped-query attention). fp32 accumulation with
    an online softmax; no gradient (decode only).

    Args:
        query: ``[num_seqs, num_heads, head_dim]`` in the cache dtype.
        key_cache, value_cache: ``[num_blocks, block_size, kv_heads, head_dim]``, contiguous; float32, bfloat16 or
            float16; ``kv_heads`` divides ``num_heads``.
        block_tables: int32 or int64 ``[num_seqs, max_blocks_per_seq]``; entries past the blocks a sequence's
            context needs are never read (pad with -1).
        context_lens: int32 or int64 ``[num_seqs]``, each in ``[0, max_blocks_per_seq * block_size]``; a sequence
            with 0 gets a zero output.
        scale: the softmax scale, ``1 / sqrt(head_dim)`` by default.
        sliding_window: attend only to the last ``sliding_window`` tokens of each context (the new one included,
            as transformers' sliding-window layers do); None: all of them.
        softcap: attention logit soft-capping (Gemma 2): each score ``s`` (scale included) becomes
            ``softcap * tanh(s / softcap)`` before the softmax; None: off.

    Returns:
        ``[num_seqs, num_heads, head_dim]`` in the query dtype.

    A block id out of ``[0, num_blocks)`` among the blocks a context reads, or a context longer than its table,
    raises ValueError on the CPU; on CUDA (where checking would sync the stream) that sequence's output is NaN.
    """
    fn = "paged_attention"
    _check_caches(fn, key_cache, value_cache)
    if query.dim() != 3:
        raise ValueError(f"{fn}: query must be [num_seqs, num_heads, head_dim], found shape {tuple(query.shape)}")
    num_seqs, num_heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    if head_dim != key_cache.shape[3]:
        raise ValueError(f"{fn}: query head_dim {head_dim} differs from the cache head_dim {key_cache.shape[3]}")
    if num_heads % kv_heads != 0:
        raise ValueError(
            f"{fn}: kv_heads {kv_heads} (key_cache.shape[2]) must divide num_heads {num_heads} (query.shape[1])"
        )
    if query.dtype != key_cache.dtype:
        raise ValueError(f"{fn}: query dtype {query.dtype} must match the cache dtype {key_cache.dtype}")
    if query.device != key_cache.device:
        raise ValueError(f"{fn}: query is on {query.device} but the caches are on {key_cache.device}")
    for name, t, shape in (
        ("block_tables", block_tables, f"[num_seqs, max_blocks_per_seq] with num_seqs = {num_seqs}"),
        ("context_lens", context_lens, f"[num_seqs] = [{num_seqs}]"),
    ):
        if t.dim() != (2 if name == "block_tables" else 1) or t.shape[0] != num_seqs:
            raise ValueError(f"{fn}: {name} must be {shape}, found shape {tuple(t.shape)}")
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{fn}: {name} must be int32 or int64, found {t.dtype}")
        if t.device != key_cache.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the caches are on {key_cache.device}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"{fn}: sliding_window must be a positive int or None, found {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{fn}: softcap must be > 0 or None, found {softcap!r}")
    if head_dim > 1 and query.stride(2) != 1:
        query = query.contiguous()
    return torch.ops.rlhf_engine.paged_attention(
        query, key_cache, value_cache, block_tables.contiguous(), context_lens.contiguous(), float(scale),
        int(sliding_window or 0), float(softcap or 0.0)
    )
