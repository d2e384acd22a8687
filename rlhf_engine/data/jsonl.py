"""JSONL readers with validation: every error names the file, the line number and the field.

Formats (one JSON object a line; the README, "CLI"):
    sft          {"prompt": str, "response": str}  or  {"messages": [{"role": str, "content": str}, ...]}
    preferences  {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}
    prompts      {"prompt": str}
Blank lines are skipped; unknown fields are allowed (datasets carry ids and metadata).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

FORMATS = ("sft", "preferences", "prompts")


class DataError(ValueError):
    """A malformed record: the message starts with ``file:line``."""


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str
    messages: tuple = ()  # the chat form, when the line used "messages"


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    fields: dict = field(default_factory=dict)  # the row's other fields (e.g. "answer"), passed to reward_fn


def _string(where: str, obj: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} (expected a string)")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _sft(where: str, obj: dict) -> SFTRecord:
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            role = _string(f"{where}: messages[{i}]", m, "role")
            _string(f"{where}: messages[{i}]", m, "content", allow_empty=True)
            if role not in ("system", "user", "assistant", "tool"):
                raise DataError(f"{where}: messages[{i}].role must be system, user, assistant or tool, found {role!r}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the response to learn)")
        return SFTRecord(prompt="", response=messages[-1]["content"], messages=tuple(messages))
    return SFTRecord(_string(where, obj, "prompt"), _string(where, obj, "response"))


def _preference(where: str, obj: dict) -> PreferenceRecord:
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where}: field 'margin' must be a finite number, found {margin!r}")
    record = PreferenceRecord(
        _string(where, obj, "prompt"), _string(where, obj, "chosen"), _string(where, obj, "rejected"), float(margin)
    )
    if record.chosen == record.rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical: the pair carries no preference")
    return record


def _prompt(where: str, obj: dict) -> PromptRecord:
    return PromptRecord(_string(where, obj, "prompt"), {k: v for k, v in obj.items() if k != "prompt"})


_PARSERS = {"sft": _sft, "preferences": _preference, "prompts": _prompt}


_RECORD_TYPES = {"sft": SFTRecord, "preferences": PreferenceRecord, "prompts": PromptRecord}
_ACCEPTED = {
    "sft": "SFTRecord, a dict {'prompt', 'response'} or {'messages'}, or a (prompt, response) tuple",
    "preferences": "PreferenceRecord or a dict {'prompt', 'chosen', 'rejected', 'margin'?}",
    "prompts": "str, PromptRecord or a dict {'prompt'}",
}


def as_records(items, kind: str, where: str) -> list:
    """In-memory data for the Python API, checked as a JSONL line would be: ``kind``'s record type as it is, a dict
    validated field by field (errors name ``where[i]``); for sft also a ``(prompt, response)`` tuple, for prompts a
    string."""
    if isinstance(items, (str, dict)) or not hasattr(items, "__iter__"):
        raise DataError(f"{where}: expected a list of {_ACCEPTED[kind]}, found one {type(items).__name__}")
    record_type = _RECORD_TYPES[kind]
    records = []
    for i, item in enumerate(items):
        if isinstance(item, record_type):
            records.append(item)
        elif isinstance(item, dict):
            records.append(_PARSERS[kind](f"{where}[{i}]", item))
        elif kind == "sft" and isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
            records.append(SFTRecord(item[0], item[1]))
        elif kind == "prompts" and isinstance(item, str):
            records.append(PromptRecord(item))
        else:
            raise DataError(f"{where}[{i}]: expected {_ACCEPTED[kind]}, found {type(item).__name__}")
    return records


def read_jsonl(path: str, kind: str, rename=None) -> list:
    """Reads and validates every line of ``path`` as a ``kind`` record (sft, preferences or prompts); ``rename``
    (dict -> dict) maps a line's own field names to ours first."""
    if kind not in _PARSERS:
        raise ValueError(f"read_jsonl: kind must be one of {list(FORMATS)}, found {kind!r}")
    parse = _PARSERS[kind]
    records = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected a JSONL file of {kind} records)") from None
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                if not records and line.lstrip().startswith(("[", "{")):  # a JSON array, or one object over lines
                    raise DataError(f"{where}: not JSON Lines: the format is one JSON object per line (a whole "
                                    f"JSON document, such as an array of records, is not read)") from None
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); the format is one "
                                f"JSON object per line") from None
            if isinstance(obj, list):
                raise DataError(f"{where}: expected a JSON object, found a JSON array; the format is one JSON "
                                f"object per line (JSON Lines)")
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
            records.append(parse(where, rename(obj) if rename is not None else obj))
    if not records:
        raise DataError(f"{path}: no records (an empty file)")
    return records


def write_jsonl(path: str, records) -> None:
    """Writes dataclass records (or dicts) one JSON object a line."""
    import dataclasses

    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            obj = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
            obj.update(obj.pop("fields", None) or {})  # a PromptRecord's extra fields go back to the top level
            obj = {k: v for k, v in obj.items() if v not in ((), None)}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
