"""The one place that decides, per call, which implementation of an op runs.

- ``RLHF_ENGINE_BACKEND=torch``: the PyTorch path, always.
- ``RLHF_ENGINE_BACKEND=triton``: the Triton kernels; raises if Triton does not import, or if the tensors are on
  the CPU and ``TRITON_INTERPRET=1`` is not set (that is how the tests run the kernels on CPU tensors).
- unset / ``auto``: Triton when every tensor is on CUDA and Triton imports, else PyTorch. An automatic Triton
  call that fails falls back to PyTorch with one debug log per op.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("rlhf_engine.ops")

BACKENDS = ("torch", "triton")
_ENV = "RLHF_ENGINE_BACKEND"
_fallback_logged: set[str] = set()


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising anything else
        return f"{type(err).__name__}: {err}"
    return None


def triton_available() -> bool:
    return _triton_import_error() is None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The backend forced by the environment, or ``"auto"``."""
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value not in BACKENDS:
        raise ValueError(f"{_ENV} must be one of torch, triton, auto; found {value!r}")
    return value


def select_backend(op: str, *tensors: torch.Tensor) -> tuple[str, bool]:
    """Returns ``(backend, forced)`` for one call of ``op`` on ``tensors``."""
    requested = requested_backend()
    if requested == "torch":
        return "torch", True
    on_cuda = all(t.is_cuda for t in tensors)
    if requested == "triton":
        err = _triton_import_error()
        if err is not None:
            raise RuntimeError(
                f"{op}: {_ENV}=triton but Triton does not import ({err}); install triton or unset {_ENV}"
            )
        if not on_cuda and not triton_interpret():
            raise RuntimeError(
                f"{op}: {_ENV}=triton with CPU tensors needs TRITON_INTERPRET=1 (set before importing triton); "
                f"or move the tensors to CUDA"
            )
        return "triton", True
    if on_cuda and triton_available():
        return "triton", False
    return "torch", False


def run(op: str, tensors: tuple[torch.Tensor, ...], triton_fn: Callable, torch_fn: Callable, *args, **kwargs):
    """Runs ``op`` on the selected backend; returns ``(backend, result)`` so a backward can stay on it."""
    backend, forced = select_backend(op, *tensors)
    if backend == "triton":
        try:
            return "triton", triton_fn(*args, **kwargs)
        except Exception as err:
            if forced:
                raise
            if op not in _fallback_logged:
                _fallback_logged.add(op)
                logger.debug("%s: Triton path failed (%s: %s); using the PyTorch path", op, type(err).__name__, err)
    return "torch", torch_fn(*args, **kwargs)
