"""The embedded RLVR task: two-digit addition, learned from imperfect worked solutions, then corrected by GRPO
against the exact-answer verifier.

    rlhf-engine demo --task arithmetic [--out runs/arithmetic] [--seed 0]

1. A tiny Llama is trained from scratch by SFT on worked solutions written units first ("37+45=" ->
   "7+5=12;3+4+1=8;#### 82"), where half of the solutions that need a carry forget it ("3+4+0=7;#### 72"): the
   SFT model imitates both, so a sampled answer is right for about 6 questions in 10.
2. GRPO with ``rlhf_engine.rewards.math_answer`` (the reward is 1 for the exact final answer) on questions whose
   ``answer`` field reaches the verifier, as a user's data file would: the carry-keeping solutions win.
Held-out accuracy is measured on 200 unseen questions, two samples each at temperature 1.
"""

from __future__ import annotations

import json
import os
import random
import time

import torch

from rlhf_engine.data.jsonl import PromptRecord, SFTRecord, write_jsonl
from rlhf_engine.demo import task
from rlhf_engine.demo.run import _generate
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.metrics import format_table, plot_curves
from rlhf_engine.models import load_causal_lm, load_tokenizer
from rlhf_engine.rewards import math_answer
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_engine.trainers.sft import SFTConfig, train_sft

CARRY_ERROR_RATE = 0.5  # share of the carrying demonstrations that forget the carry
MAX_NEW_TOKENS = 32


def question(rng: random.Random) -> tuple[int, int]:
    return rng.randint(10, 99), rng.randint(10, 99)


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def worked_solution(a: int, b: int, rng: random.Random, error_rate: float = CARRY_ERROR_RATE) -> str:
    """Units first, then tens with the carry; with probability ``error_rate`` a needed carry is dropped."""
    units = a % 10 + b % 10
    carry = units // 10
    if carry and rng.random() < error_rate:
        carry = 0
    tens = a // 10 + b // 10 + carry
    return f"{a % 10}+{b % 10}={units};{a // 10}+{b // 10}+{carry}={tens};#### {tens * 10 + units % 10}"


def _accuracy(model, tokenizer, held_out: list[tuple[int, int]], seed: int) -> tuple[float, list[str]]:
    """Share of exact answers over two samples per question (temperature 1), and the first sample of each."""
    responses = _generate(model, tokenizer, [prompt_of(a, b) for a, b in held_out], n=2, temperature=1.0,
                          seed=seed, max_new_tokens=MAX_NEW_TOKENS)
    flat = [r for rs in responses for r in rs]
    answers = [str(a + b) for a, b in held_out for _ in range(2)]
    return sum(math_answer(None, flat, answer=answers)) / len(flat), [rs[0] for rs in responses]


def run_arithmetic(out_dir: str = "runs/arithmetic", *, sft_steps: int = 800, rl_iterations: int = 150,
                   seed: int = 0, progress: bool = True, policy_loss: str = "ppo") -> dict:
    """SFT from scratch, then GRPO (with ``policy_loss``) against the verifier; returns the summary (also
    ``out_dir/summary.json``)."""
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok_dir = os.path.join(out_dir, "tokenizer")
    build_byte_tokenizer().save_pretrained(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    seconds = {}

    t0 = time.perf_counter()  # 1. SFT from scratch on imperfect worked solutions
    sft_records = [SFTRecord(prompt_of(a, b), worked_solution(a, b, rng))
                   for a, b in (question(rng) for _ in range(4000))]
    write_jsonl(os.path.join(out_dir, "sft.jsonl"), sft_records)
    init_dir = task.build_tiny_model_dir(os.path.join(out_dir, "init"), vocab_size=len(tokenizer), seed=seed)
    tokenizer.save_pretrained(init_dir)
    policy = load_causal_lm(init_dir)
    sft_history = train_sft(policy, tokenizer, sft_records,
                            SFTConfig(steps=sft_steps, batch_size=32, lr=3e-3, max_length=64, seed=seed),
                            progress=progress)
    seconds["sft"] = round(time.perf_counter() - t0, 1)
    held_rng = random.Random(seed + 1000)
    held_out = [question(held_rng) for _ in range(200)]
    accuracy_before, samples_before = _accuracy(policy, tokenizer, held_out, seed)
    policy.save_pretrained(os.path.join(out_dir, "sft"))
    tokenizer.save_pretrained(os.path.join(out_dir, "sft"))

    t0 = time.perf_counter()  # 2. GRPO with the exact-answer verifier; the answers ride along as a data field
    prompt_rng = random.Random(seed + 2000)
    prompts = [PromptRecord(prompt_of(a, b), {"answer": str(a + b)})
               for a, b in (question(prompt_rng) for _ in range(2000))]
    write_jsonl(os.path.join(out_dir, "prompts.jsonl"), prompts)
    config = PPOConfig(algorithm="grpo", iterations=rl_iterations, prompts_per_iteration=8, n_samples=8,
                       max_new_tokens=MAX_NEW_TOKENS, lr=1e-4, minibatch_size=64, kl_in_reward=False, kl_coef=0.0,
                       seed=seed, policy_loss=policy_loss)
    rl_history = PPOTrainer(policy, tokenizer, config, reward_fn=math_answer).train(prompts, progress=progress)
    seconds["grpo"] = round(time.perf_counter() - t0, 1)
    accuracy_after, samples_after = _accuracy(policy, tokenizer, held_out, seed)
    policy.save_pretrained(os.path.join(out_dir, "grpo"))
    tokenizer.save_pretrained(os.path.join(out_dir, "grpo"))

    for name, rows in (("sft_metrics.jsonl", sft_history), ("grpo_metrics.jsonl", rl_history)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    plot_curves(rl_history, ["reward_mean", "entropy", "response_length", "kl"], os.path.join(out_dir, "curves.png"),
                x="iteration", title="arithmetic: GRPO against the exact-answer verifier")
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    summary = {"task": "arithmetic", "seed": seed, "sft_loss_final": round(sft_history[-1]["loss"], 4),
               "accuracy_before": round(accuracy_before, 4), "accuracy_after": round(accuracy_after, 4),
               "seconds": seconds,
               "samples": [{"prompt": prompt_of(a, b), "answer": str(a + b), "before": before, "after": after}
                           for (a, b), before, after in list(zip(held_out, samples_before, samples_after,
                                                                 strict=True))[:4]]}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def print_arithmetic_summary(summary: dict, out_dir: str) -> None:
    rows = [("SFT loss (final)", f"{summary['sft_loss_final']:.3f}"),
            ("held-out accuracy, SFT policy", f"{summary['accuracy_before']:.3f}"),
            ("held-out accuracy, GRPO policy", f"{summary['accuracy_after']:.3f}")]
    rows += [(f"seconds: {k}", f"{v:.1f}") for k, v in summary["seconds"].items()]
    print("\n" + format_table(rows))
    for s in summary["samples"]:
        print(f"\n{s['prompt']} (answer {s['answer']})\n  SFT:  {s['before']!r}\n  GRPO: {s['after']!r}")
    print(f"\nwrote {out_dir}/summary.json, curves.png, metrics JSONL and the model directories")
