"""The one duration parser (config values and flags) and the one way times and durations are printed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from mtlsmesh import durations
from mtlsmesh.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("90s", 90.0), ("2m", 120.0), ("1h30m", 5400.0), ("24h", 86400.0), ("90d", 90 * 86400.0),
     ("10y", 10 * 365 * 86400.0), ("1.5h", 5400.0), ("1h0m30s", 3630.0), ("2m500ms", 120.5), ("1d12h", 129600.0)],
)  # fmt: skip
def test_flags_and_config_read_the_same_texts(text: str, seconds: float) -> None:
    assert durations.parse_flag(text, "--ttl") == pytest.approx(seconds)
    assert durations.parse_duration(text, "timeouts.idle") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 s", "1h 30m", "30m1h", "1h1h", "1x", "-1s", "h", "1.2.3s", "ms"])
def test_anything_else_is_one_line_naming_the_flag(text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        durations.parse_flag(text, "--ttl")
    assert str(exc.value) == f"--ttl: {text!r} is not a duration; write e.g. 500ms, 90s, 1h30m or 24h"
    with pytest.raises(ConfigError, match=r"^inbound\.sniff_timeout: expected a duration like 500ms, 90s"):
        durations.parse_duration(text, "inbound.sniff_timeout")


def test_a_flag_is_positive_and_may_be_bounded() -> None:
    with pytest.raises(ConfigError, match=r"^--ttl: '0s': the duration must be positive$"):
        durations.parse_flag("0s", "--ttl")
    with pytest.raises(ConfigError, match=r"^--ttl: '2d': longer than 1d$"):
        durations.parse_flag("2d", "--ttl", at_most=86400)
    assert durations.parse_timedelta("1h30m", "--ttl") == timedelta(hours=1, minutes=30)


def test_a_config_value_may_be_a_number_but_a_flag_may_not() -> None:
    assert durations.parse_duration(0.25, "x") == 0.25
    assert durations.parse_duration(0, "x") == 0.0
    with pytest.raises(ConfigError, match=r"^x: must be greater than zero$"):
        durations.parse_duration(0, "x", positive=True)
    with pytest.raises(ConfigError, match=r"is not a duration"):
        durations.parse_flag("5", "--ttl")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (45, "45s"), (5400, "1h30m"), (3600, "1h"), (86400 + 4 * 3600, "1d4h"),
     (-7200, "-2h"), (400 * 86400, "1y35d")],
)  # fmt: skip
def test_format_duration_writes_what_the_parser_reads_back(seconds: float, text: str) -> None:
    assert durations.format_duration(seconds) == text
    if seconds >= 0:
        assert durations.parse_duration(text) == pytest.approx(seconds)


def test_format_duration_keeps_the_two_largest_units() -> None:
    assert durations.format_duration(86400 + 4 * 3600 + 5) == "1d4h"


def test_times_are_rfc3339_utc_to_the_second() -> None:
    moment = datetime(2026, 12, 7, 16, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert durations.format_time(moment) == "2026-12-07T15:00:00Z"
    assert durations.format_timestamp(datetime(2026, 12, 7, 15, tzinfo=UTC).timestamp()) == "2026-12-07T15:00:00Z"
