"""The rule-based annotator that plays the human of the demo, and the gold score the reward model approximates.

A response to "... about a {subject}." scores, in [0, 1] after scaling:
    +2   it mentions the subject
    +1   it ends a sentence properly ('.' or '!')
    +1   a kind word (kind, happy, smiled, friend, warm, sang)
    -1   each immediately repeated word ("very very") and each "and so on"
    +1   a length of 10 to 24 words (-1 under 5 or over 40)
Preferences compare the gold scores of two responses; a tie gives no pair.
"""

from __future__ import annotations

import re

from rlhf_engine.demo.task import subject_of

KIND_WORDS = ("kind", "happy", "smiled", "friend", "warm", "sang")
_MAX, _MIN = 5.0, -3.0


def gold_score(prompt: str, response: str) -> float:
    words = re.findall(r"[a-zA-Z']+", response.lower())
    score = 0.0
    try:
        if subject_of(prompt) in words:
            score += 2
    except ValueError:
        pass
    if response.rstrip().endswith((".", "!")):
        score += 1
    if any(w in words for w in KIND_WORDS):
        score += 1
    score -= sum(1 for a, b in zip(words, words[1:], strict=False) if a == b)
    score -= response.lower().count("and so on")
    if 10 <= len(words) <= 24:
        score += 1
    elif len(words) < 5 or len(words) > 40:
        score -= 1
    return (min(max(score, _MIN), _MAX) - _MIN) / (_MAX - _MIN)


def prefer(prompt: str, a: str, b: str) -> tuple[str, str] | None:
    """(chosen, rejected) by gold score, or None on a tie."""
    sa, sb = gold_score(prompt, a), gold_score(prompt, b)
    if sa == sb:
        return None
    return (a, b) if sa > sb else (b, a)
