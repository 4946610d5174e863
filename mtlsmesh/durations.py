"""Durations and moments as text, one way each: what every flag and config key that takes a duration parses, and
how every command prints a time.

`parse_duration(value, path)` (config values) and `parse_flag(text, flag)` (flags) read `500ms`, `90s`, `2m`,
`1h30m`, `24h`, `90d`, `10y` (a year is 365 days): one or more `<number><unit>` terms, largest unit first, each unit
at most once, a number possibly with a fraction (`1.5h`). A config file may also give a plain number of seconds
(YAML `5` or `0.25`); a flag may not (`--ttl 5` is more likely a mistake than five seconds). Every error is one
`ConfigError` naming the flag or key. `format_duration(seconds)` writes the two largest units a person reads
(`1h30m`, `2d4h`, `250ms`), which `parse_duration` reads back (exactly when two units held it all).
`format_time(moment)` is RFC 3339 in UTC to the second (`2026-12-07T15:00:00Z`), in text and in JSON alike.

What this module does not do: decide what range a duration may take for a given key (its caller says, e.g.
`positive`), or know any clock.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from mtlsmesh.errors import ConfigError

UNITS = {"y": 365 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_ORDER = tuple(UNITS)  # largest first
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|[ydhms])")
EXAMPLES = "500ms, 90s, 1h30m or 24h"


def parse_duration(value: object, path: str = "duration", *, positive: bool = False) -> float:
    """Seconds (a finite, non-negative float) from a config value: a duration's text or a plain number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (parsed := _parse_text(value.strip())) is not None:
        seconds = parsed
    else:
        raise ConfigError(path, f"expected a duration like {EXAMPLES}, or a number of seconds (got {_shown(value)})")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(path, f"a duration must be finite and not negative (got {_shown(value)})")
    if positive and seconds == 0:
        raise ConfigError(path, "must be greater than zero")
    return seconds


def parse_flag(text: str, path: str, *, at_most: float | None = None) -> float:
    """A positive duration given as a flag (`--ttl 1h30m`), in seconds, optionally bounded above; the errors say
    what to write instead."""
    seconds = _parse_text(text.strip())
    if seconds is None:
        raise ConfigError(path, f"{text!r} is not a duration; write e.g. {EXAMPLES}")
    if seconds <= 0:
        raise ConfigError(path, f"{text!r}: the duration must be positive")
    if at_most is not None and seconds > at_most:
        raise ConfigError(path, f"{text!r}: longer than {format_duration(at_most)}")
    return seconds


def parse_timedelta(text: str, path: str, *, at_most: float | None = None) -> timedelta:
    """`parse_flag` as a `timedelta`."""
    return timedelta(seconds=parse_flag(text, path, at_most=at_most))


def _parse_text(text: str) -> float | None:
    total, position, last_unit = 0.0, 0, -1
    if not text:
        return None
    for match in _TERM.finditer(text):
        if match.start() != position:
            return None
        unit = _ORDER.index(match[2])
        if unit <= last_unit:  # 30m1h or 1h1h: a typo, never a sum anyone means
            return None
        total += float(match[1]) * UNITS[match[2]]
        position, last_unit = match.end(), unit
    return total if position == len(text) else None


def _shown(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def format_duration(seconds: float) -> str:
    """The two largest units: `1h30m`, `2d4h`, `45s`, `250ms`, `0s`; negative with a leading `-`."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        millis = round(seconds * 1000)
        return f"{millis}ms" if millis else "0s"
    whole = int(seconds)
    parts: list[str] = []
    for unit in _ORDER[:-1]:  # down to seconds
        size = int(UNITS[unit])
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts[:2])


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC, to the second: `2026-12-07T15:00:00Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_timestamp(seconds: float) -> str:
    """A POSIX time as `format_time` writes it."""
    return format_time(datetime.fromtimestamp(seconds, UTC))
