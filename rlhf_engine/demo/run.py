"""`rlhf-engine demo`: the pipeline on the embedded task, with everything built locally.

Today it runs the SFT phase end to end (tokenizer and model built from configs, saved with save_pretrained and
loaded back with the real loaders, SFT through the fused log-prob op, held-out loss, samples before/after, a
summary table, summary.json and a PNG of the curves). Reward-model and PPO phases join as they land.
"""

from __future__ import annotations

import json
import os
import time

import torch

from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm, load_tokenizer
from rlhf_engine.trainers.sft import SFTConfig, evaluate_sft, train_sft


@torch.no_grad()
def _samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 100) -> list[str]:
    model.eval()
    out = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(task.format_prompt(prompt), add_special_tokens=False)
        gen = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        out.append(tokenizer.decode(gen[0, len(ids) :], skip_special_tokens=True).strip())
    model.train()
    return out


def _plot(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="SFT loss (train)")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per response token")
    ax.set_title("rlhf-engine demo: SFT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str = "runs/demo", *, sft_steps: int = 300, seed: int = 0, progress: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    build_byte_tokenizer().save_pretrained(os.path.join(out_dir, "tokenizer"))
    tokenizer = load_tokenizer(os.path.join(out_dir, "tokenizer"))
    init_dir = task.build_tiny_model_dir(os.path.join(out_dir, "init"), vocab_size=len(tokenizer), seed=seed)
    model = load_causal_lm(init_dir)
    train = [(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(2000, seed)]
    held_out = [(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(200, seed + 100)]
    config = SFTConfig(steps=sft_steps, seed=seed)
    sample_prompts = task.make_prompts(3, seed + 200)
    before = _samples(model, tokenizer, sample_prompts)
    loss_before = evaluate_sft(model, tokenizer, held_out, config)
    setup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    history = train_sft(model, tokenizer, train, config, progress=progress)
    sft_s = time.perf_counter() - t0
    loss_after = evaluate_sft(model, tokenizer, held_out, config)
    model.save_pretrained(os.path.join(out_dir, "sft"))
    tokenizer.save_pretrained(os.path.join(out_dir, "sft"))
    after = _samples(model, tokenizer, sample_prompts)

    with open(os.path.join(out_dir, "sft_metrics.jsonl"), "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    _plot(history, os.path.join(out_dir, "curves.png"))
    summary = {
        "sft_loss_initial": round(loss_before, 4),
        "sft_loss_final": round(loss_after, 4),
        "sft_steps": sft_steps,
        "seconds": {"setup": round(setup_s, 1), "sft": round(sft_s, 1)},
        "phases_run": ["sft"],
        "samples": [
            {"prompt": p, "before": b, "after": a} for p, b, a in zip(sample_prompts, before, after, strict=True)
        ],
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def print_summary(summary: dict, out_dir: str) -> None:
    rows = [
        ("held-out SFT loss, before", f"{summary['sft_loss_initial']:.3f}"),
        ("held-out SFT loss, after", f"{summary['sft_loss_final']:.3f}"),
        ("SFT steps", str(summary["sft_steps"])),
        ("setup seconds", f"{summary['seconds']['setup']:.1f}"),
        ("SFT seconds", f"{summary['seconds']['sft']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 14))
    for key, value in rows:
        print(f"{key:<{width}}  {value:>10}")
    print("=" * (width + 14))
    for s in summary["samples"]:
        print(f"\nprompt: {s['prompt']}\n  before SFT: {s['before'][:100]!r}\n  after SFT:  {s['after'][:100]!r}")
    print(f"\nwrote {out_dir}/summary.json, {out_dir}/curves.png, {out_dir}/sft_metrics.jsonl, {out_dir}/sft/")
