"""SFT data encoding, the SFT loss through linear_logprobs, and the demo end to end at a small step count."""

import json
import os

import pytest
import torch

from rlhf_engine.cli import main
from rlhf_engine.data.sft import IGNORE_INDEX, collate_sft, encode_sft
from rlhf_engine.demo import task
from rlhf_engine.demo.run import run_demo
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.models import load_causal_lm, load_tokenizer
from rlhf_engine.trainers.sft import SFTConfig, sft_loss


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def test_byte_tokenizer_round_trips_utf8(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "Un café, s'il vous plaît: 3 € ✓"
    ids = loaded.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert loaded.decode(ids) == text


def test_encode_masks_prompt_and_truncates_response(tokenizer):
    ids, labels = encode_sft(tokenizer, "User: hi\nAssistant:", " hello there", max_length=64)
    n_prompt = 1 + len("User: hi\nAssistant:")
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    ids, labels = encode_sft(tokenizer, "User: hi\nAssistant:", " hello there", max_length=n_prompt + 3)
    assert len(ids) == n_prompt + 3 and labels[-1] != tokenizer.eos_token_id
    with pytest.raises(ValueError, match="max_length"):
        encode_sft(tokenizer, "a long prompt", "x", max_length=4)


def test_sft_loss_equals_hf_cross_entropy(tokenizer, tmp_path):
    path = task.build_tiny_model_dir(str(tmp_path / "m"), vocab_size=len(tokenizer), seed=3)
    model = load_causal_lm(path)
    examples = [(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(4, seed=5)]
    batch = collate_sft([encode_sft(tokenizer, p, r, 96) for p, r in examples], tokenizer.pad_token_id)
    loss, n_tokens = sft_loss(model, batch)
    # HF's own loss: mean token cross-entropy over labels != -100, from the full logits
    hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert n_tokens == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss / n_tokens, hf, atol=1e-5, rtol=1e-5)


def test_sft_config_rejects_bad_values():
    with pytest.raises(ValueError, match="SFTConfig.steps"):
        SFTConfig(steps=0)
    with pytest.raises(ValueError, match="SFTConfig.lr"):
        SFTConfig(lr=0.0)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo at its default settings (about 1.5 min on 2 cores), seed 0."""
    out = str(tmp_path_factory.mktemp("demo") / "run")
    return out, run_demo(out, seed=0, progress=False)


def test_demo_improves_the_gold_score(demo_run):
    """The point of the pipeline: PPO against the learned reward model raises the annotator's (gold) score of
    the policy on held-out prompts by a clear margin (0.10 to 0.12 over seeds 0-2, README)."""
    out, summary = demo_run
    assert summary["gold_after"] > summary["gold_before"] + 0.05, summary
    assert summary["rm_accuracy"] > 0.75 and summary["sft_loss_final"] < 0.3
    names = ["summary.json", "curves.png", "preferences.jsonl", "sft.jsonl", "prompts.jsonl", "sft/config.json",
             "sft/tokenizer.json", "tokenizer/tokenizer.json", "reward_model/scalar_head.safetensors",
             "ppo/config.json"]
    names += [f"{phase}_metrics.jsonl" for phase in ("sft", "reward_model", "ppo")]
    for name in names:
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    for key in ("sft_loss_final", "rm_accuracy", "gold_before", "gold_after", "proxy_before", "proxy_after",
                "kl_final"):
        assert isinstance(saved[key], float), key
    assert set(saved["seconds"]) >= {"sft", "reward_model", "ppo"} and len(saved["samples"]) == 3
    reloaded = load_causal_lm(os.path.join(out, "ppo"))
    assert reloaded.config.vocab_size == len(load_tokenizer(os.path.join(out, "tokenizer")))


@pytest.mark.parametrize("policy_loss", ["gspo", "cispo", "sapo"])
def test_demo_runs_each_policy_loss(demo_run, policy_loss):
    out, _ = demo_run
    args = ["demo", "--out", out, "--phase", "ppo", "--algo", "grpo", "--policy-loss", policy_loss, "--steps", "2",
            "--no-progress"]
    assert main(args) == 0
    with open(os.path.join(out, "grpo_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and ("clipfrac" in rows[-1]) == (policy_loss != "sapo")


@pytest.mark.parametrize("algo", ["reinforce++", "remax"])
def test_demo_runs_reinforce_pp_and_remax(demo_run, algo):
    out, _ = demo_run
    assert main(["demo", "--out", out, "--phase", "ppo", "--algo", algo, "--steps", "2", "--no-progress"]) == 0
    with open(os.path.join(out, f"{algo}_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and ("baseline_reward_mean" in rows[-1]) == (algo == "remax")
    assert load_causal_lm(os.path.join(out, algo)).config.vocab_size > 0


def test_cli_policy_losses_are_the_ops():
    from rlhf_engine import cli, ops

    assert cli.POLICY_LOSSES == ops.POLICY_LOSSES


def test_demo_phase_flags_reuse_earlier_outputs(demo_run, tmp_path, capsys):
    out, _ = demo_run
    assert main(["demo", "--out", out, "--phase", "ppo", "--algo", "grpo", "--steps", "2", "--no-progress"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["algo"] == "grpo" and "rm_accuracy" in summary  # earlier phases' results kept
    assert os.path.exists(os.path.join(out, "grpo_metrics.jsonl")) and "GRPO policy" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="run the earlier phases first"):
        run_demo(str(tmp_path / "empty"), phase="rm", progress=False)
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--steps", "3"])  # --steps needs one --phase


def test_loader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(str(tmp_path))


def test_arithmetic_demo_learns_from_the_verifier(tmp_path):
    """`rlhf-engine demo --task arithmetic` (the CLI path) at its defaults: GRPO against the exact-answer verifier
    raises held-out accuracy over the SFT model (README: +0.17 to +0.25 over three seeds; the floor 0.15 is checked
    there, this test asserts a margin that another machine's run clears too)."""
    import json

    from rlhf_engine.cli import main

    out = tmp_path / "arith"
    assert main(["demo", "--task", "arithmetic", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["accuracy_after"] - summary["accuracy_before"] > 0.08, summary
    for name in ("curves.png", "sft.jsonl", "prompts.jsonl", "grpo_metrics.jsonl", "grpo/model.safetensors"):
        assert (out / name).exists(), name
    assert '"answer"' in (out / "prompts.jsonl").read_text().splitlines()[0]
    with pytest.raises(SystemExit, match="belong to the story task"):
        main(["demo", "--task", "arithmetic", "--phase", "rm"])
