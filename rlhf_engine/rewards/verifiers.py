"""Rule-based rewards for verifiable tasks: a final-answer match, a format check, a length penalty.

Each reward is a batch function ``(prompts, responses, **fields) -> list[float]``, the shape a ``reward_fn`` has,
with the dataset row's fields (e.g. ``answer``) as lists beside the responses:

    math_answer(prompts, responses, answer=["42", "3/4"])        # 1.0 where the final answer equals the reference

The answer of a response is read, in this order of precedence, from its last GSM8K marker (``#### 42``), else its
last ``\\boxed{...}``, else its last number. Numbers compare exactly as fractions: ``1,000`` = ``1000``, ``-0`` =
``0``, ``3/4`` = ``0.75`` = ``\\frac{3}{4}``, ``+5`` = ``5``; anything that is not a number compares as text
(case, spaces, ``$`` and a trailing period ignored).
"""

from __future__ import annotations

import re
from fractions import Fraction

_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
# a number as people write it: sign, thousands separators, decimals, a fraction a/b
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces nested inside it allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unclosed: no answer


def extract_answer(text: str) -> str | None:
    """The final answer of ``text``: the last ``#### ...`` line, else the last ``\\boxed{...}``, else the last
    number; None when there is none."""
    marked = _GSM8K.findall(text)
    if marked and marked[-1].strip():
        return marked[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number (commas as thousands separators, a sign, decimals, ``a/b``, ``\\frac{a}{b}``,
    surrounding ``$`` and spaces and a trailing period allowed), or None when it is not one number."""
    s = text.strip().strip("$").strip().rstrip(".").replace(" ", "")
    s = _FRAC.sub(lambda m: f"({m.group(1)})/({m.group(2)})", s).replace("(", "").replace(")", "")
    if not s or _NUMBER.fullmatch(s) is None:
        return None
    s = s.replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise_text(text: str) -> str:
    return re.sub(r"\s+", "", text.strip().strip("$").rstrip(".")).lower()


def answers_equal(predicted: str | None, reference: str) -> bool:
    """Exact numeric equality when both are numbers, else equality of the normalised text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return _normalise_text(predicted) == _normalise_text(reference)


def _per_sample(name: str, values, n: int, field: str) -> list:
    if isinstance(values, (str, int, float)):
        raise ValueError(f"{name}: {field} must be a list with one entry per response ({n}), found one "
                         f"{type(values).__name__}; the trainer passes each dataset field as such a list")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name}: {field} has {len(values)} entries for {n} responses")
    return values


def math_answer(prompts: list[str], responses: list[str], answer, **_fields) -> list[float]:
    """1.0 where the response's final answer (``extract_answer``) equals ``answer`` (``answers_equal``), else 0.0.
    A reference may be a full worked solution: its own final answer is taken."""
    references = _per_sample("math_answer", answer, len(responses), "answer")
    scores = []
    for response, reference in zip(responses, references, strict=True):
        reference = str(reference)
        gold = extract_answer(reference) if ("####" in reference or "\\boxed" in reference) else reference
        scores.append(1.0 if gold is not None and answers_equal(extract_answer(response), gold) else 0.0)
    return scores


def math_verify_answer(prompts: list[str], responses: list[str], answer, **_fields) -> list[float]:
    """``math_answer`` through the ``math_verify`` package (symbolic equivalence of LaTeX and expressions); needs
    the optional extra: ``pip install 'rlhf-engine[math]'``."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("math_verify_answer needs the math-verify package: pip install 'rlhf-engine[math]' "
                          "(or math-verify); rlhf_engine.rewards:math_answer needs nothing") from None
    references = _per_sample("math_verify_answer", answer, len(responses), "answer")
    return [1.0 if verify(parse(str(ref)), parse(resp)) else 0.0
            for resp, ref in zip(responses, references, strict=True)]


def format_reward(prompts: list[str], responses: list[str], pattern: str = r"####\s*\S", **_fields) -> list[float]:
    """1.0 where ``pattern`` (a regular expression; by default a GSM8K answer marker) occurs in the response."""
    compiled = re.compile(pattern, re.DOTALL)
    return [1.0 if compiled.search(r) else 0.0 for r in responses]


def length_penalty(prompts: list[str], responses: list[str], max_chars: int = 400, **_fields) -> list[float]:
    """0 up to ``max_chars`` characters, then -(excess / max_chars), down to -1: added to another reward, it
    discourages rambling without rewarding empty answers."""
    if max_chars <= 0:
        raise ValueError(f"length_penalty: max_chars must be > 0, found {max_chars}")
    return [-min(1.0, max(0, len(r) - max_chars) / max_chars) for r in responses]
