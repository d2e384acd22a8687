"""Data as users keep it: JSONL, Parquet, CSV and datasets directories, with column mapping (read_data)."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets  # a dev dependency: its absence fails here rather than skipping
import pytest

from rlhf_engine.data.jsonl import DataError, PreferenceRecord, PromptRecord, SFTRecord
from rlhf_engine.data.readers import data_format, read_data

ROWS = [{"question": f"What is {i} + {i}?", "solution": f"#### {2 * i}", "source": "gen"} for i in range(5)]


def _write_all(tmp_path, rows):
    """The same rows as JSONL, Parquet, CSV, a Parquet file named .jsonl, and a save_to_disk directory."""
    table = datasets.Dataset.from_list(rows)
    paths = {"jsonl": tmp_path / "d.jsonl", "parquet": tmp_path / "d.parquet", "csv": tmp_path / "d.csv",
             "misnamed": tmp_path / "parquet_really.jsonl", "datasets": tmp_path / "d_dir"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    table.to_parquet(str(paths["parquet"]))
    table.to_parquet(str(paths["misnamed"]))
    table.to_csv(str(paths["csv"]), index=False)
    table.save_to_disk(str(paths["datasets"]))
    return {k: str(v) for k, v in paths.items()}


def test_every_format_gives_the_same_records(tmp_path):
    paths = _write_all(tmp_path, ROWS)
    assert {k: data_format(p) for k, p in paths.items()} == {"jsonl": "jsonl", "parquet": "parquet", "csv": "csv",
                                                           "misnamed": "parquet", "datasets": "datasets"}
    keys = {"prompt": "question", "response": "solution"}
    expected = [SFTRecord(r["question"], r["solution"]) for r in ROWS]
    for name, path in paths.items():
        assert read_data(path, "sft", keys) == expected, name
        prompts = read_data(path, "prompts", {"prompt": "question"})
        assert prompts == [PromptRecord(r["question"], {"solution": r["solution"], "source": "gen"}) for r in ROWS]


def test_preferences_from_parquet_with_margins(tmp_path):
    rows = [{"prompt": "p", "chosen": "good.", "rejected": "bad", "margin": 0.5},
            {"prompt": "q", "chosen": "yes.", "rejected": "no", "margin": 1.0}]
    path = str(tmp_path / "prefs.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    assert read_data(path, "preferences") == [PreferenceRecord("p", "good.", "bad", 0.5),
                                              PreferenceRecord("q", "yes.", "no", 1.0)]


def test_a_missing_column_names_the_file_and_its_columns(tmp_path):
    paths = _write_all(tmp_path, ROWS)
    with pytest.raises(DataError, match=r"d.parquet: sft data needs the column\(s\) prompt\+response or messages, "
                                        r"but its columns are \['question', 'solution', 'source'\]; name yours with "
                                        r"prompt_key, response_key, messages_key"):
        read_data(paths["parquet"], "sft")
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'prompt'"):
        read_data(paths["jsonl"], "sft")


def test_a_bad_row_names_its_number_and_field(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["solution"] = "   "
    paths = _write_all(tmp_path, rows)
    keys = {"prompt": "question", "response": "solution"}
    with pytest.raises(DataError, match=r"d.parquet:row 3: field 'response' is empty"):
        read_data(paths["parquet"], "sft", keys)
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'response' is empty"):
        read_data(paths["jsonl"], "sft", keys)


def test_a_dataset_dict_is_read_from_its_train_split(tmp_path):
    table = datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert [r.prompt for r in read_data(str(tmp_path / "dd"), "prompts")] == ["a", "b"]
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match=r"a DatasetDict without a 'train' split \(splits: \['test'\]\)"):
        read_data(str(tmp_path / "no_train"), "prompts")


def test_jsonl_needs_no_datasets_package(tmp_path):
    """The offline GPU machines have no `datasets`: JSONL still reads; Parquet says what to install."""
    paths = _write_all(tmp_path, ROWS)
    script = f"""
import sys
sys.modules["datasets"] = None  # import datasets now raises ImportError
from rlhf_engine.data.jsonl import DataError
from rlhf_engine.data.readers import read_data
assert len(read_data({paths["jsonl"]!r}, "prompts", {{"prompt": "question"}})) == 5
try:
    read_data({paths["parquet"]!r}, "prompts", {{"prompt": "question"}})
except DataError as err:
    assert "needs the datasets package: pip install datasets" in str(err), err
    print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_cli_sft_on_parquet_with_column_keys(tmp_path):
    from rlhf_engine.cli import main
    from rlhf_engine.demo import task
    from rlhf_engine.demo.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = str(tmp_path / "m")
    task.build_tiny_model_dir(model, vocab_size=len(tokenizer), seed=1, hidden_size=32)
    tokenizer.save_pretrained(model)
    paths = _write_all(tmp_path, ROWS)
    assert main(["sft", "--model", model, "--data", paths["parquet"], "--prompt-key", "question", "--response-key",
                 "solution", "--output-dir", str(tmp_path / "o"), "--steps", "1", "--batch-size", "2",
                 "--max-length", "64", "--no-progress"]) == 0
