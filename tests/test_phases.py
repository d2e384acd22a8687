"""The shared training loop and what it carries: packing, gradient accumulation, chat templates, DPO, the
non-finite guard, atomic checkpoints, and the CLI phases end to end with resume reproducing an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlhf_engine.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from rlhf_engine.cli import main
from rlhf_engine.data.jsonl import PreferenceRecord, SFTRecord, write_jsonl
from rlhf_engine.data.sft import IGNORE_INDEX, collate_sft, encode_chat, encode_record, encode_sft, pack_sft
from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.metrics import read_metrics
from rlhf_engine.models import load_causal_lm
from rlhf_engine.models.heads import CausalLMLogprobs
from rlhf_engine.trainers.common import Trainer
from rlhf_engine.trainers.dpo import DPOConfig, dpo_loss, evaluate_dpo, train_dpo
from rlhf_engine.trainers.sft import SFTConfig, sft_loss

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "m")
    task.build_tiny_model_dir(path, vocab_size=len(tokenizer), seed=3, hidden_size=32)
    tokenizer.save_pretrained(path)
    return path


def _examples(n, seed=5):
    return [(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(n, seed=seed)]


def test_packed_rows_give_the_unpacked_loss(tokenizer, model_dir):
    model = load_causal_lm(model_dir)
    encoded = [encode_sft(tokenizer, p, r, 96) for p, r in _examples(5)]
    loose_sum, loose_n = sft_loss(model, collate_sft(encoded, tokenizer.pad_token_id))
    width = sum(len(ids) for ids, _ in encoded[:3]) + 7  # a padding tail after the third example
    packed = pack_sft([encoded[:3], encoded[3:]], tokenizer.pad_token_id, width)
    assert packed.attention_mask is None and packed.position_ids[0, 0] == 0
    packed_sum, packed_n = sft_loss(model, packed)
    assert packed_n == loose_n
    torch.testing.assert_close(packed_sum, loose_sum, atol=1e-4, rtol=1e-5)  # no attention across examples
    with pytest.raises(ValueError, match="width"):
        pack_sft([encoded], tokenizer.pad_token_id, 10)


def test_grad_accumulation_is_the_mean_over_all_tokens(tokenizer, model_dir):
    """Two micro-batches of different token counts accumulate to the gradient of one batch of both."""
    encoded = [encode_sft(tokenizer, p, r, 96) for p, r in _examples(6)]
    halves = [collate_sft(encoded[:2], tokenizer.pad_token_id), collate_sft(encoded[2:], tokenizer.pad_token_id)]

    def grads(micro, accum):
        model = load_causal_lm(model_dir)
        config = SFTConfig(steps=1, batch_size=8, grad_accum=accum, lr=1.0, warmup_steps=0, max_grad_norm=1e9)
        trainer = Trainer(config, "sft", CausalLMLogprobs(model), progress=False)
        kept = []
        trainer.optimizer.zero_grad = lambda set_to_none=True: kept.extend(p.grad.clone() for p in model.parameters())
        row = trainer._one_step(list(micro), lambda b: {"loss": sft_loss(trainer.module, b)[0]},
                                lambda b: int((b.labels[:, 1:] != IGNORE_INDEX).sum()), "tokens")
        return kept, row

    accumulated, row = grads(halves, 2)
    whole, row_whole = grads([collate_sft(encoded, tokenizer.pad_token_id)], 1)
    assert row["tokens"] == row_whole["tokens"]
    assert abs(row["loss"] - row_whole["loss"]) < 1e-5
    for a, b in zip(accumulated, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_chat_messages_use_the_template(tokenizer):
    messages = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    with pytest.raises(ValueError, match="chat template"):
        encode_chat(tokenizer, messages, 64)
    chat = build_byte_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    ids, labels = encode_record(chat, SFTRecord("", "hello", messages), 64)
    text = chat.decode(ids)
    assert text == "<|bos|>user: hi<|eos|><|bos|>assistant: hello<|eos|>"
    prompt = chat.apply_chat_template(list(messages[:1]), add_generation_prompt=True, tokenize=False)
    n_prompt = len(chat.encode(prompt, add_special_tokens=False))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert chat.decode([t for t in labels if t != IGNORE_INDEX]) == chat.decode(ids[n_prompt:])
    assert ids[-1] == chat.eos_token_id  # the template's end of turn is learned


def test_dpo_loss_math():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    h = (pc - rc) - (pr - rr)  # 1.5
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.1), -torch.nn.functional.logsigmoid(0.1 * h))
    smoothed = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    expected = -0.8 * torch.nn.functional.logsigmoid(0.1 * h) - 0.2 * torch.nn.functional.logsigmoid(-0.1 * h)
    torch.testing.assert_close(smoothed, expected)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo"), (h - 2.0) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.5)


def _pairs(n, seed):
    """Chosen: an on-topic story; rejected: the same story shouted (a preference a tiny model learns fast)."""
    rng = random.Random(seed)
    out = []
    for p in task.make_prompts(n, seed):
        story = task.demonstration(p, rng)
        out.append(PreferenceRecord(task.format_prompt(p), story, story.upper()))
    return out


def test_dpo_learns_a_preference(tokenizer, model_dir):
    policy = load_causal_lm(model_dir)
    reference = load_causal_lm(model_dir)
    config = DPOConfig(steps=25, batch_size=8, lr=3e-3, warmup_steps=2, beta=0.5, max_length=128)
    held_out = _pairs(24, seed=9)
    before = evaluate_dpo(policy, reference, tokenizer, held_out, config)
    assert abs(before["loss"] - 0.6931) < 1e-3  # policy == reference: loss log 2, margin 0
    history = train_dpo(policy, tokenizer, _pairs(64, seed=1), config, reference=reference, progress=False)
    after = evaluate_dpo(policy, reference, tokenizer, held_out, config)
    assert after["loss"] < before["loss"] - 0.1 and after["accuracy"] > 0.8, (before, after)
    assert {"loss", "accuracy", "reward_chosen", "reward_rejected", "pairs", "lr"} <= set(history[-1])


def test_nonfinite_steps_are_skipped_then_abort(model_dir):
    model = load_causal_lm(model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    config = SFTConfig(steps=5, lr=1e-2, max_skipped_steps=3)
    trainer = Trainer(config, "sft", CausalLMLogprobs(model), progress=False)
    bad = lambda batch: {"loss": sum(p.sum() for p in model.parameters()) * float("inf")}  # noqa: E731
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.fit(lambda rng: [None], lambda items: None, bad, lambda b: 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    strict = Trainer(SFTConfig(steps=2, skip_nonfinite=False), "sft", CausalLMLogprobs(model), progress=False)
    with pytest.raises(FloatingPointError, match="skip_nonfinite"):
        strict.fit(lambda rng: [None], lambda items: None, bad, lambda b: 1)


def test_checkpoints_are_atomic_and_pruned(tmp_path, model_dir):
    model = load_causal_lm(model_dir)
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "checkpoints", "step-00000009.tmp-123"))  # a save killed halfway
    assert latest_checkpoint(out) is None
    for step in (1, 2, 3):
        save_checkpoint(out, step, models={"policy": model}, state={"step": step}, keep=2)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert not any(".tmp-" in n for n in os.listdir(os.path.join(out, "checkpoints")))
    assert os.path.isfile(os.path.join(latest_checkpoint(out), "policy", "model.safetensors"))


# -- the CLI ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_jsonl(str(root / "sft.jsonl"), [SFTRecord(p, r) for p, r in _examples(64)])
    write_jsonl(str(root / "prefs.jsonl"), _pairs(48, seed=2))
    write_jsonl(str(root / "prompts.jsonl"), [{"prompt": task.format_prompt(p)} for p in task.make_prompts(16, 4)])
    (root / "reward.py").write_text("def ascii_share(prompts, responses):\n"
                                    "    return [sum(c.isascii() for c in r) / max(1, len(r)) for r in responses]\n")
    return root


def _cli(*args):
    assert main([*map(str, args), "--no-progress"]) == 0


def test_cli_runs_every_phase(tmp_path, model_dir, data_files):
    d = data_files
    common = ["--max-length", 128, "--batch-size", 4, "--lr", 1e-3, "--warmup-steps", 1]
    _cli("sft", "--model", model_dir, "--data", d / "sft.jsonl", "--eval-data", d / "sft.jsonl", "--output-dir",
         tmp_path / "sft", "--steps", 4, "--save-every", 2, "--packing", "true", *common)
    sft = tmp_path / "sft"
    rows = read_metrics(str(sft / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "eval_loss" in rows[-1]
    assert [s for s, _ in list_checkpoints(str(sft))] == [2, 4]
    for name in ("model/model.safetensors", "model/tokenizer.json", "summary.json", "curves.png", "sft_config.json"):
        assert (sft / name).exists(), name
    _cli("rm", "--model", sft / "model", "--data", d / "prefs.jsonl", "--output-dir", tmp_path / "rm", "--steps", 3,
         *common)
    assert (tmp_path / "rm" / "model" / "scalar_head.safetensors").exists()
    _cli("dpo", "--model", sft / "model", "--data", d / "prefs.jsonl", "--output-dir", tmp_path / "dpo",
         "--steps", 2, *common)
    ppo = ["--data", d / "prompts.jsonl", "--max-new-tokens", 8, "--prompts-per-iteration", 2, "--minibatch-size", 4]
    _cli("ppo", "--model", sft / "model", "--reward-model", tmp_path / "rm" / "model", "--output-dir",
         tmp_path / "ppo", "--iterations", 2, *ppo)
    assert len(read_metrics(str(tmp_path / "ppo" / "metrics.jsonl"))) == 2
    _cli("grpo", "--model", sft / "model", "--reward-fn", f"{d / 'reward.py'}:ascii_share", "--output-dir",
         tmp_path / "grpo", "--iterations", 1, "--n-samples", 2, *ppo)
    with open(tmp_path / "grpo" / "summary.json") as f:
        assert json.load(f)["phase"] == "grpo"


def test_cli_errors_name_the_field(tmp_path, model_dir, data_files, capsys):
    assert main(["sft", "--data", str(data_files / "sft.jsonl"), "--output-dir", str(tmp_path)]) == 2
    assert "SFTConfig.model is required" in capsys.readouterr().err
    assert main(["sft", "--model", model_dir, "--dat", "x"]) == 2
    assert "did you mean 'data'" in capsys.readouterr().err
    args = ["--model", model_dir, "--data", str(data_files / "sft.jsonl"), "--output-dir", str(tmp_path / "o"),
            "--steps", "1", "--batch-size", "2", "--max-length", "128", "--no-progress"]
    assert main(["sft", *args]) == 0
    assert main(["sft", *args]) == 2  # a second fresh run would overwrite the first one's checkpoints
    assert "--resume" in capsys.readouterr().err
    assert main(["grpo", *args[:4], "--output-dir", str(tmp_path / "g"), "--n-samples", "1",
                 "--reward-fn", "x:y"]) == 2
    assert "n_samples must be >= 2 for grpo" in capsys.readouterr().err


def test_ppo_resume_reproduces_an_uninterrupted_run(tmp_path, model_dir, data_files):
    args = ["--model", model_dir, "--data", data_files / "prompts.jsonl", "--reward-fn",
            f"{data_files / 'reward.py'}:ascii_share", "--max-new-tokens", 8, "--prompts-per-iteration", 2,
            "--minibatch-size", 2, "--lr", 1e-3, "--critic-lr", 1e-3, "--save-every", 2]
    _cli("ppo", *args, "--output-dir", tmp_path / "whole", "--iterations", 4)
    _cli("ppo", *args, "--output-dir", tmp_path / "parts", "--iterations", 2)
    _cli("ppo", *args, "--output-dir", tmp_path / "parts", "--iterations", 4, "--resume")
    whole = read_metrics(str(tmp_path / "whole" / "metrics.jsonl"))
    parts = read_metrics(str(tmp_path / "parts" / "metrics.jsonl"))
    keys = ("reward_mean", "kl", "policy_loss", "value_loss", "entropy")
    assert [[r[k] for k in keys] for r in parts] == [[r[k] for k in keys] for r in whole]


def test_sigkill_then_resume_reproduces_the_metrics(tmp_path, model_dir, data_files):
    """A run killed with SIGKILL at an arbitrary point resumes from its last complete checkpoint and ends with
    exactly the metrics of an uninterrupted run."""
    args = ["sft", "--model", model_dir, "--data", str(data_files / "sft.jsonl"), "--steps", "120",
            "--save-every", "10", "--batch-size", "4", "--max-length", "128", "--lr", "1e-3", "--no-progress"]
    assert main([*args, "--output-dir", str(tmp_path / "whole")]) == 0
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", *args, "--output-dir", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = list_checkpoints(killed)[-1][0]
    assert 10 <= step < 120
    assert main([*args, "--output-dir", killed, "--resume"]) == 0
    whole = read_metrics(str(tmp_path / "whole" / "metrics.jsonl"))
    resumed = read_metrics(killed + "/metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(120))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == [(r["loss"], r["grad_norm"], r["lr"])
                                                                       for r in whole]


@pytest.mark.parametrize("phase", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_example_configs_load(phase):
    """The YAML files the README points at stay valid as config fields change."""
    from rlhf_engine.cli import _config_class
    from rlhf_engine.config import load_config

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", f"{phase}.yaml")
    config = load_config(_config_class(phase), path)
    config.require("model", "data", "output_dir")


def test_tokenizer_larger_than_the_model_is_named(tmp_path, data_files, capsys):
    tokenizer = build_byte_tokenizer()
    small = str(tmp_path / "small")
    task.build_tiny_model_dir(small, vocab_size=200, seed=0, hidden_size=32)  # fewer rows than the 259 tokens
    tokenizer.save_pretrained(small)
    assert main(["sft", "--model", small, "--data", str(data_files / "sft.jsonl"), "--output-dir",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert "the tokenizer has 259 tokens but the model's embedding has 200 rows" in capsys.readouterr().err
