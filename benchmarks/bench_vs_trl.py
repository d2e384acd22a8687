"""Peer benchmark: GRPO iterations with rlhf-engine's PPOTrainer vs TRL's GRPOTrainer, the same work on each side.

Both sides get the same model, tokenizer, prompts, reward, sampling and optimisation:
- model: a Llama (4 layers, hidden 256, 8 heads / 4 KV heads, SwiGLU 1024, vocab 4096, random weights, fp32),
  built once from a config and saved; each side loads it from that directory;
- tokenizer: word-level over 4093 two-syllable pseudo-words (+ pad, eos, unk), so one word is one token;
- 8 prompts of exactly 128 tokens (no padding, no BOS); n = 8 samples per prompt, up to 64 new tokens,
  temperature 1, no top-k / top-p; reward = the share of completion words that contain an "a";
- 8 iterations, each one optimisation pass: a single AdamW step over all 64 completions (constant lr 1e-2,
  weight decay 0.01, grad-norm clip 1.0), clip epsilon 0.2, token-mean loss (TRL: loss_type="dapo"), k3 KL to
  the frozen reference as a loss term (beta 0.04), advantages (r - group mean) / group std, no batch whitening;
- TRL: bf16 off, gradient checkpointing off (its defaults turn both on), HF ``generate`` for sampling (no vLLM).
  TRL 1.16 has no PPO trainer (removed upstream), so only GRPO is compared.

Each side runs in its own subprocess, so peak RSS (the process's ``ru_maxrss``) is its own. Step time is the wall
time of one whole iteration (rollout, reward, reference/old log-probs, loss, backward, optimizer step); samples/s
= completions per step / median step time over the steps after the first (the first is reported separately).

    python benchmarks/bench_vs_trl.py [--quick] [--steps N] [--repeat R] [--json PATH] [--png PATH] [--device D]

Needs the optional extra: ``pip install -e ".[bench]"``. Without TRL the script still runs our side and says why
TRL did not run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import parse_args, peak_rss_bytes, rss_bytes, run_worker  # noqa: E402

PROVIDERS = ("trl", "ours")
FULL = dict(layers=4, hidden=256, prompts=8, prompt_len=128, n=8, new_tokens=64, steps=8)
QUICK = dict(layers=2, hidden=64, prompts=4, prompt_len=32, n=4, new_tokens=16, steps=3)
LR, BETA, CLIP, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-2, 0.04, 0.2, 0.01, 1.0  # lr and beta: --lr, --beta
SPECIALS = ("<pad>", "<eos>", "<unk>")
VOCAB = 4096


# ----------------------------------------------------------------------------------------------------------------
# the shared task
# ----------------------------------------------------------------------------------------------------------------
def pseudo_words() -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70
    return [a + b for a in syllables for b in syllables][: VOCAB - len(SPECIALS)]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + pseudo_words())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_prompts(count: int, length: int) -> list[str]:
    import random

    rng = random.Random(0)
    words = pseudo_words()
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(count)]


def reward(completions: list[str]) -> list[float]:
    """The share of completion words containing an 'a' (about 0.36 for a uniformly random policy)."""
    return [sum("a" in w for w in text.split()) / max(1, len(text.split())) for text in completions]


def build_model_dir(path: str, layers: int, hidden: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------
# the two sides (each in its own subprocess)
# ----------------------------------------------------------------------------------------------------------------
def run_ours(model_dir: str, prompts: list[str], w: dict, device: str) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device)
    config = PPOConfig(algorithm="grpo", iterations=w["steps"], prompts_per_iteration=w["prompts"], n_samples=w["n"],
                       max_new_tokens=w["new_tokens"], temperature=1.0, top_p=1.0, ppo_epochs=1,
                       minibatch_size=w["prompts"] * w["n"], lr=w["lr"], clip_low=CLIP, agg="token-mean",
                       whiten_advantages=False, kl_coef=w["beta"], kl_kind="k3", max_grad_norm=MAX_GRAD_NORM,
                       max_prompt_length=w["prompt_len"] + 1, seed=0)  # +1: room for a BOS (this tokenizer has none)
    trainer = PPOTrainer(policy, tokenizer, config, reward_fn=lambda p, r: reward(r))
    steps = []
    for _ in range(w["steps"]):
        t0 = time.perf_counter()
        metrics = trainer.step(prompts)
        steps.append({"seconds": time.perf_counter() - t0, "reward": metrics["reward_mean"],
                      "completion_tokens": metrics["response_length"] * w["prompts"] * w["n"]})
    return steps


def run_trl(model_dir: str, prompts: list[str], w: dict, device: str) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"seconds": time.perf_counter() - self.t0})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                steps[-1].update(reward=logs["reward"],
                                 completion_tokens=logs["completions/mean_length"] * w["prompts"] * w["n"])

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=w["prompts"] * w["n"], gradient_accumulation_steps=1,
            num_generations=w["n"], max_completion_length=w["new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=w["lr"], lr_scheduler_type="constant", weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
            beta=w["beta"], epsilon=CLIP, num_iterations=1, loss_type="dapo", scale_rewards="group",
            max_steps=w["steps"], logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
            bf16=False, gradient_checkpointing=False, use_cpu=device == "cpu", seed=0,
        )
        trainer = GRPOTrainer(model=model_dir, reward_funcs=lambda prompts, completions, **kw: reward(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    return steps


def worker(provider: str, model_dir: str, w: dict, device: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    prompts = make_prompts(w["prompts"], w["prompt_len"])
    base = rss_bytes()
    steps = (run_ours if provider == "ours" else run_trl)(model_dir, prompts, w, device)
    timed = [s["seconds"] for s in steps[1:]] or [steps[0]["seconds"]]
    samples = w["prompts"] * w["n"]
    version = "rlhf-engine"
    if provider == "trl":
        import trl

        version = f"trl {trl.__version__}"
    return {
        "provider": provider,
        "version": version,
        "device": device,
        "threads": torch.get_num_threads(),
        "samples_per_step": samples,
        "first_step_s": round(steps[0]["seconds"], 3),
        "step_s": round(statistics.median(timed), 3),
        "samples_per_s": round(samples / statistics.median(timed), 3),
        "completion_tokens_per_step": round(statistics.mean(s["completion_tokens"] for s in steps), 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "extra_rss_mb": round((peak_rss_bytes() - base) / 2**20, 1),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
        "step_seconds": [round(s["seconds"], 3) for s in steps],
        "rewards": [round(s["reward"], 4) for s in steps],
    }


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------
def _add_options(parser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="iterations per side (the first is not timed)")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate (both sides)")
    parser.add_argument("--beta", type=float, default=BETA, help="k3 KL coefficient (both sides)")
    parser.add_argument("--png", default="bench_out/bench_vs_trl.png", help="reward and step-time curves")
    parser.add_argument("--providers", default="trl,ours", help="comma-separated subset of: trl, ours")


def _trl_missing() -> str | None:
    for module in ("trl", "datasets"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e \".[bench]\")"
    return None


def _run(provider: str, model_dir: str, w: dict, device: str) -> dict:
    if provider == "trl" and (missing := _trl_missing()):
        return {"provider": provider, "error": missing}
    try:
        return run_worker(__file__, [provider, model_dir, w, device])
    except RuntimeError as exc:  # the worker's stderr: keep its end, where the exception is
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return {"provider": provider, "error": " | ".join(lines[-3:])}


def _table(rows: list[dict]) -> None:
    headers = ["run", "provider", "version", "samples/step", "tokens/step", "first step s", "step s", "samples/s",
               "peak RSS MiB", "reward first->last"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([str(r["repeat"]), r["provider"], "-", "-", "-", "-", "-", "-", "-", f"error: {r['error']}"])
            continue
        cells.append([str(r["repeat"]), r["provider"], r["version"], str(r["samples_per_step"]),
                      f"{r['completion_tokens_per_step']:.0f}", f"{r['first_step_s']:.2f}", f"{r['step_s']:.2f}",
                      f"{r['samples_per_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['rewards'][0]:.3f} -> {r['rewards'][-1]:.3f}"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)) + " |")


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        if "error" in r:
            continue
        label = f"{r['provider']} (run {r['repeat']})"
        style = "-" if r["provider"] == "ours" else "--"
        ax_r.plot(range(len(r["rewards"])), r["rewards"], style, marker="o", label=label)
        ax_t.plot(range(len(r["step_seconds"])), r["step_seconds"], style, marker="o", label=label)
    ax_r.set(xlabel="step", ylabel="mean reward", title="reward (share of words with an 'a')")
    ax_t.set(xlabel="step", ylabel="seconds", title="wall time per GRPO step")
    for ax in (ax_r, ax_t):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(__doc__, argv, worker, quick_help="2 layers, hidden 64, 4 prompts x 32 tokens, n=4, 16 new",
                      add_options=_add_options)
    if args is None:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    w = dict(QUICK if args.quick else FULL, lr=args.lr, beta=args.beta)
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("--steps must be >= 1")
        w["steps"] = args.steps
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown or not providers:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {list(PROVIDERS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model_dir(model_dir, w["layers"], w["hidden"])
        for repeat in range(args.repeat or 1):
            for provider in providers:
                row = _run(provider, model_dir, w, device)
                rows.append({"repeat": repeat, **row})
                print(f"  done run {repeat} {provider}", file=sys.stderr, flush=True)
    print(f"{device} threads={torch.get_num_threads()} Llama layers/hidden/vocab={w['layers']}/{w['hidden']}/{VOCAB}, "
          f"{w['prompts']} prompts x {w['prompt_len']} tokens, n={w['n']}, {w['new_tokens']} new tokens, "
          f"{w['steps']} steps (step time: median of steps 2..{w['steps']}); lr={w['lr']} beta={w['beta']}")
    _table(rows)

    def median_of(provider, field):
        values = [r[field] for r in rows if r["provider"] == provider and "error" not in r]
        return round(statistics.median(values), 3) if values else None

    summary = {
        "ours_samples_per_s": median_of("ours", "samples_per_s"),
        "trl_samples_per_s": median_of("trl", "samples_per_s"),
        "ours_peak_rss_mb": median_of("ours", "peak_rss_mb"),
        "trl_peak_rss_mb": median_of("trl", "peak_rss_mb"),
        "ours_step_s": median_of("ours", "step_s"),
        "trl_step_s": median_of("trl", "step_s"),
    }
    errors = {r["provider"]: r["error"] for r in rows if "error" in r}
    if summary["ours_samples_per_s"] and summary["trl_samples_per_s"]:
        speedup = summary["ours_samples_per_s"] / summary["trl_samples_per_s"]
        summary["speedup"] = round(speedup, 2)
        print(f"ours {speedup:.2f}x TRL's samples/s (floor: 2x); peak RSS {summary['ours_peak_rss_mb']:.0f} vs "
              f"{summary['trl_peak_rss_mb']:.0f} MiB")
    for provider, error in errors.items():
        print(f"{provider} did not run: {error}")
    _plot(rows, args.png)
    print(f"wrote {args.png}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**summary, "errors": errors, "workload": w, "device": device, "rows": rows}, f, indent=1)
    return 1 if "ours" in errors else 0


if __name__ == "__main__":
    sys.exit(main())
