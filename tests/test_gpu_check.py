"""`make gpu-check` without a GPU: it says so, lists every step it would run, and exits 0; its smoke runs on the CPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: `make gpu-check` runs for real")
def test_without_a_gpu_it_lists_the_steps_and_exits_0(capsys):
    module = _load()
    assert module.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out
    for step in ("RLHF_ENGINE_CUDA=1", "RLHF_ENGINE_BACKEND=triton", "RLHF_ENGINE_BACKEND=torch", "--smoke",
                 "bench_logprobs.py", "test_paged_attention.py",
                 "RLHF_ENGINE_TEST_MODEL_DEVICE=cuda", "test_rollout_architectures.py"):
        assert step in out


def test_the_smoke_runs_on_the_cpu():
    """The GPU smoke (bf16 SFT -> reward model -> GRPO through the trainers' API) on the CPU: its calls stay in
    step with the trainers between the rare runs on a GPU."""
    assert _load().smoke("cpu") == 0


@pytest.mark.parametrize("where", ["nothing installed", "another checkout installed"])
def test_an_uninstalled_checkout_finds_its_kernels(where, tmp_path):
    """`make gpu-check` runs the tree with an interpreter where nothing is installed: ``rlhf_engine.kernels`` is
    then the top-level kernels/ folder (an install maps it there). ``-S``: no site-packages, so no install helps.
    A copy of the tree run with this venv (whose editable install maps the name to this checkout) takes its own."""
    import shutil
    import subprocess
    import sys

    root = SCRIPT.parents[1]
    flags = ["-S"]
    if where == "another checkout installed":
        shutil.copytree(root / "kernels", tmp_path / "kernels")
        (tmp_path / "rlhf_engine").mkdir()
        shutil.copy(root / "rlhf_engine" / "__init__.py", tmp_path / "rlhf_engine")
        (tmp_path / "csrc").mkdir()
        root, flags = tmp_path, []
    code = ("import importlib.util, rlhf_engine, rlhf_engine.kernels as k; assert rlhf_engine.kernels is k; "
            "print(k.__file__); print(importlib.util.find_spec('rlhf_engine.kernels.logprobs').origin)")
    out = subprocess.run([sys.executable, *flags, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": ""}).stdout.split()
    assert out == [str(root / "kernels" / "__init__.py"), str(root / "kernels" / "logprobs.py")]
