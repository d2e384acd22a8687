"""YAML configs with checked keys and values; JSONL readers whose errors name file, line and field."""

import json
from dataclasses import dataclass

import pytest

from rlhf_engine.config import ConfigError, load_config
from rlhf_engine.data.jsonl import DataError, PreferenceRecord, read_jsonl, write_jsonl


@dataclass
class Demo:
    model: str = "m"
    lr: float = 1e-3
    steps: int = 10
    bf16: bool = False
    stop_token_ids: tuple[int, ...] = ()
    max_length: int | None = None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nsteps: 20\nstop_token_ids: [1, 2]\n")
    config = load_config(Demo, str(path), ["--steps", "30", "--bf16=true", "--max-length", "64"])
    assert config == Demo(model="m", lr=0.01, steps=30, bf16=True, stop_token_ids=(1, 2), max_length=64)
    assert load_config(Demo, None, ["--max-length", "none"]).max_length is None


@pytest.mark.parametrize(
    "yaml_text, overrides, match",
    [
        ("lrr: 0.1\n", [], r"c.yaml: unknown key 'lrr' for Demo; did you mean 'lr'"),
        ("steps: 1.5\n", [], r"Demo.steps must be an int, found 1.5 \(.*c.yaml\)"),
        ("bf16: maybe\n", [], "Demo.bf16 must be true or false"),
        ("", ["--stepz", "3"], "--stepz: unknown key 'stepz' for Demo; did you mean 'steps'"),
        ("", ["--lr", "fast"], r"Demo.lr must be a number, found 'fast' \(--lr\)"),
        ("", ["--lr"], "--lr needs a value"),
        ("- 1\n- 2\n", [], "top level must be a mapping"),
    ],
)
def test_bad_config_is_named(tmp_path, yaml_text, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(Demo, str(path), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, str(tmp_path / "nope.yaml"))


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "p.jsonl"
    records = [PreferenceRecord("p", "good", "bad", 0.5), PreferenceRecord("q", "yes", "no")]
    write_jsonl(str(path), records)
    assert read_jsonl(str(path), "preferences") == records
    sft = tmp_path / "s.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n\n" + json.dumps({"prompt": "a", "response": "b", "id": 7}) + "\n")
    got = read_jsonl(str(sft), "sft")
    assert got[0].response == "yo" and len(got[0].messages) == 2 and got[1].prompt == "a"


@pytest.mark.parametrize(
    "kind, line, match",
    [
        ("preferences", '{"prompt": "p", "chosen": "a"}', r"x.jsonl:2: missing field 'rejected'"),
        ("preferences", '{"prompt": "p", "chosen": 3, "rejected": "b"}', r"x.jsonl:2: field 'chosen' must be a string"),
        ("preferences", '{"prompt": "p", "chosen": "a", "rejected": "a"}', "identical"),
        ("preferences", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}', "'margin' must be"),
        ("prompts", '{"prompt": ""}', r"x.jsonl:2: field 'prompt' is empty"),
        ("prompts", "[1, 2]", "expected a JSON object"),
        ("prompts", '{"prompt": "a"', r"x.jsonl:2: not valid JSON"),
        ("sft", '{"messages": [{"role": "user", "content": "a"}]}', "last message must be the assistant"),
        ("sft", '{"messages": [{"role": "robot", "content": "a"}]}', r"messages\[0\].role"),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, kind, line, match):
    path = tmp_path / "x.jsonl"
    good = {"preferences": '{"prompt": "p", "chosen": "a", "rejected": "b"}', "prompts": '{"prompt": "p"}',
            "sft": '{"prompt": "p", "response": "r"}'}[kind]
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        read_jsonl(str(path), kind)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "none.jsonl"), "prompts")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(str(tmp_path / "e.jsonl"), "prompts")
