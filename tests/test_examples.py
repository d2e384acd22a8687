"""The examples in examples/ run, with small settings: the two that need only rlhf-engine in this process, the TRL
one (optional extra) in a subprocess."""

import importlib.util
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hand_written_grpo_climbs():
    history = load_example("hand_written_grpo").main(["--steps", "8", "--max-new-tokens", "16"])
    assert len(history) == 8
    first = sum(h["reward"] for h in history[:2]) / 2
    last = sum(h["reward"] for h in history[-2:]) / 2
    assert last > first + 0.05, [round(h["reward"], 3) for h in history]
    assert history[0]["kl"] < 1e-4  # the policy starts as the reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rollout_only(arch, capsys):
    outputs = load_example("rollout_only").main(["--arch", arch, "-n", "3", "--max-new-tokens", "5"])
    assert len(outputs) == 2 and all(len(o.samples) == 3 for o in outputs)
    assert all(len(s.token_ids) == 5 and len(s.logprobs) == 5 for o in outputs for s in o.samples)
    assert "tokens/s" in capsys.readouterr().out


def test_trl_subclass():
    pytest.importorskip("trl", reason="TRL is the optional [bench] extra")
    script = os.path.join(EXAMPLES, "trl_grpo_fused_logprobs.py")
    proc = subprocess.run([sys.executable, script, "--steps", "2", "--check"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = next(line for line in proc.stdout.splitlines() if line.startswith("check:"))
    assert float(check.rsplit("=", 1)[1]) < 1e-4, check
    assert "reward per step:" in proc.stdout
