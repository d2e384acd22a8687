"""Built-in verifiers (rlhf_engine.rewards) on a table of tricky cases."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from rlhf_engine.rewards import (
    answers_equal,
    extract_answer,
    format_reward,
    length_penalty,
    math_answer,
    parse_number,
)

EXTRACT = [
    ("The answer is 42.", "42"),
    ("no digits here", None),
    ("first 3 then 7", "7"),  # the last number
    ("so 5 apples\n#### 12", "12"),  # the GSM8K marker wins over the last number
    ("#### 1\nwait, no\n#### 2", "2"),  # two marked answers: the last
    ("#### \nthen 9", "9"),  # an empty marker is no answer
    ("we get \\boxed{\\frac{3}{4}} or 0.5", "\\frac{3}{4}"),  # boxed wins over a later number
    ("\\boxed{1} and \\boxed{{2}}", "{2}"),  # nested braces, the last box
    ("\\boxed{12", "12"),  # an unclosed box falls back to the last number
    ("total: 1,000 dollars", "1,000"),
    ("it is -0", "-0"),
    ("about .5", ".5"),
]


@pytest.mark.parametrize("text, expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


NUMBERS = [
    ("1,000", Fraction(1000)), ("1000", Fraction(1000)), ("-0", Fraction(0)), ("+5", Fraction(5)),
    ("3/4", Fraction(3, 4)), ("0.75", Fraction(3, 4)), ("\\frac{3}{4}", Fraction(3, 4)),
    ("\\dfrac{-6}{8}", Fraction(-3, 4)), ("$12$", Fraction(12)), ("7.", Fraction(7)), (" 1 000 ", Fraction(1000)),
    ("1/0", None), ("1,00", None), ("abc", None), ("1.2.3", None), ("", None), ("2x", None),
]


@pytest.mark.parametrize("text, expected", NUMBERS)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


EQUAL = [
    ("1,000", "1000", True), ("-0", "0", True), ("3/4", "0.75", True), ("\\frac{3}{4}", "0.75", True),
    ("0.75", "0.7500", True), ("42", "42.0", True), ("41", "42", False), ("-5", "5", False),
    ("Paris", " paris. ", True), ("x + 1", "x+1", True), (None, "1", False), ("1/3", "0.33", False),
]


@pytest.mark.parametrize("predicted, reference, expected", EQUAL)
def test_answers_equal(predicted, reference, expected):
    assert answers_equal(predicted, reference) is expected


def test_math_answer_scores_a_batch():
    responses = ["so #### 1,000", "I think \\boxed{3/4}", "no idea", "#### 7\n#### 8", "It is -0."]
    answers = ["1000", "0.75", "1", "7", "0"]
    assert math_answer([""] * 5, responses, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    # a reference given as a worked solution: its own final answer is the reference
    assert math_answer(["q"], ["#### 18"], answer=["3 + 15 = 18\n#### 18"]) == [1.0]


def test_math_answer_names_a_bad_answer_field():
    with pytest.raises(ValueError, match="answer has 1 entries for 2 responses"):
        math_answer(["a", "b"], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="answer must be a list with one entry per response"):
        math_answer(["a"], ["1"], answer="1")


def test_format_and_length_rewards():
    assert format_reward(["", ""], ["work\n#### 3", "3"]) == [1.0, 0.0]
    assert format_reward([""], ["<answer>4</answer>"], pattern=r"<answer>.*</answer>") == [1.0]
    assert length_penalty(["", "", ""], ["a" * 10, "a" * 15, "a" * 100], max_chars=10) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="max_chars must be > 0"):
        length_penalty([""], ["a"], max_chars=0)


def test_usable_by_name_as_a_reward_fn():
    from rlhf_engine.trainers.phases import load_reward_fn

    assert load_reward_fn("rlhf_engine.rewards:math_answer") is math_answer


# -- calling a reward function with the rows' fields --------------------------------------------------------------


def test_reward_fn_gets_the_fields_it_names():
    from rlhf_engine.rewards import call_reward_fn

    seen = {}

    def plain(prompts, responses):
        return [1.0] * len(responses)

    def named(prompts, responses, answer, bonus=0.0):
        seen.update(answer=answer, bonus=bonus)
        return [float(r == a) for r, a in zip(responses, answer, strict=True)]

    def anything(prompts, responses, **fields):
        seen.update(fields=sorted(fields))
        return [0.5] * len(responses)

    fields = [{"answer": "1", "id": 7}, {"answer": "2", "id": 8}]
    assert call_reward_fn(plain, ["p", "q"], ["1", "3"], fields)[0].tolist() == [1.0, 1.0]
    assert call_reward_fn(named, ["p", "q"], ["1", "3"], fields)[0].tolist() == [1.0, 0.0]
    assert seen["answer"] == ["1", "2"] and seen["bonus"] == 0.0
    assert call_reward_fn(anything, ["p", "q"], ["1", "3"], fields)[0].tolist() == [0.5, 0.5]
    assert seen["fields"] == ["answer", "id"]

    def with_extras(prompts, responses):
        return [{"score": 2.0, "format_ok": 1.0}, {"score": -1.0, "format_ok": 0.0}]

    scores, extras = call_reward_fn(with_extras, ["p", "q"], ["a", "b"], [{}, {}])
    assert scores.tolist() == [2.0, -1.0] and extras == {"format_ok": [1.0, 0.0]}


def test_reward_fn_failures_name_the_function():
    from rlhf_engine.rewards import call_reward_fn

    def one_score(prompts, responses):
        return [1.0]

    def text_score(prompts, responses):
        return ["good"] * len(responses)

    def broken(prompts, responses):
        raise KeyError("oops")

    with pytest.raises(ValueError, match=r"reward_fn .*one_score returned 1 scores for 2 responses"):
        call_reward_fn(one_score, ["p", "q"], ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match=r"text_score returned 'good' \(a str\) as the score of response 0"):
        call_reward_fn(text_score, ["p"], ["a"], [{}])
    with pytest.raises(RuntimeError, match=r"broken raised KeyError: 'oops'.*first prompt: 'p'"):
        call_reward_fn(broken, ["p"], ["a"], [{}])
    with pytest.raises(ValueError, match=r"math_answer needs the field\(s\) \['answer'\].*rows have \['id'\]"):
        call_reward_fn(math_answer, ["p"], ["a"], [{"id": 1}])


def test_grpo_with_the_built_in_verifier_by_name(tmp_path):
    """The CLI path: prompts with an `answer` field, `reward_fn: rlhf_engine.rewards:math_answer`."""
    from rlhf_engine.cli import main
    from rlhf_engine.data.jsonl import read_jsonl, write_jsonl
    from rlhf_engine.demo import task
    from rlhf_engine.demo.tokenizer import build_byte_tokenizer
    from rlhf_engine.metrics import read_metrics

    tokenizer = build_byte_tokenizer()
    model = str(tmp_path / "m")
    task.build_tiny_model_dir(model, vocab_size=len(tokenizer), seed=1, hidden_size=32)
    tokenizer.save_pretrained(model)
    data = str(tmp_path / "q.jsonl")
    write_jsonl(data, [{"prompt": f"What is {a} + {b}? ", "answer": str(a + b)} for a, b in [(1, 2), (3, 4)]])
    assert read_jsonl(data, "prompts")[0].fields == {"answer": "3"}
    out = tmp_path / "g"
    assert main(["grpo", "--model", model, "--data", data, "--reward-fn", "rlhf_engine.rewards:math_answer",
                 "--output-dir", str(out), "--iterations", "1", "--prompts-per-iteration", "2", "--n-samples", "2",
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    assert 0.0 <= read_metrics(str(out / "metrics.jsonl"))[0]["reward_mean"] <= 1.0


# -- scoring in workers, timeouts, error scores -------------------------------------------------------------------

REWARDS_PY = '''
import time

def batch_len(prompts, responses, answer=None):
    return [float(len(r)) for r in responses]

def per_sample(prompt, response, answer):
    if response == "boom":
        raise ValueError("bad sample")
    return float(response == answer)

def slow(prompt, response):
    time.sleep(60 if response == "slow" else 0)
    return 1.0
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return str(path)


def test_per_sample_functions_are_told_apart_by_their_parameter_names(rewards_file):
    from rlhf_engine.rewards.scoring import RewardScorer, is_per_sample
    from rlhf_engine.trainers.phases import load_reward_fn

    per_sample = load_reward_fn(f"{rewards_file}:per_sample")
    assert is_per_sample(per_sample) and not is_per_sample(math_answer)
    scorer = RewardScorer(per_sample)
    scores, errors, _ = scorer.submit(["p", "q"], ["1", "2"], [{"answer": "1"}, {"answer": "3"}]).result()
    assert scores.tolist() == [1.0, 0.0] and errors == 0
    with pytest.raises(RuntimeError, match=r"on sample 1 \(prompt 'q'\).*raised ValueError: bad sample"):
        scorer.submit(["p", "q"], ["1", "boom"], [{"answer": "1"}, {"answer": "3"}]).result()
    scorer = RewardScorer(per_sample, on_error=-1.0)
    scores, errors, _ = scorer.submit(["p", "q"], ["1", "boom"], [{"answer": "1"}, {"answer": "3"}]).result()
    assert scores.tolist() == [1.0, -1.0] and errors == 1 and "bad sample" in scorer.last_error


def test_workers_give_the_in_process_scores_and_a_timeout_scores_on_error(rewards_file):
    from rlhf_engine.rewards.scoring import RewardScorer
    from rlhf_engine.trainers.phases import load_reward_fn

    spec = f"{rewards_file}:batch_len"
    responses = ["a" * i for i in range(7)]
    local, _, _ = RewardScorer(load_reward_fn(spec)).submit(["p"] * 7, responses, [{}] * 7).result()
    scorer = RewardScorer(load_reward_fn(spec), spec=spec, workers=2)
    try:
        remote, errors, _ = scorer.submit(["p"] * 7, responses, [{}] * 7).result()
        assert torch.equal(remote, local) and errors == 0
    finally:
        scorer.close()
    slow = f"{rewards_file}:slow"
    # NOTE: the fast chunk has 10 s (the workers have started when submit returns), the stuck one sleeps 60 s
    scorer = RewardScorer(load_reward_fn(slow), spec=slow, workers=2, timeout=10.0, on_error=0.5)
    try:
        scores, errors, _ = scorer.submit(["p"] * 4, ["x", "x", "slow", "x"], [{}] * 4).result()
        assert scores.tolist() == [1.0, 1.0, 0.5, 0.5] and errors == 2  # the stuck chunk of two
        assert scorer._pool is None  # its worker was killed with the pool
    finally:
        scorer.close()
    scorer = RewardScorer(load_reward_fn(slow), spec=slow, workers=1, timeout=1.0)
    try:
        with pytest.raises(TimeoutError, match=r"did not return within reward_timeout = 1.0 s"):
            scorer.submit(["p"], ["slow"], [{}]).result()
    finally:
        scorer.close()


def test_reward_scorer_checks_its_settings():
    from rlhf_engine.rewards.scoring import RewardScorer

    with pytest.raises(ValueError, match="reward_timeout needs reward_workers >= 1"):
        RewardScorer(math_answer, timeout=1.0)
    with pytest.raises(ValueError, match="reward_workers must be >= 0"):
        RewardScorer(math_answer, workers=-1)


def test_grpo_scores_in_reward_workers(tmp_path, rewards_file):
    """The CLI path with reward_workers: the run ends with its workers, errors are scored and counted."""
    import multiprocessing

    from rlhf_engine.cli import main
    from rlhf_engine.data.jsonl import write_jsonl
    from rlhf_engine.demo import task
    from rlhf_engine.demo.tokenizer import build_byte_tokenizer
    from rlhf_engine.metrics import read_metrics

    tokenizer = build_byte_tokenizer()
    model = str(tmp_path / "m")
    task.build_tiny_model_dir(model, vocab_size=len(tokenizer), seed=1, hidden_size=32)
    tokenizer.save_pretrained(model)
    data = str(tmp_path / "q.jsonl")
    write_jsonl(data, [{"prompt": "Say boom: ", "answer": "boom"}, {"prompt": "Say hi: ", "answer": "hi"}])
    out = tmp_path / "g"
    assert main(["grpo", "--model", model, "--data", data, "--reward-fn", f"{rewards_file}:per_sample",
                 "--reward-workers", "2", "--reward-on-error", "-1", "--output-dir", str(out), "--iterations", "1",
                 "--prompts-per-iteration", "2", "--n-samples", "2", "--max-new-tokens", "3", "--no-progress"]) == 0
    row = read_metrics(str(out / "metrics.jsonl"))[0]
    assert row["reward_errors"] == 0.0 and row["reward_mean"] == 0.0  # 3 random tokens never spell the answer
    assert not multiprocessing.active_children()


def test_math_verify_answer_or_the_extra_it_needs():
    """With the [math] extra: symbolic equivalence; without it (as in CI): an error naming the extra."""
    import importlib.util

    from rlhf_engine.rewards import math_verify_answer

    responses = ["so the answer is $\\frac{1}{2}$", "\\boxed{3}"]
    if importlib.util.find_spec("math_verify") is None:
        with pytest.raises(ImportError, match=r"pip install 'rlhf-engine\[math\]'"):
            math_verify_answer(["", ""], responses, answer=["0.5", "4"])
    else:
        assert math_verify_answer(["", ""], responses, answer=["$0.5$", "$4$"]) == [1.0, 0.0]
