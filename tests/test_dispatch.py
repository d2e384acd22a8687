"""The dispatcher: forced backends, the automatic choice, and a failing kernel that raises (never falls back).
The CPU cases name their device: `make gpu-check` makes cuda the default device."""

import pytest
import torch

from rlhf_engine.ops import _dispatch, token_logprobs


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("RLHF_ENGINE_BACKEND", raising=False)
    assert _dispatch.select_backend("op", torch.zeros(1, device="cpu")) == ("torch", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("RLHF_ENGINE_BACKEND", raising=False)
    assert _dispatch.select_backend("op", torch.zeros(1, device="cuda")) == ("triton", False)


def test_forced_torch(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    assert _dispatch.select_backend("op", torch.zeros(1)) == ("torch", True)


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.select_backend("token_logprobs", torch.zeros(1, device="cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.select_backend("token_logprobs", torch.zeros(1, device="cpu")) == ("triton", True)


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RLHF_ENGINE_BACKEND"):
        token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("forced", [False, True])
def test_a_failing_kernel_raises_naming_op_backend_shapes_and_the_switch(monkeypatch, forced):
    monkeypatch.setattr(_dispatch, "select_backend", lambda op, *t, available: ("triton", forced))
    calls = []

    def broken(*args):
        raise RuntimeError("kernel failed")

    def torch_path(x):
        calls.append(x)
        return x

    for _ in range(2):  # every call raises: nothing is cached, nothing falls back
        with pytest.raises(_dispatch.KernelError) as info:
            x = torch.zeros(3, 5, device="cpu")
            _dispatch.run("op", (x,), {"triton": broken, "torch": torch_path}, x)
        message = str(info.value)
        for part in ("op:", "triton kernel failed", "(3, 5) float32 on cpu", "RuntimeError: kernel failed",
                     "RLHF_ENGINE_BACKEND=torch"):
            assert part in message
        assert isinstance(info.value.__cause__, RuntimeError)
    assert calls == []


def _break_triton_kernels(monkeypatch):
    from rlhf_engine.kernels import logprobs as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("compile error")

    monkeypatch.setattr(kernels, "token_logprobs_forward", broken)
    monkeypatch.setattr(kernels, "token_logprobs_backward", broken)
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "triton")


def test_token_logprobs_kernel_failure_is_named(monkeypatch):
    _break_triton_kernels(monkeypatch)
    with pytest.raises(_dispatch.KernelError, match=r"token_logprobs: the triton kernel failed .*\(4, 7\) float32"):
        token_logprobs(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))


def test_linear_logprobs_kernel_failure_is_named_forward_and_backward(monkeypatch):
    from rlhf_engine.kernels import logprobs as kernels
    from rlhf_engine.ops import linear_logprobs

    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(9, 3)
    targets = torch.zeros(4, dtype=torch.long)
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "triton")
    out = linear_logprobs(hidden, weight, targets)
    with monkeypatch.context() as patched:
        _break_triton_kernels(patched)
        with pytest.raises(_dispatch.KernelError, match=r"linear_logprobs: the triton kernel failed .*\(9, 3\)"):
            linear_logprobs(hidden, weight, targets)

    def broken(*args, **kwargs):
        raise RuntimeError("bad launch")

    monkeypatch.setattr(kernels, "token_logprobs_backward", broken)
    with pytest.raises(_dispatch.KernelError, match=r"linear_logprobs \(backward\): the triton kernel failed"):
        out.sum().backward()
