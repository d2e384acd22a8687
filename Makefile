# rlhf-engine: setup / test / demo / bench. Everything installs into .venv; `make test` and `make demo` run
# `setup` first, which is a no-op when nothing it depends on changed.
VENV       ?= .venv
PYTHON     ?= python3
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0
# Elsewhere than this machine, point pip at the CPU wheels: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP      := $(VENV)/.rlhf-engine-installed
NATIVE_SRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup test lint demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(NATIVE_SRC)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifneq ($(HAS_NVIDIA),1)
	@# No NVIDIA GPU: take the CPU wheel of torch first so that nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
else
	@# An NVIDIA GPU: a CUDA build of torch (pip's default wheel) first, unless one is there: the extension's
	@# build imports torch (--no-build-isolation), so it must be installed before the package.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch
endif
	$(PIP) install -q "setuptools>=69" wheel ninja "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m rlhf_engine.cli demo

bench: setup
	$(PY) benchmarks/bench_logprobs.py --json bench_out/logprobs.json
	$(PY) benchmarks/bench_ppo_loss.py --json bench_out/ppo_loss.json
	$(PY) benchmarks/bench_kv_cache.py --json bench_out/kv_cache.json
	$(PY) benchmarks/bench_rollout.py --json bench_out/rollout.json

# On a CUDA machine, with the interpreter given (no venv, no downloads): build _C with CUDA in place, the kernel,
# cache and rollout tests on cuda, a bf16 smoke, the microbenchmarks; one table, exit 1 on any failure.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --json bench_out/gpu_check.json

clean:
	rm -rf build *.egg-info rlhf_engine/_C*.so
