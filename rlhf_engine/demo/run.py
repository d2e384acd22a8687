"""`rlhf-engine demo`: SFT -> preference collection -> reward model -> PPO on the embedded task, on a CPU.

Everything is built locally: a byte-level tokenizer and a tiny Llama (saved with save_pretrained and loaded back
through the real loaders), templated story prompts, mediocre SFT demonstrations, and a rule-based annotator
(``annotator.py``) that plays the human: it labels pairs sampled from the SFT model, and on held-out prompts its
score is the gold that the reward model only approximates.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from rlhf_engine.data.jsonl import PreferenceRecord, write_jsonl
from rlhf_engine.demo import annotator, task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm, load_tokenizer
from rlhf_engine.models.heads import ScalarHeadModel
from rlhf_engine.rollout import RolloutEngine, SamplingParams
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_engine.trainers.reward import RewardConfig, evaluate_reward_model, score_texts, train_reward_model
from rlhf_engine.trainers.sft import SFTConfig, evaluate_sft, train_sft

MAX_NEW_TOKENS = 80


def _generate(model, tokenizer, prompts: list[str], *, n: int, temperature: float, seed: int) -> list[list[str]]:
    """n responses per prompt from ``model`` on the rollout engine, as text."""
    engine = RolloutEngine(model)
    ids = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=MAX_NEW_TOKENS,
                            stop_token_ids=(tokenizer.eos_token_id,), seed=seed)
    return [[tokenizer.decode(s.token_ids, skip_special_tokens=True).strip() for s in out.samples]
            for out in engine.generate(ids, params)]


def _evaluate_policy(model, rm, tokenizer, prompts: list[str], seed: int) -> dict:
    """Mean gold and proxy (reward model) scores of 2 sampled responses per held-out prompt."""
    responses = _generate(model, tokenizer, prompts, n=2, temperature=1.0, seed=seed)
    flat_p = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    flat_r = [r for rs in responses for r in rs]
    gold = sum(annotator.gold_score(p, r) for p, r in zip(flat_p, flat_r, strict=True)) / len(flat_r)
    proxy = score_texts(rm, tokenizer, flat_p, [" " + r for r in flat_r], 160).mean().item()
    return {"gold": gold, "proxy": proxy}


def _collect_preferences(model, tokenizer, prompts: list[str], seed: int) -> list[PreferenceRecord]:
    pairs = []
    for prompt, (a, b) in zip(prompts, _generate(model, tokenizer, prompts, n=2, temperature=1.0, seed=seed),
                              strict=True):
        labelled = annotator.prefer(prompt, a, b)
        if labelled is not None:
            pairs.append(PreferenceRecord(prompt, " " + labelled[0], " " + labelled[1]))
    return pairs


def _plot(sft, rm, ppo, gold_curve, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[0].set(title="SFT", xlabel="step", ylabel="NLL per response token")
    axes[1].plot([r["step"] for r in rm], [r["loss"] for r in rm], label="loss")
    axes[1].plot([r["step"] for r in rm], [r["accuracy"] for r in rm], label="batch accuracy")
    axes[1].set(title="reward model", xlabel="step")
    it = [r["iteration"] for r in ppo]
    axes[2].plot(it, [r["reward_mean"] for r in ppo], label="proxy reward (RM)")
    axes[2].plot(it, gold_curve, label="gold (annotator)")
    axes[2].plot(it, [r["kl"] for r in ppo], label="KL to SFT (per sequence)")
    axes[2].set(title="PPO", xlabel="iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str = "runs/demo", *, sft_steps: int = 300, rm_steps: int = 150, ppo_iterations: int = 20,
             preference_prompts: int = 600, seed: int = 0, progress: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    seconds = {}
    t0 = time.perf_counter()
    build_byte_tokenizer().save_pretrained(os.path.join(out_dir, "tokenizer"))
    tokenizer = load_tokenizer(os.path.join(out_dir, "tokenizer"))
    init_dir = task.build_tiny_model_dir(os.path.join(out_dir, "init"), vocab_size=len(tokenizer), seed=seed)
    policy = load_causal_lm(init_dir)
    fmt = task.format_prompt
    held_out = [fmt(p) for p in task.make_prompts(48, seed + 100)]
    sample_prompts = held_out[:3]
    seconds["setup"] = time.perf_counter() - t0

    # 1. SFT on mediocre demonstrations
    t0 = time.perf_counter()
    sft_config = SFTConfig(steps=sft_steps, lr=3e-3, max_length=128, seed=seed)
    sft_data = [(fmt(e.prompt), e.response) for e in task.make_sft_examples(2000, seed)]
    sft_history = train_sft(policy, tokenizer, sft_data, sft_config, progress=progress)
    sft_eval = [(fmt(e.prompt), e.response) for e in task.make_sft_examples(200, seed + 300)]
    sft_loss = evaluate_sft(policy, tokenizer, sft_eval, sft_config)
    policy.save_pretrained(os.path.join(out_dir, "sft"))
    seconds["sft"] = time.perf_counter() - t0

    # 2. the annotator labels pairs sampled from the SFT model
    t0 = time.perf_counter()
    pairs = _collect_preferences(policy, tokenizer, [fmt(p) for p in task.make_prompts(preference_prompts, seed + 1)],
                                 seed)
    write_jsonl(os.path.join(out_dir, "preferences.jsonl"), pairs)
    split = max(1, len(pairs) // 10)
    rm_train, rm_test = pairs[split:], pairs[:split]
    seconds["preferences"] = time.perf_counter() - t0

    # 3. reward model from the SFT body
    t0 = time.perf_counter()
    rm = ScalarHeadModel(copy.deepcopy(policy))
    rm_config = RewardConfig(steps=rm_steps, batch_size=32, lr=1e-3, warmup_steps=10, max_length=160, seed=seed)
    rm_history = train_reward_model(rm, tokenizer, rm_train, rm_config, progress=progress)
    rm_accuracy = evaluate_reward_model(rm, tokenizer, rm_test, rm_config)["accuracy"]
    rm.save_pretrained(os.path.join(out_dir, "reward_model"))
    seconds["reward_model"] = time.perf_counter() - t0

    # 4. PPO against the reward model, KL to the SFT policy in the reward
    t0 = time.perf_counter()
    before = _evaluate_policy(policy, rm, tokenizer, held_out, seed + 5)
    samples_before = [r[0] for r in _generate(policy, tokenizer, sample_prompts, n=1, temperature=0.0, seed=0)]
    ppo_config = PPOConfig(algorithm="ppo", iterations=ppo_iterations, prompts_per_iteration=16, n_samples=1,
                           max_new_tokens=MAX_NEW_TOKENS, lr=3e-5, critic_lr=3e-4, minibatch_size=8,
                           kl_reward_coef=0.02, seed=seed)
    trainer = PPOTrainer(policy, tokenizer, ppo_config, reward_model=rm)
    gold_curve = []

    def track_gold(metrics):
        last = trainer.last_rollout
        gold = [annotator.gold_score(p, r) for p, r in zip(last["prompts"], last["responses"], strict=True)]
        gold_curve.append(sum(gold) / len(gold))
        metrics["gold_mean"] = gold_curve[-1]

    ppo_prompts = [fmt(p) for p in task.make_prompts(400, seed + 2)]
    ppo_history = trainer.train(ppo_prompts, progress=progress, on_step=track_gold)
    after = _evaluate_policy(policy, rm, tokenizer, held_out, seed + 5)
    samples_after = [r[0] for r in _generate(policy, tokenizer, sample_prompts, n=1, temperature=0.0, seed=0)]
    policy.save_pretrained(os.path.join(out_dir, "ppo"))
    seconds["ppo"] = time.perf_counter() - t0

    for name, rows in (("sft", sft_history), ("reward_model", rm_history), ("ppo", ppo_history)):
        with open(os.path.join(out_dir, f"{name}_metrics.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    _plot(sft_history, rm_history, ppo_history, gold_curve, os.path.join(out_dir, "curves.png"))
    summary = {
        "sft_loss_final": round(sft_loss, 4),
        "rm_accuracy": round(rm_accuracy, 4),
        "preference_pairs": len(pairs),
        "gold_before": round(before["gold"], 4),
        "gold_after": round(after["gold"], 4),
        "proxy_before": round(before["proxy"], 4),
        "proxy_after": round(after["proxy"], 4),
        "kl_final": round(ppo_history[-1]["kl"], 4),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "samples": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(sample_prompts, samples_before, samples_after, strict=True)
        ],
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def print_summary(summary: dict, out_dir: str) -> None:
    rows = [
        ("SFT held-out loss (final)", f"{summary['sft_loss_final']:.3f}"),
        ("preference pairs (annotator)", str(summary["preference_pairs"])),
        ("reward model held-out accuracy", f"{summary['rm_accuracy']:.3f}"),
        ("gold score, SFT policy", f"{summary['gold_before']:.3f}"),
        ("gold score, PPO policy", f"{summary['gold_after']:.3f}"),
        ("proxy (RM) score, SFT policy", f"{summary['proxy_before']:.3f}"),
        ("proxy (RM) score, PPO policy", f"{summary['proxy_after']:.3f}"),
        ("KL to SFT policy (last iteration)", f"{summary['kl_final']:.3f}"),
    ] + [(f"seconds: {k}", f"{v:.1f}") for k, v in summary["seconds"].items()]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 14))
    for key, value in rows:
        print(f"{key:<{width}}  {value:>10}")
    print("=" * (width + 14))
    for s in summary["samples"]:
        print(f"\n{s['prompt'].splitlines()[0]}\n  SFT: {s['before'][:110]!r}\n  PPO: {s['after'][:110]!r}")
    print(f"\nwrote {out_dir}/summary.json, {out_dir}/curves.png, metrics JSONL, models in sft/, reward_model/, ppo/")
