"""Built-in rewards for verifiable tasks, usable by name as ``reward_fn: rlhf_engine.rewards:math_answer``."""

from rlhf_engine.rewards.functions import call_reward_fn
from rlhf_engine.rewards.verifiers import (
    answers_equal,
    extract_answer,
    format_reward,
    length_penalty,
    math_answer,
    math_verify_answer,
    parse_number,
)

__all__ = ["call_reward_fn", "answers_equal", "extract_answer", "format_reward", "length_penalty", "math_answer",
           "math_verify_answer", "parse_number"]
