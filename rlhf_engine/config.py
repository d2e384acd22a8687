"""Configs: one dataclass per phase, loaded from YAML, overridden by ``--key value`` pairs from the CLI.

    config = load_config(SFTConfig, "sft.yaml", ["--lr", "1e-4", "--steps", "200"])

An unknown key is an error naming it and the nearest valid key; every value is checked against the field's type
(int, float, bool, str, optional and tuple fields), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, what was expected and what was found."""


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(cls_name: str, name: str, annotation, value, source: str):
    """Checks (and, for CLI strings, parses) ``value`` against the field type ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(cls_name, name, option, value, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{cls_name}.{name}: bad value {value!r} ({source})")
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name} must be a list, found {value!r} ({source})")
        inner = args[0] if args else str
        parsed = [_coerce(cls_name, name, inner, item, source) for item in items if item != ""]
        return tuple(parsed) if origin is tuple else parsed
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{cls_name}.{name} must be true or false, found {value!r} ({source})")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{name} must be an int, found {value!r} ({source})")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{cls_name}.{name} must be an int, found {value!r} ({source})")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{cls_name}.{name} must be a number, found {value!r} ({source})")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{cls_name}.{name} must be a string, found {value!r} ({source})")
    return value


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--lr", "1e-4", "--packing=true"]`` -> ``[("lr", "1e-4"), ("packing", "true")]`` (dashes become
    underscores)."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, found {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def checked_values(cls, values: dict, *, source: str = "config") -> dict:
    """``values`` with every key known to ``cls`` and every value of its field's type (coerced from strings);
    ``source`` names where they came from. Checks between fields are ``cls``'s own, once the whole config is
    known (``build_config``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, found {type(values).__name__}")
    fields = _fields(cls)
    kwargs = {}
    renamed = getattr(cls, "RENAMED_KEYS", {})
    for key, value in values.items():
        if key not in fields and key in renamed:
            raise ConfigError(f"{source}: key {key!r} of {cls.__name__} was replaced: use {renamed[key]}")
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}{_nearest(key, list(fields))}")
        kwargs[key] = _coerce(cls.__name__, key, fields[key][1], value, source)
    return kwargs


def build_config(cls, values: dict, *, source: str = "config"):
    """``cls(**values)`` with every key and value checked; ``source`` names where they came from."""
    kwargs = checked_values(cls, values, source=source)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(cls, path: str | None = None, overrides: list[str] | None = None, defaults: dict | None = None):
    """Defaults of ``cls`` (``defaults`` over them), then the YAML file at ``path``, then the ``--key value``
    overrides."""
    values: dict = dict(defaults or {})
    if path is not None:
        import yaml

        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of keys, found {type(loaded).__name__}")
            checked_values(cls, loaded, source=path)  # names the file in key errors
            values.update(loaded)
    for key, value in parse_overrides(overrides or []):
        checked_values(cls, {key: value}, source=f"--{key.replace('_', '-')}")  # names the flag in errors
        values[key] = value
    # NOTE: the checks between keys (agg_norm needs its agg, ...) run once, on the whole config
    return build_config(cls, values, source=path or "config")


def config_to_dict(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
