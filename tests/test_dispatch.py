"""The dispatcher: forced backends, the automatic choice, and the fallback of an automatic Triton call."""

import logging

import pytest
import torch

from rlhf_engine.ops import _dispatch, token_logprobs


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("RLHF_ENGINE_BACKEND", raising=False)
    assert _dispatch.select_backend("op", torch.zeros(1)) == ("torch", False)


def test_forced_torch(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "torch")
    assert _dispatch.select_backend("op", torch.zeros(1)) == ("torch", True)


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.select_backend("token_logprobs", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.select_backend("token_logprobs", torch.zeros(1)) == ("triton", True)


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RLHF_ENGINE_BACKEND"):
        token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_automatic_triton_failure_falls_back_once(monkeypatch, caplog):
    monkeypatch.delenv("RLHF_ENGINE_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "select_backend", lambda op, *t, available: ("triton", False))
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())

    def broken(*args):
        raise RuntimeError("no GPU here")

    with caplog.at_level(logging.DEBUG, logger="rlhf_engine.ops"):
        for _ in range(3):
            impls = {"triton": broken, "torch": lambda x: x + 1}
            backend, out = _dispatch.run("op", (torch.zeros(1),), impls, torch.zeros(1))
            assert backend == "torch" and out.item() == 1.0
    assert sum("triton path failed" in r.message for r in caplog.records) == 1


def test_forced_triton_failure_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "select_backend", lambda op, *t, available: ("triton", True))

    def broken(*args):
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        _dispatch.run("op", (torch.zeros(1),), {"triton": broken, "torch": lambda x: x}, torch.zeros(1))
