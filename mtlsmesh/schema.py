"""Reading a YAML config file into checked plain values: every problem a `ConfigError` naming where it is.

`load_yaml(path)` reads a file with PyYAML's safe loader, refusing duplicate keys (PyYAML silently keeps the last
one, which loses the first without a word) and naming file, line and column for syntax errors. The small readers
below (`mapping`, `items`, `string`, `boolean`, `integer`, `choice`, `parse_duration`) each check one value found
at a path like `inbound.ports.9080.mode` and raise `ConfigError(path, message)` when it is not what it should be.

What this module does not know: which keys the sidecar's config has (`config` says that).
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import yaml

from mtlsmesh import durations
from mtlsmesh.errors import ConfigError

E = TypeVar("E", bound=enum.Enum)


def load_yaml(path: str) -> object:
    """The parsed document; unreadable files and YAML errors become a `ConfigError` naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read the config file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"the config file is not UTF-8 text (byte {exc.start})") from exc
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError(where, f"YAML syntax error: {exc.problem or exc.context}") from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(path, f"YAML error: {exc}") from exc


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error instead of the last one silently winning."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def mapping(value: object, path: str, allowed: Sequence[str] | None) -> dict[Any, Any]:
    """A mapping whose keys are all in `allowed` (None: any key)."""
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping (got {kind(value)})")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise ConfigError(path, f"unknown key {str(key)!r} (expected one of {', '.join(allowed)})")
    return value


def section(parent: dict[Any, Any], key: str) -> object:
    """A section's value, where a key with nothing under it (YAML null) means all defaults."""
    value = parent.get(key)
    return {} if value is None else value


def items(parent: dict[Any, Any], key: str, path: str = "", non_empty: bool = False) -> list[tuple[int, object]]:
    """The numbered entries of an optional list. With `non_empty`, omitting the key means 'any', and `[]` is
    refused rather than guessed at."""
    if key not in parent:
        return []
    where = f"{path}.{key}" if path else key
    value = parent[key]
    if value is None and not non_empty:
        return []  # a list key with nothing under it
    if not isinstance(value, list):
        raise ConfigError(where, f"expected a list (got {kind(value)})")
    if non_empty and not value:
        raise ConfigError(where, "must not be empty (omit the key to match any)")
    return list(enumerate(value))


def string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string (got {kind(value)})")
    return value


def boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false (got {kind(value)})")
    return value


def integer(value: object, path: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):  # YAML's true is an int to Python
        raise ConfigError(path, f"expected an integer (got {kind(value)})")
    if not low <= value <= high:
        raise ConfigError(path, f"{value} is out of range {low}-{high}")
    return value


def port(value: object, path: str) -> int:
    return integer(value, path, 1, 65535)


def choice(value: object, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(path, f"expected one of {', '.join(choices)} (got {kind(value)})")
    return value


def enum_choice(value: object, path: str, enum_type: type[E]) -> E:
    """One of an enum's values, spelled exactly as the config file writes it."""
    return enum_type(choice(value, path, [member.value for member in enum_type]))


def parse_duration(value: object, path: str = "duration") -> float:
    """A duration (see `durations`), as non-negative float seconds."""
    return durations.parse_duration(value, path)


def duration(value: object, path: str, positive: bool = False) -> float:
    return durations.parse_duration(value, path, positive=positive)


def kind(value: object) -> str:
    """How a wrong value is shown in a message: briefly, never a whole nested structure."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
