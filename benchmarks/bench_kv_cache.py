"""Benchmark: the paged KV cache. (a) decode attention, (b) prefill work saved by prefix sharing.

(a) One decode step of attention, 16 query heads, fp32, block_size 16, every sequence at the full context, its
blocks scattered over the cache (a random permutation, as after a while of continuous batching):
  naive   gather the blocks into dense K/V (key_cache[block_tables]), then F.scaled_dot_product_attention with
          enable_gqa (what a model without a paged kernel does every step)
  ours    rlhf_engine.kv_cache.paged_attention (the _C CPU kernel; CUDA where built)
Each (shape, provider) runs in its own subprocess; time is the median of --repeat calls; peak MiB is what one call
adds over the caches (on CPU the growth of the process's peak RSS, on CUDA the allocator's peak); K/V GB/s = K and
V bytes attended / time.

(b) A GRPO-style rollout batch: 32 prompts that share a 96-token instruction template followed by a 24..400-token
question, n samples each, through a BlockPool (block_size 16):
  naive         no sharing: every sample is allocated and prefilled on its own
  prefix-cache  every sample through allocate_prompt (the cached prefix is reused; the block holding the last token
                is always recomputed)
  ours          the engine's way: allocate_prompt once per prompt, fork into the n samples
Tokens computed are the prefill tokens the model must run (len - allocate_prompt's cached count, 0 for a fork);
blocks held are the KV blocks the batch occupies once prefilled.

    python benchmarks/bench_kv_cache.py [--quick | --floor] [--json PATH] [--repeat N] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import parse_args, peak_rss_bytes, print_table, rss_bytes, run_worker, write_json  # noqa: E402

# (batch, context) x (kv_heads, head_dim); heads = 16, fp32. The floor of issue 4: batch 32, context 1024.
BATCHES, CONTEXTS = (8, 32, 64), (256, 1024, 4096)
HEAD_CONFIGS = ((4, 128), (8, 64))
QUICK_BATCHES, QUICK_CONTEXTS, QUICK_HEAD_CONFIGS = (8, 32), (256, 1024), ((4, 128),)
FLOOR_BATCHES, FLOOR_CONTEXTS, FLOOR_HEAD_CONFIGS = (32,), (1024,), ((4, 128),)
NUM_HEADS, BLOCK_SIZE = 16, 16
PROVIDERS = ("naive", "ours")
DECODE_FIELDS = [("ms", "ms"), ("gb_per_s", "K/V GB/s"), ("peak_mib", "peak MiB")]

SAMPLES = (1, 4, 8, 16)
NUM_PROMPTS, TEMPLATE_LEN, QUESTION_LENS = 32, 96, (24, 400)
PREFIX_FIELDS = [("prompt_tokens", "prompt tokens"), ("computed", "tokens computed"), ("blocks", "blocks held")]


def decode_worker(
    batch: int, context: int, kv_heads: int, head_dim: int, provider: str, repeat: int, device: str
) -> dict:
    import torch
    import torch.nn.functional as F

    from rlhf_engine.kv_cache import paged_attention

    torch.manual_seed(0)
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    key_cache, value_cache = torch.randn(shape, device=device), torch.randn(shape, device=device)
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, NUM_HEADS, head_dim, device=device)

    if provider == "naive":

        def step():
            keys = key_cache[block_tables].view(batch, context, kv_heads, head_dim).transpose(1, 2)  # (B, kvh, L, D)
            values = value_cache[block_tables].view(batch, context, kv_heads, head_dim).transpose(1, 2)
            return F.scaled_dot_product_attention(query[:, :, None], keys, values, enable_gqa=True)[:, :, 0]

    else:

        def step():
            return paged_attention(query, key_cache, value_cache, block_tables, context_lens)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # Peak memory of one step over the inputs: on CUDA the allocator's peak, on CPU the growth of the process's
    # peak RSS (this process does nothing else); then timed steps.
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        step()
        peak = max(peak_rss_bytes() - base, 0)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    kv_bytes = 2 * batch * context * kv_heads * head_dim * 4
    return {
        "bench": "decode",
        "batch": batch,
        "context": context,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "provider": provider,
        "device": device,
        "threads": torch.get_num_threads(),
        "ms": round(ms, 3),
        "gb_per_s": round(kv_bytes / (ms * 1e-3) / 1e9, 2),
        "peak_mib": round(peak / 2**20, 2),
    }


def make_prompts(rng: random.Random) -> list[list[int]]:
    template = [rng.randrange(1, 32000) for _ in range(TEMPLATE_LEN)]
    return [
        template + [rng.randrange(1, 32000) for _ in range(rng.randint(*QUESTION_LENS))] for _ in range(NUM_PROMPTS)
    ]


def prefix_rows(samples: int) -> list[dict]:
    """Prefills one rollout batch three ways through real BlockPools and counts what the model would compute."""
    from rlhf_engine.kv_cache import BlockPool

    prompts = make_prompts(random.Random(0))
    rows = []
    for provider in ("naive", "prefix-cache", "ours"):
        pool = BlockPool(sum(len(p) // BLOCK_SIZE + 2 for p in prompts) * samples, BLOCK_SIZE)
        computed, seq_id = 0, 0
        for prompt in prompts:
            parent = seq_id
            for i in range(samples):
                if provider == "naive":
                    pool.allocate(seq_id, len(prompt))
                    computed += len(prompt)
                elif provider == "prefix-cache" or i == 0:
                    computed += len(prompt) - pool.allocate_prompt(seq_id, prompt)
                else:
                    pool.fork(parent, seq_id)  # shares every block: nothing to compute
                seq_id += 1
        pool.check_invariants()
        rows.append(
            {
                "bench": "prefix",
                "n": samples,
                "provider": provider,
                "prompt_tokens": samples * sum(map(len, prompts)),
                "computed": computed,
                "blocks": pool.num_blocks() - pool.num_free_blocks(),
                "hit_rate": round(pool.prefix_hits() / max(pool.prefix_queries(), 1), 3),
            }
        )
    return rows


def _options(parser):
    parser.add_argument("--floor", action="store_true", help="decode attention on the floor case of issue 4 only")


def main(argv=None):
    args = parse_args(__doc__, argv, decode_worker, add_options=_options)
    if args is None:
        return 0
    import torch

    if args.floor and args.quick:
        raise SystemExit("--floor and --quick: choose one (--floor is the one case of issue 4's floor)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat = args.repeat or (5 if args.quick else 10)
    batches, contexts, configs = (
        (FLOOR_BATCHES, FLOOR_CONTEXTS, FLOOR_HEAD_CONFIGS) if args.floor
        else (QUICK_BATCHES, QUICK_CONTEXTS, QUICK_HEAD_CONFIGS) if args.quick
        else (BATCHES, CONTEXTS, HEAD_CONFIGS)
    )
    decode = []
    for kv_heads, head_dim in configs:
        for batch in batches:
            for context in contexts:
                for provider in PROVIDERS:
                    decode.append(run_worker(__file__, [batch, context, kv_heads, head_dim, provider, repeat, device]))
                    print(
                        f"  done {batch}x{context} kv_heads={kv_heads} d={head_dim} {provider}",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        f"(a) paged decode attention: device={device} threads={decode[0]['threads']} heads={NUM_HEADS} fp32 "
        f"block_size={BLOCK_SIZE} repeat={repeat} (median); time x / mem x relative to naive (gather + SDPA)"
    )
    print_table(
        decode,
        ["kv_heads", "head_dim", "batch", "context"],
        DECODE_FIELDS,
        ratios=(("ms", "time x"), ("peak_mib", "mem x")),
    )
    prefix = [row for n in SAMPLES for row in prefix_rows(n)]
    print(
        f"\n(b) prefill of {NUM_PROMPTS} prompts ({TEMPLATE_LEN}-token shared template + {QUESTION_LENS[0]}.."
        f"{QUESTION_LENS[1]}-token question) x n samples; computed x / blocks x relative to naive (no sharing)"
    )
    print_table(
        prefix,
        ["n"],
        PREFIX_FIELDS + [("hit_rate", "block hit rate")],
        ratios=(("computed", "computed x"), ("blocks", "blocks x")),
    )
    write_json(args.json, decode + prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
