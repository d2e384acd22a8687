"""Benchmark: rollout tokens/s, rlhf-engine's RolloutEngine vs Hugging Face generate, on one tiny Llama.

Model: 4 layers, hidden 256, 8 heads (4 KV heads), vocab 32000, random weights, fp32. Workload: 8 prompts of 256
tokens, n samples each (HF: num_return_sequences=n), 64 new tokens, temperature 1 (no stop token, so every
sample runs to 64 tokens). Each (n, provider) runs in its own subprocess; tokens/s counts generated tokens;
peak is the memory over the loaded model.

    python benchmarks/bench_rollout.py [--quick] [--json PATH] [--repeat N]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import parse_args, peak_rss_bytes, print_table, rss_bytes, run_worker, write_json  # noqa: E402

PROVIDERS = ("naive", "ours")  # naive = HF generate; ours = the engine on the model's own modules (hf_bridge)


def build_model(layers: int, hidden: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def worker(n: int, provider: str, prompts: int, prompt_len: int, new_tokens: int, repeat: int, dims: list) -> dict:
    import torch

    from rlhf_engine.rollout import RolloutEngine, SamplingParams

    model = build_model(*dims)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(3, dims[2], (prompts, prompt_len), generator=g)
    if provider == "naive":

        def run():
            with torch.no_grad():
                out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0,
                                     top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     num_return_sequences=n, pad_token_id=0)
            return (out.shape[1] - prompt_len) * out.shape[0]
    else:
        engine = RolloutEngine(model)
        params = SamplingParams(n=n, temperature=1.0, max_new_tokens=new_tokens, seed=0)
        prompt_lists = batch.tolist()

        def run():
            outs = engine.generate(prompt_lists, params)
            return sum(len(s.token_ids) for o in outs for s in o.samples)

    base = rss_bytes()
    times, tokens = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "n": n,
        "provider": provider,
        "prompts": prompts,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "full_ms": round(seconds * 1e3, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_mib": round(max(peak_rss_bytes() - base, 0) / 2**20, 1),
    }


def main(argv=None):
    args = parse_args(__doc__, argv, worker, device=False, quick_help="2 layers, 4 prompts of 64 tokens, 16 new tokens")
    if args is None:
        return 0
    if args.quick:
        prompts, prompt_len, new_tokens, dims = 4, 64, 16, [2, 128, 8000]
    else:
        prompts, prompt_len, new_tokens, dims = 8, 256, 64, [4, 256, 32000]
    repeat = args.repeat or (1 if args.quick else 2)
    rows = []
    for n in (1, 8):
        for provider in PROVIDERS:
            rows.append(run_worker(__file__, [n, provider, prompts, prompt_len, new_tokens, repeat, dims]))
            print(f"  done n={n} {provider}", file=sys.stderr, flush=True)
    print(f"cpu threads={rows[0]['threads']} model layers/hidden/vocab={dims} {prompts} prompts x {prompt_len} tokens, "
          f"{new_tokens} new tokens; naive = HF generate")
    fields = [("tokens", "tokens"), ("full_ms", "ms"), ("tokens_per_s", "tokens/s"), ("peak_mib", "peak MiB")]
    print_table(rows, ["n"], fields)
    for n in (1, 8):
        ours = next(r for r in rows if r["n"] == n and r["provider"] == "ours")
        hf = next(r for r in rows if r["n"] == n and r["provider"] == "naive")
        print(f"n={n}: ours {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x HF tokens/s")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
