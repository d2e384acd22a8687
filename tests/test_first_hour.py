"""A newcomer's first hour (issue 17): defaults that run, errors that point at the fix. Each through the CLI where
that is the path a user takes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rlhf_engine.checkpoint import list_checkpoints
from rlhf_engine.cli import build_parser, main
from rlhf_engine.data.jsonl import DataError, PreferenceRecord, SFTRecord, read_jsonl, write_jsonl
from rlhf_engine.demo import task
from rlhf_engine.demo.tokenizer import build_byte_tokenizer
from rlhf_engine.metrics import read_metrics
from rlhf_engine.models import load_causal_lm
from rlhf_engine.models.heads import ScalarHeadModel
from rlhf_engine.trainers.ppo import PPOConfig
from rlhf_engine.trainers.reward import RewardConfig, train_reward_model
from rlhf_engine.trainers.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    """A tiny Llama (512 positions) with its tokenizer, the same model without one, a reward model, data files."""
    root = tmp_path_factory.mktemp("first_hour")
    model = str(root / "model")
    task.build_tiny_model_dir(model, vocab_size=len(tokenizer), seed=3, hidden_size=32)
    tokenizer.save_pretrained(model)
    bare = str(root / "bare")
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    rm = str(root / "rm")
    ScalarHeadModel(load_causal_lm(model)).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    examples = [(task.format_prompt(e.prompt), e.response) for e in task.make_sft_examples(32, seed=5)]
    write_jsonl(str(root / "sft.jsonl"), [SFTRecord(p, r) for p, r in examples])
    write_jsonl(str(root / "prompts.jsonl"), [{"prompt": task.format_prompt(p)} for p in task.make_prompts(8, 4)])
    # prompts far longer than max_prompt_length: the policy keeps their last tokens
    write_jsonl(str(root / "long.jsonl"), [{"prompt": "Once upon a time " * 30 + task.format_prompt(p)}
                                           for p in task.make_prompts(4, 6)])
    (root / "reward.py").write_text("def ascii_share(prompts, responses):\n"
                                    "    return [sum(c.isascii() for c in r) / max(1, len(r)) for r in responses]\n")
    return root


def _sft_args(files, out, *extra):
    return ["sft", "--model", str(files / "model"), "--data", str(files / "sft.jsonl"), "--output-dir", str(out),
            "--steps", "2", "--batch-size", "2", "--max-length", "128", "--no-progress", *map(str, extra)]


def _rl_args(phase, files, out, *extra):
    return [phase, "--model", str(files / "model"), "--data", str(files / "prompts.jsonl"), "--output-dir", str(out),
            "--reward-fn", f"{files / 'reward.py'}:ascii_share", "--max-new-tokens", "4", "--no-progress",
            *map(str, extra)]


# -- defaults and commands that run as written --------------------------------------------------------------------


def test_group_algorithms_default_to_a_group_of_eight():
    assert PPOConfig().n_samples == 1
    assert PPOConfig(algorithm="grpo").n_samples == 8 and PPOConfig(algorithm="rloo").n_samples == 8
    assert PPOConfig(algorithm="grpo", n_samples=4).n_samples == 4
    with pytest.raises(ValueError, match="n_samples must be >= 2 for rloo"):
        PPOConfig(algorithm="rloo", n_samples=1)


def test_bare_grpo_command_runs_with_its_defaults(files, tmp_path):
    out = tmp_path / "grpo"
    assert main(_rl_args("grpo", files, out, "--iterations", "1", "--prompts-per-iteration", "1")) == 0
    with open(out / "grpo_config.json") as f:
        saved = json.load(f)
    assert saved["algorithm"] == "grpo" and saved["n_samples"] == 8
    (row,) = read_metrics(str(out / "metrics.jsonl"))
    assert row["kl"] >= 0.0 and "kl_reward" in row  # the logged KL is k3, non-negative by construction


def test_rl_subcommand_refuses_a_config_of_another_algorithm(files, tmp_path, capsys):
    assert main(_rl_args("rloo", files, tmp_path / "o", "--algorithm", "ppo")) == 2
    assert "`rlhf-engine rloo` runs algorithm rloo" in capsys.readouterr().err


def test_top_level_help_names_each_phase_its_own_config():
    text = build_parser().format_help()
    assert "grpo --config grpo.yaml" in text and "rloo --config rloo.yaml" in text
    assert "grpo --config ppo.yaml" not in text and "rloo --config ppo.yaml" not in text


def test_example_configs_write_to_their_own_output_dirs():
    from rlhf_engine.cli import _config_class
    from rlhf_engine.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
    outputs = {}
    files = {"reinforce++": "reinforce_pp"}
    for name in ("sft", "rm", "dpo", "ppo", "grpo", "rloo", "reinforce++", "remax", "grpo_lora"):
        phase = name.removesuffix("_lora")
        defaults = {"algorithm": phase} if phase in ("ppo", "grpo", "rloo", "reinforce++", "remax") else None
        path = os.path.join(root, f"{files.get(name, name)}.yaml")
        config = load_config(_config_class(phase), path, defaults=defaults)
        if defaults:
            assert config.algorithm == phase
        config.require("model", "data", "output_dir")
        outputs[name] = config.output_dir
        if name.endswith("_lora"):
            assert config.lora_r > 0 and list(config.lora_target_modules) == ["all-linear"]
    assert len(set(outputs.values())) == len(outputs), outputs


def test_stop_after_steps_splits_a_grpo_run(files, tmp_path):
    out = tmp_path / "split"
    args = _rl_args("grpo", files, out, "--iterations", "3", "--prompts-per-iteration", "1", "--n-samples", "2")
    assert main([*args, "--stop-after-steps", "1"]) == 0
    assert [s for s, _ in list_checkpoints(str(out))] == [1]
    assert len(read_metrics(str(out / "metrics.jsonl"))) == 1
    assert main([*args, "--resume"]) == 0
    assert [r["iteration"] for r in read_metrics(str(out / "metrics.jsonl"))] == [0, 1, 2]


def test_python_api_takes_the_dicts_the_jsonl_files_hold(files, tokenizer):
    model = load_causal_lm(str(files / "model"))
    records = [{"prompt": "Write a story.", "response": "A cat sat."}, {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}assistant: {% endif %}"
    config = SFTConfig(steps=1, batch_size=2, max_length=64)
    assert len(train_sft(model, tokenizer, records, config, progress=False)) == 1
    with pytest.raises(DataError, match=r"examples\[0\]: missing field 'response'"):
        train_sft(model, tokenizer, [{"prompt": "x"}], config, progress=False)
    with pytest.raises(DataError, match=r"examples\[1\]: expected SFTRecord, a dict"):
        train_sft(model, tokenizer, [("a", "b"), 3], config, progress=False)
    rm = ScalarHeadModel(model)
    pairs = [{"prompt": "p", "chosen": "good.", "rejected": "bad"}, PreferenceRecord("q", "yes.", "no")]
    assert len(train_reward_model(rm, tokenizer, pairs, RewardConfig(steps=1, batch_size=2, max_length=64),
                                  progress=False)) == 1
    with pytest.raises(DataError, match=r"pairs\[0\]: expected PreferenceRecord or a dict"):
        train_reward_model(rm, tokenizer, ["p"], RewardConfig(steps=1), progress=False)


def test_no_progress_silences_the_libraries_bars_too(files, tmp_path, capfd):
    assert main(_sft_args(files, tmp_path / "quiet")) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s" not in err, err


# -- errors that point at the fix ---------------------------------------------------------------------------------


def test_model_without_a_tokenizer_says_how_to_add_one(files, tmp_path, capsys):
    args = _sft_args(files, tmp_path / "o")
    args[args.index("--model") + 1] = str(files / "bare")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "`tokenizer:`" in err and "save_pretrained" in err
    assert main([*args, "--tokenizer", str(files / "model")]) == 0


def test_max_length_above_the_models_positions_is_refused(files, tmp_path, capsys):
    args = _sft_args(files, tmp_path / "o")
    args[args.index("--max-length") + 1] = "1024"
    assert main(args) == 2
    assert "max_length = 1024 is above the model's max_position_embeddings = 512" in capsys.readouterr().err


def test_reward_model_scores_the_prompt_the_policy_kept(files, tmp_path):
    """Prompts of ~500 tokens, max_prompt_length 32: the reward model scores what the policy saw, so the run works
    (before: 'leaves no room in max_length', naming a key PPO configs do not have)."""
    args = ["grpo", "--model", str(files / "model"), "--data", str(files / "long.jsonl"), "--reward-model",
            str(files / "rm"), "--output-dir", str(tmp_path / "g"), "--iterations", "1", "--prompts-per-iteration",
            "1", "--n-samples", "2", "--max-prompt-length", "32", "--max-new-tokens", "4", "--no-progress"]
    assert main(args) == 0


def test_ctrl_c_prints_one_line_with_the_resume_command(files, tmp_path):
    out = str(tmp_path / "interrupted")
    args = _sft_args(files, out, "--save-every", "2")
    args[args.index("--steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list_checkpoints(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("rlhf-engine sft: interrupted after step ")
    assert "last complete checkpoint: " + os.path.join(out, "checkpoints", "step-") in line
    assert line.endswith(f"--output-dir {out} --steps 100000 --batch-size 2 --max-length 128 --no-progress "
                         f"--save-every 2 --resume")


def test_tensorboard_without_the_package_is_one_line(files, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here: the run would write events")
    assert main([*_sft_args(files, tmp_path / "o"), "--tensorboard", "true"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install tensorboard" in err, err


@pytest.mark.parametrize("text", ['[{"prompt": "a", "response": "b"}]\n',
                                  '{\n  "prompt": "a",\n  "response": "b"\n}\n'])
def test_a_json_document_is_not_json_lines(tmp_path, text):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(DataError, match=r"data.json:1: .*one JSON object per line"):
        read_jsonl(str(path), "sft")


def test_reward_fn_is_named_by_module_or_by_file(files):
    from rlhf_engine.demo import annotator
    from rlhf_engine.trainers.phases import load_reward_fn

    assert load_reward_fn("rlhf_engine.demo.annotator:gold_score") is annotator.gold_score
    by_file = load_reward_fn(f"{files / 'reward.py'}:ascii_share")
    assert by_file(["p"], ["ab"]) == [1.0]
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward_fn("rlhf_engine.demo.annotator:nope")
