"""The rollout engine: batched sampling on the paged KV cache, n samples per prompt sharing one prefill.

    engine = RolloutEngine(model)                      # the training model itself: no copy, no weight sync
    outputs = engine.generate(prompt_token_ids, SamplingParams(n=8, temperature=1.0, max_new_tokens=64))
    outputs[0].samples[3].token_ids, outputs[0].samples[3].logprobs, outputs[0].samples[3].finish_reason

Each prompt is prefilled once (leading blocks already cached under the same tokens are reused) and forked into
its n samples, which share the prompt's blocks (copy-on-write on the shared last block). All live sequences
decode together, one forward per step; a finished sequence frees its blocks at once and waiting prompts are
admitted (continuous batching) within ``max_num_seqs`` and the block budget. Admission reserves each sequence's
worst case, so a running sequence never runs out of blocks.

The model's weights change after every optimizer step, and KV cached under old weights must never be reused:
the engine watches the parameters' version counters (bumped by every in-place update, optimizer steps
included) and drops its prefix cache when they change; ``reset_prefix_cache()`` does it by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rlhf_engine import kv_cache
from rlhf_engine.distributed import hook_free_view
from rlhf_engine.models.loading import max_positions
from rlhf_engine.rollout import hf_bridge
from rlhf_engine.rollout.sampling import SamplingParams, sample


@dataclass
class Sample:
    token_ids: list[int]  # generated tokens only; the stop token included when one ended the sample
    logprobs: list[float]  # log-prob of each generated token under the distribution it was sampled from
    finish_reason: str  # "stop" or "length"


@dataclass
class RolloutOutput:
    prompt_token_ids: list[int]
    samples: list[Sample]


@dataclass
class _Sequence:
    seq_id: int
    prompt_index: int
    length: int  # tokens whose KV is in the cache (or reserved)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


ATTENTION_BACKENDS = ("auto", "paged", "flash")
FLASH_BLOCK = 256  # flash-attn 2's paged KV cache needs a page size that is a multiple of 256


def _flash_with_kvcache():
    """``flash_attn.flash_attn_with_kvcache``, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


class RolloutEngine:
    """Generation on the paged KV cache over a transformers causal LM, running its own modules (``hf_bridge``)."""

    def __init__(self, model, *, block_size: int | None = None, max_num_seqs: int = 256,
                 max_num_blocks: int | None = None, attention: str = "auto", max_prefill_tokens: int = 16384):
        """``max_num_blocks=None`` sizes the KV pool per call from the prompts, n and max_new_tokens.
        ``max_prefill_tokens`` bounds the prompt tokens of one packed prefill forward (a longer prompt runs alone).

        ``attention``: decode attention over the paged cache. ``flash`` is flash-attn's ``flash_attn_with_kvcache``
        with the block table (CUDA, fp16/bf16, block_size a multiple of 256); ``paged`` is ``_C.paged_attention``
        (CPU or CUDA); ``auto`` takes flash when it can run and paged otherwise. ``block_size=None`` is 256 on the
        flash path and 16 elsewhere.

        The forward is the model's own transformers modules with our attention function (``hf_bridge``): any
        architecture whose attention goes through transformers' attention interface. On an FSDP2-sharded model
        (``generate`` inside ``gathered``) it runs on ``distributed.hook_free_view`` of it: FSDP's hooks would
        all-gather per layer, a collective that ranks decoding different numbers of steps cannot join.
        """
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"RolloutEngine: attention must be one of {list(ATTENTION_BACKENDS)}, found {attention!r}")
        param = next(model.parameters())
        self._flash = self._choose_flash(attention, param, block_size)
        if block_size is None:
            block_size = FLASH_BLOCK if self._flash is not None else 16
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"RolloutEngine: block_size must be a positive int, found {block_size!r}")
        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"RolloutEngine: max_prefill_tokens must be a positive int, found {max_prefill_tokens!r}")
        self.max_prefill_tokens = max_prefill_tokens
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"RolloutEngine: max_num_seqs must be a positive int, found {max_num_seqs!r}")
        if max_num_blocks is not None and (not isinstance(max_num_blocks, int) or max_num_blocks < 1):
            raise ValueError(
                f"RolloutEngine: max_num_blocks must be a positive int or None, found {max_num_blocks!r}"
            )
        self.model = model  # its parameters: versions, dtype; under FSDP2 a hook-free view runs (each generate)
        self._forward_model = model
        hf_bridge.check_model(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = max_positions(model)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_blocks = max_num_blocks
        self.device, self.dtype = param.device, param.dtype
        self.pool = None
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._weights_version = None
        self._next_seq_id = 0
        self.stats: dict = {}

    @staticmethod
    def _choose_flash(attention: str, param: torch.Tensor, block_size: int | None):
        if attention == "paged":
            return None
        fn = _flash_with_kvcache()
        problems = []
        if fn is None:
            problems.append("flash-attn is not installed (pip install flash-attn)")
        if param.device.type != "cuda":
            problems.append(f"the model is on {param.device.type}, flash-attn needs CUDA")
        if param.dtype not in (torch.float16, torch.bfloat16):
            problems.append(f"the model is {param.dtype}, flash-attn needs float16 or bfloat16")
        if block_size is not None and block_size % FLASH_BLOCK:
            problems.append(f"block_size={block_size} is not a multiple of {FLASH_BLOCK} (leave it None)")
        if problems and attention == "flash":
            raise ValueError("RolloutEngine: attention='flash' cannot run: " + "; ".join(problems))
        return None if problems else fn

    @property
    def attention(self) -> str:
        """The decode attention in use: ``flash`` or ``paged``."""
        return "flash" if self._flash is not None else "paged"

    # ------------------------------------------------------------------------------------------------------------
    # cache management
    # ------------------------------------------------------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix block (call after the weights change; done automatically on generate)."""
        if self.pool is not None:
            self.pool.reset_prefix_cache()

    def _current_weights_version(self):
        # NOTE: in-place updates (optimizer steps, load_state_dict, copy_) bump a tensor's version counter;
        # a replaced parameter changes its storage.
        return tuple((p._version, p.data_ptr()) for p in self.model.parameters())

    def _ensure_pool(self, num_blocks: int) -> None:
        if self.pool is not None and self.pool.num_blocks() >= num_blocks:
            return
        self.pool = kv_cache.BlockPool(num_blocks, self.block_size)
        self.caches = []  # each layer's K/V pool is made on its first write, from its own KV shape (hf_bridge)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------------------------
    # forward passes
    # ------------------------------------------------------------------------------------------------------------
    def _prefill_packed(self, entries: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Every ``(seq_id, prompt, num_cached)`` prompt's new tokens in one forward of the model's own modules
        (packed into one row, each prompt attending only to itself) -> the logits at each prompt's last token
        [len(entries), V]."""
        ids, positions, slots, segments, rows = [], [], [], [], []
        for seq_id, prompt, num_cached in entries:
            start = len(ids)
            ids += prompt[num_cached:]
            positions += range(num_cached, len(prompt))
            slots += self.pool.slot_mapping(seq_id, num_cached, len(prompt))
            table = torch.tensor(self.pool.block_table(seq_id), dtype=torch.long, device=self.device)
            segments.append(hf_bridge.Segment(start, len(ids), num_cached, table))
            rows.append(len(ids) - 1)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        step = hf_bridge.Step(self.caches, self.pool.num_blocks(), self.block_size, as_tensor(slots),
                              segments=segments)
        return hf_bridge.forward(self._forward_model, step, as_tensor(ids), as_tensor(positions), as_tensor(rows))

    def _decode(self, seqs: list[_Sequence]) -> torch.Tensor:
        """One token per live sequence: reserves its slot (copy-on-write as needed), returns logits [N, V]."""
        slots, cow = [], []
        for s in seqs:
            slot, src, dst = self.pool.append_slot(s.seq_id)
            slots.append(slot)
            if src >= 0:
                cow.append((src, dst))
        if cow:
            for key_cache, value_cache in self.caches:
                kv_cache.copy_blocks(key_cache, value_cache, cow)
        tables = [self.pool.block_table(s.seq_id) for s in seqs]
        width = max(len(t) for t in tables)
        block_tables = [t + [0] * (width - len(t)) for t in tables]
        block_tables = torch.tensor(block_tables, dtype=torch.long, device=self.device)
        context_lens = torch.tensor([s.length + 1 for s in seqs], dtype=torch.long, device=self.device)
        ids = torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.long, device=self.device)
        positions = context_lens - 1
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        if self._flash is not None:  # flash-attn takes int32 tables and lengths
            block_tables32, context_lens32 = block_tables.int(), context_lens.int()
        step = hf_bridge.Step(self.caches, self.pool.num_blocks(), self.block_size, slot_t,
                              block_tables=block_tables, context_lens=context_lens, flash=self._flash,
                              flash_args=(block_tables32, context_lens32) if self._flash is not None else ())
        logits = hf_bridge.forward(self._forward_model, step, ids, positions,
                                   torch.arange(len(seqs), device=self.device))
        for s in seqs:
            s.length += 1
        return logits

    # ------------------------------------------------------------------------------------------------------------
    # generate
    # ------------------------------------------------------------------------------------------------------------
    def _check_prompts(self, prompts, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params must be a SamplingParams, found {type(params).__name__}")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("generate: prompts must be a non-empty list of token-id lists")
        vocab, max_pos = self.vocab_size, self.max_positions
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, (list, tuple)) or not prompt:
                raise ValueError(f"generate: prompts[{i}] must be a non-empty list of token ids")
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab))
                raise ValueError(f"generate: prompts[{i}] holds token id {bad!r} outside [0, {vocab})")
            total = len(prompt) + params.max_new_tokens
            if max_pos is not None and total > max_pos:
                raise ValueError(
                    f"generate: prompts[{i}] ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                    f"exceeds the model's max_position_embeddings {max_pos}"
                )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[RolloutOutput]:
        self._check_prompts(prompts, params)
        start = time.perf_counter()
        prompts = [list(p) for p in prompts]
        per_seq = [self._blocks_for(len(p) + params.max_new_tokens) + 1 for p in prompts]  # +1: copy-on-write
        if self.max_num_blocks is not None:
            num_blocks = self.max_num_blocks
        else:
            demand = sorted((b for b, p in zip(per_seq, prompts, strict=True) for _ in range(params.n)), reverse=True)
            num_blocks = sum(demand[: self.max_num_seqs])
        if max(per_seq) * params.n > num_blocks or params.n > self.max_num_seqs:
            raise ValueError(
                f"generate: one prompt with its {params.n} samples needs up to {max(per_seq) * params.n} KV blocks "
                f"and {params.n} sequence slots; the engine has {num_blocks} blocks (max_num_blocks) and "
                f"{self.max_num_seqs} slots (max_num_seqs): raise them or lower n / max_new_tokens"
            )
        dtype = next(self.model.parameters()).dtype  # FSDP's gathered parameters come in the compute dtype
        if dtype != self.dtype:
            self.dtype, self.pool, self.caches = dtype, None, []
        self._ensure_pool(num_blocks)
        version = self._current_weights_version()
        if version != self._weights_version:
            self.reset_prefix_cache()
            self._weights_version = version
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        # what the forward calls: under FSDP2 the gathered modules without FSDP's hooks, as they are now
        self._forward_model = hook_free_view(self.model)  # (the model itself when nothing in it is sharded)
        stats = {"prefill_tokens": 0, "reused_prefix_tokens": 0, "decode_tokens": 0, "forward_calls": 0}
        results = [RolloutOutput(p, [None] * params.n) for p in prompts]
        waiting = list(range(len(prompts)))
        live: list[_Sequence] = []
        sample_index: dict[int, int] = {}
        try:
            while waiting or live:
                # admission, a whole prompt group at a time: every sequence's worst case (its own blocks, shared
                # ones counted again) must fit in the pool beside the live ones, so no decode step runs dry
                reserved = sum(per_seq[s.prompt_index] for s in live)
                admitted: list[int] = []
                prefill = 0
                while waiting:
                    index = waiting[0]
                    group_need = per_seq[index] * params.n
                    seqs_after = len(live) + params.n * (len(admitted) + 1)
                    if seqs_after > self.max_num_seqs or reserved + group_need > self.pool.num_blocks():
                        break
                    # one packed prefill holds at most max_prefill_tokens (at least one prompt): its activations
                    # grow with the sum of the prompts
                    if admitted and prefill + len(prompts[index]) > self.max_prefill_tokens:
                        break
                    prefill += len(prompts[index])
                    waiting.pop(0)
                    reserved += group_need
                    admitted.append(index)
                if admitted:
                    live.extend(self._start_groups(admitted, prompts, params, generator, stats, sample_index))
                    live = self._retire(live, params, results, sample_index)
                if not live:
                    continue
                logits = self._decode(live)
                stats["forward_calls"] += 1
                stats["decode_tokens"] += len(live)
                tokens, logprobs = sample(logits, params, generator)
                for s, t, lp in zip(live, tokens.tolist(), logprobs.tolist(), strict=True):
                    s.tokens.append(t)
                    s.logprobs.append(lp)
                live = self._retire(live, params, results, sample_index)
        finally:
            for s in live:
                self.pool.free(s.seq_id)
            self.model.train(was_training)
        stats["seconds"] = time.perf_counter() - start
        self.stats = stats
        return results

    def _start_groups(self, admitted, prompts, params, generator, stats, sample_index) -> list[_Sequence]:
        """Prefills the ``admitted`` prompts (one forward for all of them), forks each into its n samples and
        samples their first tokens."""
        entries = []
        try:
            for index in admitted:
                parent = self._new_seq_id()
                num_cached = self.pool.allocate_prompt(parent, prompts[index])  # leading cached blocks are reused
                entries.append((parent, prompts[index], num_cached))
                stats["reused_prefix_tokens"] += num_cached
                stats["prefill_tokens"] += len(prompts[index]) - num_cached
            all_logits = self._prefill_packed(entries)
        except BaseException:
            # allocate_prompt keyed these prompts' full blocks for reuse before their KV was written: free them
            # and forget every key, so that no later prompt reads blocks holding no KV
            for parent, _, _ in entries:
                self.pool.free(parent)
            self.reset_prefix_cache()
            raise
        stats["forward_calls"] += 1
        seqs = []
        for index, (parent, prompt, _), logits in zip(admitted, entries, all_logits, strict=True):
            group = [_Sequence(parent, index, len(prompt))]
            for _ in range(params.n - 1):
                child = self._new_seq_id()
                self.pool.fork(parent, child)
                group.append(_Sequence(child, index, len(prompt)))
            tokens, logprobs = sample(logits[None].expand(params.n, -1), params, generator)
            for k, (s, t, lp) in enumerate(zip(group, tokens.tolist(), logprobs.tolist(), strict=True)):
                s.tokens.append(t)
                s.logprobs.append(lp)
                sample_index[s.seq_id] = k
            seqs.extend(group)
        return seqs

    def _retire(self, live, params, results, sample_index) -> list[_Sequence]:
        """Frees finished sequences and files their samples; returns the ones still running."""
        still = []
        stop = set(params.stop_token_ids)
        for s in live:
            reason = None
            if s.tokens[-1] in stop:
                reason = "stop"
            elif len(s.tokens) >= params.max_new_tokens:
                reason = "length"
            if reason is None:
                still.append(s)
                continue
            self.pool.free(s.seq_id)
            results[s.prompt_index].samples[sample_index.pop(s.seq_id)] = Sample(s.tokens, s.logprobs, reason)
        return still

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id
