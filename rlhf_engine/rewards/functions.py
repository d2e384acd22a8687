"""Calling a user's reward function: the dataset row's fields as keyword arguments, every failure named.

A reward function is ``fn(prompts, responses, **fields) -> list[float]``: one call per batch, with each field of
the prompts' data rows (``{"prompt": ..., "answer": "42"}`` gives ``answer=[...]``) as a list aligned with the
responses. A function receives only the fields its signature names (all of them with ``**kwargs``), so
``fn(prompts, responses)`` keeps working. Instead of a float, an entry may be a dict with ``"score"`` and other
numbers to log (``{"score": 1.0, "format_ok": 1.0}``: their batch means are logged as ``reward/format_ok``).
"""

from __future__ import annotations

import inspect
import numbers

import torch


def _name(fn) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}:{qualname}" if module else qualname


def _keywords(fn) -> tuple[set[str] | None, set[str]]:
    """(the field names ``fn`` accepts, None for **kwargs; those it requires), beyond prompts and responses."""
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # no signature to read (some builtins): pass no fields
        return set(), set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = None
    else:
        accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                             p.KEYWORD_ONLY)}
    return accepted, required


def call_reward_fn(fn, prompts: list[str], responses: list[str],
                   fields: list[dict]) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """``fn(prompts, responses, **fields)`` as (scores [N] fp32, the logged extras of dict entries: name -> one
    value per response that has it); errors name the function and what went wrong."""
    name = _name(fn)
    n = len(responses)
    available = sorted({k for row in fields for k in row})
    accepted, required = _keywords(fn)
    missing = sorted(required - set(available))
    if missing:
        raise ValueError(f"reward_fn {name} needs the field(s) {missing} in every prompt row, but the rows have "
                         f"{available or 'no field beside prompt'}: add them to the prompts data")
    kwargs = {k: [row.get(k) for row in fields] for k in available if accepted is None or k in accepted}
    try:
        out = fn(prompts, responses, **kwargs)
    except Exception as err:
        raise RuntimeError(f"reward_fn {name} raised {type(err).__name__}: {err} (on a batch of {n} responses; "
                           f"first prompt: {prompts[0][:80]!r})") from err
    if torch.is_tensor(out):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise ValueError(f"reward_fn {name} returned a {type(out).__name__}: expected a list of {n} floats")
    if len(out) != n:
        raise ValueError(f"reward_fn {name} returned {len(out)} scores for {n} responses: expected one per "
                         f"response")
    scores, extras = [], {}
    for i, value in enumerate(out):
        if isinstance(value, dict):
            if "score" not in value:
                raise ValueError(f"reward_fn {name} returned a dict without 'score' for response {i}: {value!r}")
            for key, extra in value.items():
                if key != "score":
                    _check_number(name, extra, i, key)
                    extras.setdefault(key, []).append(float(extra))
            value = value["score"]
        _check_number(name, value, i, "score")
        scores.append(float(value))
    return torch.tensor(scores, dtype=torch.float32), extras  # non-finite scores: the trainer's guard


def _check_number(name: str, value, index: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"reward_fn {name} returned {value!r} (a {type(value).__name__}) as the {what} of "
                         f"response {index}: expected a float")
