"""Test-wide setup. TRITON_INTERPRET must be set before triton is imported: with it the Triton kernels run on
CPU tensors, which is how this suite exercises them on machines without a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (imported here, under the interpreter, whatever a test later sets)

# `make gpu-check` runs the kernel tests with their tensors on the GPU: the default device is the test device
if os.environ.get("RLHF_ENGINE_TEST_DEVICE", "cpu") != "cpu":
    torch.set_default_device(os.environ["RLHF_ENGINE_TEST_DEVICE"])

BACKENDS = ["torch", "triton"]  # triton is a dev dependency: its absence must fail, not skip


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once per backend, forcing it through RLHF_ENGINE_BACKEND."""
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", request.param)
    return request.param


@pytest.fixture(params=["torch", "triton", "native"])
def ppo_backend(request, monkeypatch):
    """The ops with a native C++ kernel (PPO loss, GAE), once per backend; native runs on CPU tensors only, so
    under `make gpu-check` (tensors on the GPU) its runs are skipped."""
    if request.param == "native" and os.environ.get("RLHF_ENGINE_TEST_DEVICE", "cpu") != "cpu":
        pytest.skip("the native kernels take CPU tensors; this run puts them on the GPU")
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
