"""How every command prints data: `--json` as one shape, text as aligned tables, times one way.

`--json` prints a JSON list of objects, always a list (one certificate is a list of one), with times as RFC 3339
UTC strings (`2026-12-07T15:00:00Z`, `durations.format_time`) and durations as numbers of seconds. Text output
prints the same times the same way. `add_json_flag(parser)` gives a command the flag with one help text,
`print_json(rows)` prints, `table(rows, columns)` aligns text columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from mtlsmesh import durations

JSON_HELP = "print a JSON list of objects (times in RFC 3339 UTC) instead of text"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def jsonable(value: Any) -> Any:
    """Plain JSON values; datetimes as RFC 3339 UTC, tuples and sets as lists, enums by their value."""
    if isinstance(value, datetime):
        return durations.format_time(value)
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted(jsonable(item) for item in value)
    if hasattr(value, "value") and hasattr(type(value), "__members__"):  # an enum member
        return value.value
    return value


def print_json(rows: Sequence[Mapping[str, Any]], out: TextIO | None = None) -> None:
    print(json.dumps(jsonable(list(rows)), indent=2), file=out or sys.stdout)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return durations.format_time(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(item) for item in value) or "-"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """Aligned columns with a header line; `-` for a missing value."""
    heads = [h.upper() for h in (headers or columns)]
    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(head), *(len(line[i]) for line in cells)]) for i, head in enumerate(heads)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
             for line in [heads, *cells]]  # fmt: skip
    return "\n".join(lines)
