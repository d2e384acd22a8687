"""The one place that decides, per call, which implementation of an op runs.

Backends: ``triton`` (the kernels in ``rlhf_engine.kernels``), ``native`` (CPU kernels in ``rlhf_engine._C``, for
the ops that have them) and ``torch`` (the PyTorch path every op has).

- ``RLHF_ENGINE_BACKEND=torch``: the PyTorch path, always.
- ``RLHF_ENGINE_BACKEND=triton``: the Triton kernels; raises if Triton does not import, or if the tensors are on
  the CPU and ``TRITON_INTERPRET=1`` is not set (that is how the tests run the kernels on CPU tensors).
- ``RLHF_ENGINE_BACKEND=native``: the C++ CPU kernels; raises for an op without one or for non-CPU tensors.
- unset / ``auto``: Triton when every tensor is on CUDA and Triton imports; native when every tensor is on the
  CPU and the op has a native kernel; else PyTorch.

The decision uses only what is known before the launch (device, importability, the op's own limits). A kernel
that then fails raises ``KernelError`` naming the op, the backend, the shapes and how to force another backend:
never a silent fallback, which on a GPU would hide a broken kernel, retry its compile on every call, and run on
after a CUDA fault has left the context unusable. Triton launches run under the tensors' device
(``torch.cuda.device``), as the C++ ops do with their device guard.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch

BACKENDS = ("torch", "triton", "native")
_ENV = "RLHF_ENGINE_BACKEND"


class KernelError(RuntimeError):
    """A kernel failed after the dispatcher chose it; the cause is chained (``__cause__``)."""


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


@functools.lru_cache(maxsize=1)
def _native_import_error() -> str | None:
    try:
        from rlhf_engine import _C  # noqa: F401
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def native_available() -> bool:
    return _native_import_error() is None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The backend forced by the environment, or ``"auto"``."""
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value not in BACKENDS:
        raise ValueError(f"{_ENV} must be one of torch, triton, native, auto; found {value!r}")
    return value


def select_backend(op: str, *tensors: torch.Tensor, available=("torch", "triton")) -> tuple[str, bool]:
    """Returns ``(backend, forced)`` for one call of ``op`` on ``tensors``; ``available`` lists the op's backends."""
    requested = requested_backend()
    if requested == "torch":
        return "torch", True
    on_cuda = all(t.is_cuda for t in tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if requested != "auto" and requested not in available:
        raise RuntimeError(f"{op}: {_ENV}={requested} but {op} has no {requested} backend (it has {list(available)})")
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
    if requested == "native":
        err = _native_import_error()
        if err is not None:
            raise RuntimeError(f"{op}: {_ENV}=native but rlhf_engine._C does not load ({err}); rebuild the package")
        if not on_cpu:
            raise RuntimeError(f"{op}: {_ENV}=native runs on CPU tensors only; unset it for CUDA tensors")
        return "native", True
    if on_cuda and "triton" in available and triton_available():
        return "triton", False
    if on_cpu and "native" in available and native_available():
        return "native", False
    return "torch", False


def _describe(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}" for t in tensors)


def device_of(tensors) -> contextlib.AbstractContextManager:
    """The CUDA device the tensors live on, made current for a launch (a no-op for CPU tensors)."""
    for t in tensors:
        if t.is_cuda:
            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def launch(op: str, backend: str, tensors: tuple[torch.Tensor, ...], fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on ``backend``, under the tensors' device; a failure raises ``KernelError``.

    Every launch of a non-PyTorch implementation goes through here, the backwards included, so that each op
    fails alike.
    """
    if backend == "torch":
        return fn(*args, **kwargs)
    try:
        with device_of(tensors):
            return fn(*args, **kwargs)
    except Exception as err:
        raise KernelError(
            f"{op}: the {backend} kernel failed on inputs [{_describe(tensors)}]: {type(err).__name__}: {err}. "
            f"Run the PyTorch path with {_ENV}=torch (every op has one) and report the failure with these shapes"
        ) from err


def run(op: str, tensors: tuple[torch.Tensor, ...], impls: dict[str, Callable], *args, **kwargs):
    """Runs ``op`` on the selected backend among ``impls`` (name -> function, "torch" required).

    Returns ``(backend, result)`` so that a backward can stay on the forward's backend.
    """
    backend, _ = select_backend(op, *tensors, available=tuple(impls))
    return backend, launch(op, backend, tensors, impls[backend], *args, **kwargs)
