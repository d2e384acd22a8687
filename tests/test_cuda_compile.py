"""Every CUDA source compiles with the flags setup.py uses, so the CUDA build is checked on machines without a GPU
or a CUDA build of torch:

- csrc/cuda/*.cu include CUDA headers only (no torch): nvcc compiles each to an object file;
- csrc/cuda/*.cpp (the torch wrappers) and bindings.cpp with RLHF_ENGINE_WITH_CUDA include torch's c10/cuda headers.
  A CPU build of torch ships those headers but not the one its CMake generates, c10/cuda/impl/cuda_cmake_macros.h,
  whose only macro (C10_CUDA_BUILD_SHARED_LIBS) is read on Windows alone. torch's own switch
  C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips that include, so on Linux these files see exactly the declarations a CUDA
  build gives them. They are checked with -fsyntax-only: the whole front end (templates instantiated, every call
  checked against its declaration) without generating code, which is what differs from a CUDA build here (no
  libtorch_cuda to link against).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
WRAPPERS = sorted(CUDA_DIR.glob("*.cpp"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (no CUDA toolkit): nothing to compile with")


def setup_py_constants() -> dict:
    """The literal module-level assignments of setup.py (CXX_FLAGS, NVCC_FLAGS, CUDA_MACROS), read without running
    it (running setup.py would start a build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id.isupper() and isinstance(node.value, (ast.List, ast.Tuple, ast.Constant))
    }


def cuda_include_dir() -> Path:
    """The include directory of the toolkit nvcc belongs to (nvcc -dryrun names its TOP; /usr/local/bin/nvcc may be
    a script that execs the real one)."""
    proc = subprocess.run([NVCC, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True, timeout=60)
    top = re.search(r"^#\$ TOP=(.*)$", proc.stdout + proc.stderr, re.MULTILINE)
    assert top, f"nvcc -dryrun did not name its TOP:\n{proc.stdout}\n{proc.stderr}"
    include = Path(top.group(1).strip()).resolve() / "include"
    assert (include / "cuda_runtime_api.h").exists(), f"no cuda_runtime_api.h under {include}"
    return include


def test_there_are_cuda_sources_and_setup_py_flags():
    assert CU_FILES and WRAPPERS, f"no .cu or .cpp files under {CUDA_DIR}"
    flags = setup_py_constants()
    assert {"CXX_FLAGS", "NVCC_FLAGS", "CUDA_MACROS"} <= flags.keys(), sorted(flags)
    assert "-std=c++20" in flags["CXX_FLAGS"] and "-std=c++20" in flags["NVCC_FLAGS"]


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(source, tmp_path):
    # NOTE: one architecture keeps this at seconds per file; sm_80 is the oldest GPU we target.
    flags = setup_py_constants()
    out = tmp_path / "out.o"
    cmd = [NVCC, "-c", *flags["NVCC_FLAGS"], "-arch=sm_80", "-Werror", "all-warnings", str(source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert out.stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("source", [*WRAPPERS, ROOT / "csrc" / "bindings.cpp"],
                         ids=[p.name for p in [*WRAPPERS, ROOT / "csrc" / "bindings.cpp"]])
def test_cuda_build_cpp_files_compile(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    flags = setup_py_constants()
    cxx = os.environ.get("CXX", "c++")
    macros = [f"-D{name}={value}" for name, value in flags["CUDA_MACROS"]]
    macros += ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    paths = [*include_paths(), cuda_include_dir(), sysconfig.get_paths()["include"], ROOT / "csrc"]
    cmd = [cxx, "-fsyntax-only", *flags["CXX_FLAGS"], *macros, "-Werror", *[f"-I{p}" for p in paths], str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
