"""Data files as users keep them: JSON Lines, Parquet, CSV, or a ``datasets`` directory (``save_to_disk``).

    records = read_data("train.parquet", "sft", keys={"prompt": "question", "response": "solution"})

The format comes from the file: a directory is a ``datasets`` directory; a file starting with Parquet's magic
bytes (``PAR1``) is Parquet whatever its name; ``.csv`` is CSV; anything else is JSON Lines. Parquet, CSV and
directories are read through the ``datasets`` library, imported only here and only then (``pip install
datasets``), so the JSONL path needs nothing beyond the engine.

``keys`` maps our field names (prompt, response, messages, chosen, rejected) to the file's own column names
(the ``prompt_key``, ``response_key``, ... config keys). Every record is validated as a JSONL line is: a missing
column names the file and the columns it has; a bad row names its row number and field.
"""

from __future__ import annotations

import os

from rlhf_engine.data.jsonl import _PARSERS, FORMATS, DataError, read_jsonl

# the fields each kind reads (sft: prompt + response, or messages)
REQUIRED = {"sft": (("prompt", "response"), ("messages",)), "preferences": (("prompt", "chosen", "rejected"),),
            "prompts": (("prompt",),)}
KEY_FIELDS = ("prompt", "response", "messages", "chosen", "rejected")


def data_format(path: str) -> str:
    """``datasets`` (a directory), ``parquet`` (by its magic bytes), ``csv`` (by extension) or ``jsonl``."""
    if os.path.isdir(path):
        return "datasets"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory (expected JSONL, Parquet, CSV or a datasets directory)")
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":
            return "parquet"
    return "csv" if path.lower().endswith(".csv") else "jsonl"


def _load_table(path: str, fmt: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading {fmt} data needs the datasets package: pip install datasets (or "
                        f"pip install 'rlhf-engine[data]'); JSONL needs nothing") from None
    if fmt == "parquet":
        return datasets.Dataset.from_parquet(path)
    if fmt == "csv":
        return datasets.Dataset.from_csv(path)
    table = datasets.load_from_disk(path)
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(table)}); save the "
                            f"split to read with save_to_disk, or name its directory")
        table = table["train"]
    return table


def _rename(obj: dict, keys: dict) -> dict:
    """Our field names for the file's columns (``keys``: ours -> theirs); other fields stay as they are."""
    if not keys:
        return obj
    out = {k: v for k, v in obj.items() if k not in keys.values()}
    for ours, theirs in keys.items():
        if theirs in obj:
            out[ours] = obj[theirs]
    return out


def _check_keys(keys: dict | None) -> dict:
    keys = {k: v for k, v in (keys or {}).items() if v}
    unknown = sorted(set(keys) - set(KEY_FIELDS))
    if unknown:
        raise ValueError(f"read_data: keys may map {list(KEY_FIELDS)}, found {unknown}")
    return keys


def read_data(path: str, kind: str, keys: dict | None = None) -> list:
    """The ``kind`` records (sft, preferences or prompts) of the data at ``path``, validated."""
    if kind not in _PARSERS:
        raise ValueError(f"read_data: kind must be one of {list(FORMATS)}, found {kind!r}")
    keys = _check_keys(keys)
    fmt = data_format(path)
    if fmt == "jsonl":
        return read_jsonl(path, kind, rename=(lambda obj: _rename(obj, keys)) if keys else None)
    table = _load_table(path, fmt)
    columns = set(table.column_names)
    if not any(all(keys.get(f, f) in columns for f in fields) for fields in REQUIRED[kind]):
        wanted = " or ".join("+".join(keys.get(f, f) for f in fields) for fields in REQUIRED[kind])
        raise DataError(f"{path}: {kind} data needs the column(s) {wanted}, but its columns are "
                        f"{sorted(columns)}; name yours with " +
                        ", ".join(f"{f}_key" for fields in REQUIRED[kind] for f in fields))
    parse = _PARSERS[kind]
    records = [parse(f"{path}:row {i + 1}", _rename(row, keys)) for i, row in enumerate(table)]
    if not records:
        raise DataError(f"{path}: no records (an empty table)")
    return records
