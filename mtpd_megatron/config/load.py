"""YAML -> typed Config, with dotted command-line overrides and strict key checking.

A typo never silently falls back to a default: unknown keys are errors that name the key and suggest the
closest valid one. Errors are `ConfigError` (one line); CLIs turn them into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Iterable, Optional, Union

import yaml

from mtpd_megatron.config.schema import Config


class ConfigError(ValueError):
    """A user error in a config file or override: one line, naming the field and the fix."""


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against the dataclass field type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans: give back the word's meaning
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key{_suggest(str(key), fields)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """`a.b=3` -> ("a.b", 3); values are parsed as YAML scalars/lists (`x=[1,2]`, `y=null`)."""
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{item}: overrides look like section.key=value (e.g. model.num_layers=4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(data: dict, overrides: Iterable[str] = ()) -> Config:
    return dataclass_from_dict(Config, data, overrides)


def dataclass_from_dict(cls: type, data: dict, overrides: Iterable[str] = ()) -> Any:
    """A typed config tree of any root dataclass `cls` (the trainer's Config, the post-training config), with
    the same strict key and type checks and dotted overrides."""
    data = dict(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return _build(cls, data)


def read_yaml(path: str, flag: Optional[str] = "--config") -> dict:
    """The YAML mapping in `path`; errors name the file as the user gave it (`flag path`, or the bare path
    for a positional argument)."""
    where = f"{flag} {path}" if flag else str(path)
    if os.path.isdir(path):
        raise ConfigError(f"{where}: is a directory (pass a YAML file such as configs/tiny_dense.yaml)")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file (pass a YAML file such as configs/tiny_dense.yaml)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{where}: not a text file (byte {e.start} is not UTF-8): pass the YAML config, not a binary or other file"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{where}: not a text file (it contains NUL bytes): pass the YAML config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at} (fix the syntax)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections (model:, parallel:, ...)")
    return data


def load_config(path: str, overrides: Iterable[str] = (), flag: Optional[str] = "--config") -> Config:
    """Read, override and type-check a config (validation against a world size happens in validate.py)."""
    return config_from_dict(read_yaml(path, flag), overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
