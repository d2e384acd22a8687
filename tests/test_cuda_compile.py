"""Every csrc/cuda/*.cu compiles with nvcc on its own (they include CUDA headers only, no torch), so the CUDA
kernels are checked on machines without a GPU or a CUDA build of torch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (no CUDA toolkit): the CUDA sources cannot be compiled")
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(source, tmp_path):
    # NOTE: -O1 and one architecture keep this at a few seconds per file; sm_80 is the oldest GPU we target.
    out = tmp_path / "out.o"
    cmd = [NVCC, *"-c -std=c++17 -O1 -arch=sm_80 -Werror all-warnings".split(), str(source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert out.stat().st_size > 0
