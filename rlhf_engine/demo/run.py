"""`rlhf-engine demo`: SFT -> preference collection -> reward model -> PPO on the embedded task, on a CPU.

Everything is built locally: a byte-level tokenizer and a tiny Llama (saved with save_pretrained and loaded back
through the real loaders), templated story prompts, mediocre SFT demonstrations, and a rule-based annotator
(``annotator.py``) that plays the human: it labels pairs sampled from the SFT model, and on held-out prompts its
score is the gold that the reward model only approximates.
"""

from __future__ import annotations

import json
import os
import time

import torch

from rlhf_engine.data.jsonl import PreferenceRecord, SFTRecord, write_jsonl
from rlhf_engine.demo import annotator, task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.metrics import format_table, read_metrics
from rlhf_engine.models import load_causal_lm, load_tokenizer
from rlhf_engine.models.heads import ScalarHeadModel
from rlhf_engine.rollout import RolloutEngine, SamplingParams
from rlhf_engine.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_engine.trainers.reward import RewardConfig, evaluate_reward_model, score_texts, train_reward_model
from rlhf_engine.trainers.sft import SFTConfig, evaluate_sft, train_sft

MAX_NEW_TOKENS = 80


def _generate(model, tokenizer, prompts: list[str], *, n: int, temperature: float, seed: int,
              max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[str]]:
    """n responses per prompt from ``model`` on the rollout engine, as text."""
    engine = RolloutEngine(model)
    ids = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens,
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


def _plot(sft, rm, ppo, algo: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[0].set(title="SFT", xlabel="step", ylabel="NLL per response token")
    axes[1].plot([r["step"] for r in rm], [r["loss"] for r in rm], label="loss")
    axes[1].plot([r["step"] for r in rm], [r["accuracy"] for r in rm], label="batch accuracy")
    axes[1].set(title="reward model", xlabel="step")
    it = [r["iteration"] for r in ppo]
    axes[2].plot(it, [r["reward_mean"] for r in ppo], label="proxy reward (RM)")
    axes[2].plot(it, [r["kl"] for r in ppo], label="KL to SFT (per sequence)")
    axes[2].set(title=f"{algo.upper()}: what it optimises", xlabel="iteration")
    axes[3].plot(it, [r["gold_mean"] for r in ppo], color="C3")
    axes[3].set(title=f"{algo.upper()}: gold (annotator) of its samples", xlabel="iteration", ylabel="gold score")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEMO_PHASES = ("all", "sft", "rm", "ppo")
ALGOS = ("ppo", "grpo", "rloo", "reinforce++", "remax")


def _ppo_config(algo: str, iterations: int, seed: int, policy_loss: str = "ppo") -> PPOConfig:
    """16 samples an iteration either way: 16 prompts x 1 (PPO, critic) or 4 prompts x 4 (the others, no critic)."""
    if algo == "ppo":
        return PPOConfig(algorithm="ppo", iterations=iterations, prompts_per_iteration=16, n_samples=1,
                         max_new_tokens=MAX_NEW_TOKENS, lr=3e-5, critic_lr=3e-4, minibatch_size=8,
                         kl_reward_coef=0.05, seed=seed, policy_loss=policy_loss)
    kl_in_reward = algo == "reinforce++"  # REINFORCE++ shapes the reward with the KL; the others take it as a loss
    return PPOConfig(algorithm=algo, iterations=iterations, prompts_per_iteration=4, n_samples=4,
                     max_new_tokens=MAX_NEW_TOKENS, lr=3e-5, minibatch_size=8, kl_in_reward=kl_in_reward,
                     kl_reward_coef=0.02, kl_coef=0.0 if kl_in_reward else 0.02, seed=seed, policy_loss=policy_loss)


def _need(path: str, what: str, phase: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--phase {phase} needs {what} at {path}: run the earlier phases first "
                                f"(rlhf-engine demo --out {os.path.dirname(path)} --phase all, or the phase before)")
    return path


def _save(model, tokenizer, path: str) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # each model directory is complete: the CLI phases can start from it


def run_demo(out_dir: str = "runs/demo", *, sft_steps: int = 300, rm_steps: int = 300, ppo_iterations: int = 40,
             preference_prompts: int = 2000, seed: int = 0, algo: str = "ppo", phase: str = "all",
             progress: bool = True, policy_loss: str = "ppo") -> dict:
    """Runs ``phase`` (``all``: SFT -> preferences -> reward model -> ``algo``); a later phase alone reuses the
    earlier phases' outputs in ``out_dir``. Returns the summary (also written to ``out_dir/summary.json``)."""
    if phase not in DEMO_PHASES:
        raise ValueError(f"phase must be one of {list(DEMO_PHASES)}, found {phase!r}")
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {list(ALGOS)}, found {algo!r}")
    os.makedirs(out_dir, exist_ok=True)
    summary_path = os.path.join(out_dir, "summary.json")
    summary: dict = {"seconds": {}}
    if phase != "all" and os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    seconds = summary["seconds"]
    torch.manual_seed(seed)
    fmt = task.format_prompt
    held_out = [fmt(p) for p in task.make_prompts(48, seed + 100)]
    sample_prompts = held_out[:3]
    tok_dir = os.path.join(out_dir, "tokenizer")
    if phase in ("all", "sft"):
        build_byte_tokenizer().save_pretrained(tok_dir)
    tokenizer = load_tokenizer(_need(tok_dir, "the tokenizer", phase))

    if phase in ("all", "sft"):  # 1. SFT on mediocre demonstrations
        t0 = time.perf_counter()
        init_dir = task.build_tiny_model_dir(os.path.join(out_dir, "init"), vocab_size=len(tokenizer), seed=seed)
        tokenizer.save_pretrained(init_dir)
        policy = load_causal_lm(init_dir)
        sft_config = SFTConfig(steps=sft_steps, lr=3e-3, max_length=128, seed=seed)
        sft_records = [SFTRecord(fmt(e.prompt), e.response) for e in task.make_sft_examples(2000, seed)]
        write_jsonl(os.path.join(out_dir, "sft.jsonl"), sft_records)
        sft_history = train_sft(policy, tokenizer, sft_records, sft_config, progress=progress)
        sft_eval = [(fmt(e.prompt), e.response) for e in task.make_sft_examples(200, seed + 300)]
        summary["sft_loss_final"] = round(evaluate_sft(policy, tokenizer, sft_eval, sft_config), 4)
        _save(policy, tokenizer, os.path.join(out_dir, "sft"))
        _write_rows(os.path.join(out_dir, "sft_metrics.jsonl"), sft_history)
        seconds["sft"] = round(time.perf_counter() - t0, 1)

    if phase in ("all", "rm"):  # 2. the annotator labels pairs sampled from the SFT model; 3. reward model
        t0 = time.perf_counter()
        policy = load_causal_lm(_need(os.path.join(out_dir, "sft"), "the SFT model", phase))
        pairs = _collect_preferences(policy, tokenizer,
                                     [fmt(p) for p in task.make_prompts(preference_prompts, seed + 1)], seed)
        write_jsonl(os.path.join(out_dir, "preferences.jsonl"), pairs)
        split = max(1, len(pairs) // 10)
        rm_train, rm_test = pairs[split:], pairs[:split]
        seconds["preferences"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        rm = ScalarHeadModel(policy)
        rm_config = RewardConfig(steps=rm_steps, batch_size=32, lr=1e-3, warmup_steps=10, max_length=160, seed=seed)
        rm_history = train_reward_model(rm, tokenizer, rm_train, rm_config, progress=progress)
        summary["rm_accuracy"] = round(evaluate_reward_model(rm, tokenizer, rm_test, rm_config)["accuracy"], 4)
        summary["preference_pairs"] = len(pairs)
        _save(rm, tokenizer, os.path.join(out_dir, "reward_model"))
        _write_rows(os.path.join(out_dir, "reward_model_metrics.jsonl"), rm_history)
        seconds["reward_model"] = round(time.perf_counter() - t0, 1)

    if phase in ("all", "ppo"):  # 4. PPO (or GRPO/RLOO) against the reward model, KL to the SFT policy
        t0 = time.perf_counter()
        policy = load_causal_lm(_need(os.path.join(out_dir, "sft"), "the SFT model", phase))
        rm = ScalarHeadModel.from_pretrained(_need(os.path.join(out_dir, "reward_model"), "the reward model", phase))
        before = _evaluate_policy(policy, rm, tokenizer, held_out, seed + 5)
        samples_before = [r[0] for r in _generate(policy, tokenizer, sample_prompts, n=1, temperature=0.0, seed=0)]
        trainer = PPOTrainer(policy, tokenizer, _ppo_config(algo, ppo_iterations, seed, policy_loss), reward_model=rm)

        def track_gold(metrics):
            last = trainer.last_rollout
            gold = [annotator.gold_score(p, r) for p, r in zip(last["prompts"], last["responses"], strict=True)]
            metrics["gold_mean"] = sum(gold) / len(gold)

        ppo_prompts = [fmt(p) for p in task.make_prompts(400, seed + 2)]
        write_jsonl(os.path.join(out_dir, "prompts.jsonl"), [{"prompt": p} for p in ppo_prompts])
        ppo_history = trainer.train(ppo_prompts, progress=progress, on_step=track_gold)
        after = _evaluate_policy(policy, rm, tokenizer, held_out, seed + 5)
        samples_after = [r[0] for r in _generate(policy, tokenizer, sample_prompts, n=1, temperature=0.0, seed=0)]
        _save(policy, tokenizer, os.path.join(out_dir, algo))
        _write_rows(os.path.join(out_dir, f"{algo}_metrics.jsonl"), ppo_history)
        summary.update(algo=algo, gold_before=round(before["gold"], 4), gold_after=round(after["gold"], 4),
                       proxy_before=round(before["proxy"], 4), proxy_after=round(after["proxy"], 4),
                       kl_final=round(ppo_history[-1]["kl"], 4))
        summary["samples"] = [{"prompt": p, "before": b, "after": a}
                              for p, b, a in zip(sample_prompts, samples_before, samples_after, strict=True)]
        seconds["ppo"] = round(time.perf_counter() - t0, 1)

    rows = {name: read_metrics(os.path.join(out_dir, f"{name}_metrics.jsonl"))
            for name in ("sft", "reward_model", summary.get("algo", algo))}
    if all(rows.values()):
        algo_done = summary.get("algo", algo)
        _plot(rows["sft"], rows["reward_model"], rows[algo_done], algo_done, os.path.join(out_dir, "curves.png"))
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def print_summary(summary: dict, out_dir: str) -> None:
    algo = summary.get("algo", "ppo").upper()
    labels = [
        ("sft_loss_final", "SFT held-out loss (final)", "{:.3f}"),
        ("preference_pairs", "preference pairs (annotator)", "{}"),
        ("rm_accuracy", "reward model held-out accuracy", "{:.3f}"),
        ("gold_before", "gold score, SFT policy", "{:.3f}"),
        ("gold_after", f"gold score, {algo} policy", "{:.3f}"),
        ("proxy_before", "proxy (RM) score, SFT policy", "{:.3f}"),
        ("proxy_after", f"proxy (RM) score, {algo} policy", "{:.3f}"),
        ("kl_final", "KL to SFT policy (last iteration)", "{:.3f}"),
    ]
    rows = [(label, form.format(summary[key])) for key, label, form in labels if key in summary]
    rows += [(f"seconds: {k}", f"{v:.1f}") for k, v in summary["seconds"].items()]
    print("\n" + format_table(rows))
    for s in summary.get("samples", []):
        print(f"\n{s['prompt'].splitlines()[0]}\n  SFT: {s['before'][:110]!r}\n  {algo}: {s['after'][:110]!r}")
    print(f"\nwrote {out_dir}/summary.json" + (", curves.png" if os.path.isfile(os.path.join(out_dir, "curves.png"))
                                              else "") + ", metrics JSONL and the model directories")
