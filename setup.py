"""Build of rlhf_engine._C (the paged KV-cache extension) and packaging of kernels/ as rlhf_engine.kernels.

Switches (environment):
  RLHF_ENGINE_CUDA=0|1   force the CUDA twins off / on. Unset: on when torch has CUDA and a toolkit is found.
  MAX_JOBS=N             parallel compile jobs; by default derived from free memory so a build never swaps.

A CPU-only install never needs nvcc: the .cu files are compiled only when CUDA is on.
"""

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# -fopenmp: at::parallel_for is OpenMP in torch's CPU builds and `omp simd` vectorises the row loops; the OpenMP
# runtime comes from torch's own libgomp (a dependency of libtorch_cpu), so nothing extra is linked.
# NOTE: literals, read by tests/test_cuda_compile.py, which compiles the CUDA sources with these same flags.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
CUDA_MACROS = [("RLHF_ENGINE_WITH_CUDA", "1")]


def _mem_based_jobs() -> int:
    # NOTE: each C++ TU that includes torch headers takes ~1.5 GiB in g++; leave headroom.
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        avail_gib = info.get("MemAvailable", 0) / (1024**2)
        return max(1, min(os.cpu_count() or 1, int(avail_gib // 2)))
    except OSError:
        return 1


def _want_cuda(torch_mod, cuda_home) -> bool:
    flag = os.environ.get("RLHF_ENGINE_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise ValueError(f"RLHF_ENGINE_CUDA must be 0 or 1, found {flag!r}")
        return flag == "1"
    return torch_mod.version.cuda is not None and cuda_home is not None


def _has_cuda_headers(home) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _set_cuda_home() -> None:
    """torch takes an unset CUDA_HOME to be the folder above the first ``nvcc`` on PATH. A wrapper script there
    (``/usr/local/bin/nvcc`` exec'ing the toolkit's own) makes that ``/usr/local``, which has no CUDA headers;
    then CUDA_HOME is set to the toolkit nvcc itself reports (``_HERE_`` in its ``--dryrun`` output)."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    if _has_cuda_headers(os.path.dirname(os.path.dirname(nvcc))):
        return
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return  # torch's own guess stands; _extensions names CUDA_HOME if it lacks the headers
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            home = os.path.dirname(line.split("=", 1)[1].strip())
            if _has_cuda_headers(home):
                os.environ["CUDA_HOME"] = home
            return


def _extensions():
    import torch

    if torch.version.cuda is not None and os.environ.get("RLHF_ENGINE_CUDA") != "0":
        _set_cuda_home()  # before cpp_extension reads it at import
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_mem_based_jobs()))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if _want_cuda(torch, CUDA_HOME):
        if torch.version.cuda is None:
            raise RuntimeError(
                f"RLHF_ENGINE_CUDA=1, but torch {torch.__version__} is a CPU build: install a CUDA "
                f"build of torch, or unset RLHF_ENGINE_CUDA"
            )
        if not _has_cuda_headers(CUDA_HOME):
            raise RuntimeError(
                f"building the CUDA sources, but CUDA_HOME={CUDA_HOME!r} has no include/cuda_runtime.h: "
                f"set CUDA_HOME to the CUDA toolkit (the folder with bin/nvcc and include/), or "
                f"RLHF_ENGINE_CUDA=0 for a CPU-only build"
            )
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            "rlhf_engine._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=CUDA_MACROS,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    else:
        ext = CppExtension(
            "rlhf_engine._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS},
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    # kernels/ lives at the top level of the repository but installs as rlhf_engine.kernels: a top-level
    # package named `kernels` belongs to another project on PyPI.
    packages=find_packages(include=["rlhf_engine", "rlhf_engine.*"]) + ["rlhf_engine.kernels"],
    package_dir={"rlhf_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
