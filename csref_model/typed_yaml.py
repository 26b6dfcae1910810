"""YAML into typed dataclasses: the one config loader of the project.

Model configs (`csref_model.config`) and training configs (`csref_training.train_config`) are
plain dataclasses; this module fills them from the mapping `yaml.safe_load` returns, checking
every value against its field's annotation. An unknown key is an error that names the key, its
section and the file, with the valid keys, so a typo never silently falls back to a default. A
wrong type names the dotted key, the expected type and the value.

Supported annotations: nested dataclasses, bool, int, float (an int or a numeric string is
accepted: YAML 1.1 reads `1e-4`, without a dot, as a string), str, None, unions of these,
list[...], dict[...] (taken as is) and Any.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Any, source: str, section: str = "") -> T:
    """An instance of dataclass `cls` from `data`; unset fields keep their defaults.

    `source` (a file name, "<dict>", ...) starts every error message; `section` is the dotted
    path of `data` inside the document.
    """
    where = f"section '{section}'" if section else "the top level"
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r} in {where} (valid keys: {', '.join(known)})")
    values = {}
    for name, value in data.items():
        key = f"{section}.{name}" if section else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, source, key)
        else:
            values[name] = check_type(value, hint, key, source)
    return cls(**values)


def check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    """`value` checked against annotation `hint` (and converted: int or numeric string -> float)."""
    try:
        return _convert(value, hint, key)
    except _Mismatch as mismatch:
        raise ValueError(f"{source}: {mismatch.key} must be {describe_type(mismatch.hint)}, "
                         f"got {mismatch.value!r}") from None


def describe_type(hint: Any) -> str:
    """An annotation in words, for error messages: `float | None` -> "a number or null"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(option) for option in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"a list of {describe_type(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             Any: "any value"}
    return words.get(hint, repr(hint))


class _Mismatch(Exception):
    def __init__(self, value: Any, hint: Any, key: str) -> None:
        super().__init__(key)
        self.value, self.hint, self.key = value, hint, key


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, key)
            except _Mismatch:
                continue
        raise _Mismatch(value, hint, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(value, hint, key)
        (item_type,) = typing.get_args(hint)
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(value, hint, key)
        return value
    if hint is type(None):
        if value is not None:
            raise _Mismatch(value, hint, key)
        return None
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch(value, hint, key)
    if hint in (bool, int, str):
        # bool is a subclass of int: `true` is not an integer here.
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise _Mismatch(value, hint, key)
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for dotted "a.b.c", creating sections on the way."""
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `tree` with `section.key=value` overrides set (values parsed as YAML)."""
    tree = merge(tree, {})
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {override!r} is not of the form section.key=value")
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, section by section (neither input is changed)."""
    merged = {key: merge(value, {}) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
