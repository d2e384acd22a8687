"""The rollout on a transformers model's own modules: only the attention is ours.

transformers routes every attention layer through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with
the layer's own arguments (``scaling``, ``sliding_window``, ``softcap``). During a rollout forward the engine
sets that name to ``rlhf_engine_paged``, registered here: the function writes the layer's new K/V into the
paged block pool and attends over it (``_C.paged_attention`` in decode, or flash-attn's
``flash_attn_with_kvcache`` on GPU; SDPA over each prompt in prefill). Everything else (embeddings, norms, q/k
norms, rotary variants, MoE MLPs, the LM head with its soft-capping and scales) is the model's own code, so every
architecture whose attention goes through that interface rolls out, and what it computes is what the model
computes. The model runs without a transformers Cache (``use_cache=False``): the block pool is the cache, and
the per-step layout (slots, block tables, prompt segments) reaches the attention function through ``_STEP``,
set by the engine around each forward.

The same mechanism as transformers' own continuous batching (``generate_batch``), written for our block pool:
prefix sharing, copy-on-write forks and continuous batching stay the engine's.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlhf_engine import kv_cache  # noqa: F401  (loads _C: its ops are called below)
from rlhf_engine.models.loading import text_config

ATTENTION_NAME = "rlhf_engine_paged"
# what transformers' models pass along to an attention function besides the attention's own inputs, none of which
# changes the attention; anything else that is not None (attention sinks ``s_aux`` / ``sinks``, a position bias,
# sparse ``indices``...) is an attention term the paged kernels do not compute, and is refused
_BENIGN_KWARGS = frozenset({"position_ids", "use_cache", "output_router_logits", "output_attentions",
                            "output_hidden_states", "return_dict", "cache_position", "past_key_values", "cache",
                            "is_causal", "layer_idx"})
_STEP: contextvars.ContextVar = contextvars.ContextVar("rlhf_engine_rollout_step", default=None)


@dataclass
class Segment:
    """One prompt of a packed prefill: tokens ``[start, end)`` of the packed row, after ``num_cached`` tokens
    already in the cache (a reused prefix); ``table`` its block ids."""

    start: int
    end: int
    num_cached: int
    table: torch.Tensor  # [blocks] long


@dataclass
class Step:
    """What one forward's attention calls need: the pool, where each token's K/V goes, and how to attend."""

    caches: list  # per layer: (key_cache, value_cache) [num_blocks, block_size, kv_heads, head_dim], made lazily
    num_blocks: int
    block_size: int
    slots: torch.Tensor  # [N] long: the cache slot of each token of the row
    segments: list[Segment] | None = None  # prefill
    block_tables: torch.Tensor | None = None  # decode: [N, max_blocks] long
    context_lens: torch.Tensor | None = None  # decode: [N] long, the new token included
    flash: object = None  # flash_attn_with_kvcache, or None for _C.paged_attention
    flash_args: tuple = ()  # (int32 block tables, int32 context lens)
    calls: list = field(default_factory=list)  # layer index of each attention call, in order

    def cache(self, layer: int, key: torch.Tensor):
        """The pool of ``layer``, made on its first write from the layer's own K shape [N, kv_heads, head_dim]."""
        while len(self.caches) <= layer:
            self.caches.append(None)
        if self.caches[layer] is None:
            shape = (self.num_blocks, self.block_size, key.shape[1], key.shape[2])
            # NOTE: zeros, not empty: a gathered block's unused tail is masked out, but 0 * NaN would still be NaN
            self.caches[layer] = (torch.zeros(shape, dtype=key.dtype, device=key.device),
                                  torch.zeros(shape, dtype=key.dtype, device=key.device))
        return self.caches[layer]


def _eager(q, k, v, mask, scale, softcap):
    """Attention with soft-capped scores (SDPA has no soft-capping): q [1, H, n, D], k / v [1, KV, L, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def _prefill_attention(q, k, v, key_cache, value_cache, segments, scale, window, softcap=None):
    """Causal attention of each prompt segment's new tokens over its cached prefix and themselves.

    q [N, H, D], k / v [N, KV, D] (the new tokens, already written to the cache) -> [N, H, D].
    """
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for seg in segments:
        qs = q[seg.start : seg.end]  # (n, H, D)
        n = seg.end - seg.start
        total = seg.num_cached + n
        if seg.num_cached:  # keys: the cached prefix and the new tokens, read back from the blocks
            ks = key_cache[seg.table].flatten(0, 1)[:total]
            vs = value_cache[seg.table].flatten(0, 1)[:total]
        else:
            ks, vs = k[seg.start : seg.end], v[seg.start : seg.end]
        mask = None
        if seg.num_cached or window is not None or softcap is not None:
            q_pos = torch.arange(seg.num_cached, total, device=q.device)[:, None]
            k_pos = torch.arange(total, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:  # transformers' sliding window: the last `window` keys, the token's own included
                mask = mask & (k_pos > q_pos - window)
        qs, ks, vs = qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None]
        if softcap is not None:
            o = _eager(qs, ks, vs, mask, scale, softcap)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                               enable_gqa=gqa)  # (1, H, n, D)
        out[seg.start : seg.end] = o[0].transpose(0, 1)
    return out


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    """The attention function registered as ``rlhf_engine_paged`` (transformers' AttentionInterface).

    query [1, H, N, D], key / value [1, KV, N, D]: the N tokens of the packed row (one per sequence in decode,
    every prompt's new tokens in prefill) -> ([1, N, H, D], None).
    """
    step = _STEP.get()
    if step is None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs only inside RolloutEngine.generate; load the model "
                           f"with attn_implementation='sdpa' (or eager) for other uses")
    extra = [k for k, v in kwargs.items() if v is not None and k not in _BENIGN_KWARGS]
    if extra or attention_mask is not None or kwargs.get("is_causal") is False:
        what = ", ".join(extra) or ("an attention mask of its own" if attention_mask is not None else "is_causal=False")
        raise ValueError(f"RolloutEngine: {type(module).__name__} passes {what} to its attention, which the paged "
                         f"kernels do not compute: this architecture cannot roll out on the block pool")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx: its KV cannot be placed in the block pool")
    q = query[0].transpose(0, 1)  # (N, H, D)
    # (N, KV, D); NOTE: a copy only where the model's layout is not already token-major (write_kv needs it)
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    key_cache, value_cache = step.cache(layer, k)
    # NOTE: the ops themselves, not kv_cache's wrappers: their TORCH_CHECKs validate every argument, and the
    # wrappers' Python checks would run again on every layer of every step
    ops = torch.ops.rlhf_engine
    ops.write_kv(k, v, key_cache, value_cache, step.slots)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if step.segments is not None:
        out = _prefill_attention(q, k, v, key_cache, value_cache, step.segments, scale, sliding_window, softcap)
    elif step.flash is not None:  # the new token's K/V are in the cache: attend over cache_seqlens tokens of each
        tables32, lens32 = step.flash_args
        # (flash's window counts the tokens left of the query: transformers' window includes the query itself)
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        out = step.flash(q[:, None], key_cache, value_cache, cache_seqlens=lens32, block_table=tables32,
                         softmax_scale=scale, causal=True, window_size=window, softcap=softcap or 0.0)[:, 0]
    else:
        out = ops.paged_attention(q.contiguous(), key_cache, value_cache, step.block_tables, step.context_lens,
                                  float(scale), int(sliding_window or 0), float(softcap or 0.0))  # (N, H, D)
    step.calls.append(layer)
    return out[None], None


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
        _REGISTERED = True


def check_model(model) -> None:
    """Refuses, naming what is missing, the models this path cannot run."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"RolloutEngine: {type(model).__name__} is not a transformers causal LM")
    name = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"RolloutEngine: {name!r} is an encoder-decoder; the rollout runs decoder-only causal LMs")
    if any(getattr(config, key, None) is not None for key in ("vision_config", "audio_config")):
        raise ValueError(f"RolloutEngine: {name!r} takes multimodal inputs; the rollout runs text-only causal LMs")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"RolloutEngine: {name!r} ({type(model).__name__}) does not route its attention through "
                         f"transformers' attention interface (its _supports_attention_backend is False), so its KV "
                         f"cannot live in the block pool")
    text = text_config(config)
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap and getattr(text, "_attn_implementation", None) == "sdpa":
        raise ValueError(f"RolloutEngine: {name!r} soft-caps its attention scores (attn_logit_softcapping={cap}), "
                         f"which its attention implementation 'sdpa' drops: the model trained and the model rolled "
                         f"out would differ; load it with attn_implementation='eager' (load_causal_lm does)")


@contextlib.contextmanager
def running(model, step: Step):
    """Inside, ``model``'s attention layers call ``paged_attention_forward`` with ``step``."""
    _register()
    configs = {id(c): c for c in (model.config, text_config(model.config))}.values()
    before = [(c, c._attn_implementation) for c in configs]
    token = _STEP.set(step)
    try:
        for c, _ in before:
            c._attn_implementation = ATTENTION_NAME
        yield step
    finally:
        for c, name in before:
            c._attn_implementation = name
        _STEP.reset(token)


def forward(model, step: Step, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The model's own forward over one packed row (``input_ids``, ``positions`` [N]) -> logits [len(rows), V] at
    the tokens ``rows``, soft-capping and logit scales included (the model's head)."""
    with running(model, step):
        out = model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=rows)
    layers = getattr(text_config(model.config), "num_hidden_layers", None)
    if len(set(step.calls)) != len(step.calls):
        raise ValueError(f"RolloutEngine: {type(model).__name__} called attention twice with one layer_idx (shared "
                         f"or reused layers): their KV would overwrite each other in the block pool")
    if not step.calls or (layers is not None and len(step.calls) != layers):
        raise ValueError(f"RolloutEngine: {type(model).__name__} ran {len(step.calls)} of its {layers} attention "
                         f"layers through transformers' attention interface: its layers do not use it, so its KV "
                         f"cannot live in the block pool")
    return out.logits[0].float()
