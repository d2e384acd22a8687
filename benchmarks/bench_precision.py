"""Mixed precision that learns: the SFT loss drop over 30 steps at lr 2e-5 on the demo's tiny Llama, per precision,
the share of weights an update moved, and the memory of the rollout's compute-dtype shadow copy; then GRPO from one
SFT model against the demo's gold score, per precision.

    python benchmarks/bench_precision.py [--steps 30] [--lr 2e-5] [--grpo-iterations 120] [--json out.json]

Floors (issue #13): ``bf16`` lowers the loss at least 90% as much as ``fp32`` (the ``drop x`` column >= 0.90), and
GRPO's reward rises under bf16 as under fp32 (the ``rise x`` column: bf16's rise of the held-out gold score over
fp32's; same SFT model, seed and prompts). The row ``bf16-weights`` is what the engine did before: the model's own
weights in bf16 (no fp32 master), shown for comparison. Each precision runs in this process one after the other,
on the same data order and initialisation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks._harness import write_json  # noqa: E402
from rlhf_engine.data.jsonl import SFTRecord  # noqa: E402
from rlhf_engine.demo import annotator, task  # noqa: E402
from rlhf_engine.demo.run import _generate, _ppo_config  # noqa: E402
from rlhf_engine.demo.tokenizer import build_byte_tokenizer  # noqa: E402
from rlhf_engine.models import load_causal_lm  # noqa: E402
from rlhf_engine.precision import RolloutWeights  # noqa: E402
from rlhf_engine.trainers.ppo import PPOTrainer  # noqa: E402
from rlhf_engine.trainers.sft import SFTConfig, evaluate_sft, train_sft  # noqa: E402


def run(model_dir, tokenizer, records, held_out, precision: str, steps: int, lr: float, device: str) -> dict:
    weights_dtype = "bfloat16" if precision == "bf16-weights" else "float32"
    model = load_causal_lm(model_dir, dtype=weights_dtype, device=device)
    before = copy.deepcopy(model.state_dict())
    config = SFTConfig(steps=steps, batch_size=16, lr=lr, warmup_steps=0, schedule="constant", max_length=128,
                       seed=0, precision="fp32" if precision == "bf16-weights" else precision)
    eval_config = dataclasses.replace(config, precision="fp32")  # every model is evaluated the same way
    loss0 = evaluate_sft(model, tokenizer, held_out, eval_config)
    torch.manual_seed(0)
    train_sft(model, tokenizer, records, config, progress=False)
    loss1 = evaluate_sft(model, tokenizer, held_out, eval_config)
    moved = sum(int((model.state_dict()[k] != v).sum()) for k, v in before.items())
    total = sum(v.numel() for v in before.values())
    shadow = RolloutWeights(model, precision if precision in ("bf16", "fp16") else "fp32").shadow_bytes()
    master = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"precision": precision, "loss_before": round(loss0, 4), "loss_after": round(loss1, 4),
            "drop": round(loss0 - loss1, 4), "weights_moved": round(moved / total, 3),
            "shadow_MiB": round(shadow / 2**20, 2), "weights_MiB": round(master / 2**20, 2)}


def run_grpo(sft_dir, tokenizer, prompts, held_out, precision: str, iterations: int, device: str) -> dict:
    """GRPO (the demo's settings, lr 5e-5) from the SFT model in ``sft_dir`` against the gold score; the held-out
    gold score (4 samples per prompt) before and after."""
    policy = load_causal_lm(sft_dir, device=device)
    config = dataclasses.replace(_ppo_config("grpo", iterations, seed=0), precision=precision, lr=5e-5)

    def gold(batch_prompts, responses):
        return [annotator.gold_score(p, r) for p, r in zip(batch_prompts, responses, strict=True)]

    def held_out_gold() -> float:
        samples = _generate(policy, tokenizer, held_out, n=4, temperature=1.0, seed=1)
        scores = [annotator.gold_score(p, r) for p, rs in zip(held_out, samples, strict=True) for r in rs]
        return sum(scores) / len(scores)

    before = held_out_gold()
    history = PPOTrainer(policy, tokenizer, config, reward_fn=gold).train(prompts, progress=False)
    after = held_out_gold()
    return {"precision": precision, "iterations": iterations, "gold_before": round(before, 4),
            "gold_after": round(after, 4), "rise": round(after - before, 4),
            "train_reward_last10": round(sum(h["reward_mean"] for h in history[-10:]) / len(history[-10:]), 4)}


def print_table(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="fp32,bf16,bf16-weights,fp16")
    parser.add_argument("--grpo-iterations", type=int, default=120, help="0: skip the GRPO comparison")
    parser.add_argument("--grpo-precisions", default="fp32,bf16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    tokenizer = build_byte_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = task.build_tiny_model_dir(os.path.join(tmp, "m"), vocab_size=len(tokenizer), seed=0)
        records = [SFTRecord(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(512, 1)]
        held_out = [SFTRecord(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(64, 2)]
        rows = [run(model_dir, tokenizer, records, held_out, p, args.steps, args.lr, args.device)
                for p in args.precisions.split(",")]
        grpo_rows = []
        if args.grpo_iterations:
            # the policy GRPO starts from: the demo's SFT (fp32, lr 3e-3), shorter
            sft_dir = os.path.join(tmp, "sft")
            model = load_causal_lm(model_dir, device=args.device)
            train_sft(model, tokenizer, records, SFTConfig(steps=150, lr=3e-3, max_length=128, seed=0),
                      progress=False)
            model.save_pretrained(sft_dir)
            prompts = [task.format_prompt(p) for p in task.make_prompts(256, 3)]
            held_out = [task.format_prompt(p) for p in task.make_prompts(64, 4)]
            grpo_rows = [run_grpo(sft_dir, tokenizer, prompts, held_out, p, args.grpo_iterations, args.device)
                         for p in args.grpo_precisions.split(",")]
    reference = next((r["drop"] for r in rows if r["precision"] == "fp32"), None)
    for row in rows:
        row["drop_x"] = round(row["drop"] / reference, 3) if reference else None
    print_table(rows, ["precision", "loss_before", "loss_after", "drop", "drop_x", "weights_moved", "weights_MiB",
                       "shadow_MiB"])
    bf16 = next((r for r in rows if r["precision"] == "bf16"), None)
    if bf16 is not None and reference:
        verdict = "met" if bf16["drop_x"] >= 0.9 else "NOT met"
        print(f"floor: bf16 drop >= 0.90 x fp32 drop: {bf16['drop_x']:.3f} ({verdict})")
    if grpo_rows:
        reference = next((r["rise"] for r in grpo_rows if r["precision"] == "fp32"), None)
        for row in grpo_rows:
            row["rise_x"] = round(row["rise"] / reference, 3) if reference else None
        print()
        print_table(grpo_rows, ["precision", "iterations", "gold_before", "gold_after", "rise", "rise_x",
                                "train_reward_last10"])
    write_json(args.json, {"sft": rows, "grpo": grpo_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
