"""Argument checks shared by the ops (raised as ValueError naming the op, the argument, expected and found), and
the reshapes every per-token op starts with."""

from __future__ import annotations

import math

import torch


def check_same_shape(op: str, reference_name: str, reference: torch.Tensor, **tensors) -> None:
    if not isinstance(reference, torch.Tensor) or not reference.dtype.is_floating_point:
        found = reference.dtype if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"{op}: {reference_name} must be a floating tensor, found {found}")
    if reference.dim() < 1:
        raise ValueError(f"{op}: {reference_name} must have shape [..., T], found a 0-dim tensor")
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, found {type(t).__name__}")
        if t.shape != reference.shape:
            raise ValueError(
                f"{op}: {name} shape {tuple(t.shape)} must equal {reference_name} shape {tuple(reference.shape)}"
            )
        if t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} on {reference.device}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, found {value!r}")


def check_number(op: str, name: str, value, *, low=None, low_inclusive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be a finite number, found {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{op}: {name} must be {'>=' if low_inclusive else '>'} {low}, found {value!r}")
    return float(value)


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [R, T] contiguous."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.float32 else mask.float()
