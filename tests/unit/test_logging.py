"""The sidecar's log formats: key=value text and JSON lines; and the SVID's share of life left."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from mtlsmesh.cli.sidecar import JsonFormatter, LineFormatter, parse_kv
from mtlsmesh.conventions import LOG_FORMAT
from mtlsmesh.expiry import life_left
from mtlsmesh.outcome import Decision, Reason
from mtlsmesh.runtime import ConnRecord, log_connection, render_kv


def conn_record() -> ConnRecord:
    rec = ConnRecord("inbound", "inbound", client_addr="198.18.0.10:40000", orig_dst="198.18.0.11:9080")
    rec.decision, rec.reason, rec.detail = Decision.MTLS, Reason.DENIED, 'rule 1 DENY matches "x" on port 9080'
    rec.bytes_in, rec.bytes_out = 10, 20
    return rec


def formatted(formatter: logging.Formatter, emit: object) -> list[str]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    handler = Collect()
    root = logging.getLogger("mtlsmesh")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        assert callable(emit)
        emit()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return lines


def test_a_connection_is_one_json_object_with_the_text_lines_fields() -> None:
    rec = conn_record()
    [text] = formatted(LineFormatter(LOG_FORMAT), lambda: log_connection(rec))
    [line] = formatted(JsonFormatter(), lambda: log_connection(rec))
    shown = json.loads(line)
    text_fields = parse_kv(text.split(" logger=mtlsmesh.conn ", 1)[1])
    assert text_fields is not None
    assert list(shown) == ["ts", "level", "logger", *text_fields]
    assert {key: str(value) for key, value in shown.items() if key in text_fields and key != "duration_ms"} == {
        key: value for key, value in text_fields.items() if key != "duration_ms"
    } | {"peer_id": "None"}
    assert shown["peer_id"] is None and text_fields["peer_id"] == "-"
    assert shown["detail"] == 'rule 1 DENY matches "x" on port 9080'
    assert shown["bytes_in"] == 10 and shown["logger"] == "mtlsmesh.conn"


def test_event_lines_become_their_pairs_and_other_messages_msg() -> None:
    log = logging.getLogger("mtlsmesh.sidecar")
    lines = formatted(
        JsonFormatter(),
        lambda: (
            log.info("event=reload_refused reason=%r keeping=%s", "no such file: 'x'", "ab"),
            log.warning("something odd happened"),
        ),
    )
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "reload_refused" and first["reason"] == "no such file: 'x'" and first["keeping"] == "ab"
    assert second == {
        "ts": second["ts"],
        "level": "WARNING",
        "logger": "mtlsmesh.sidecar",
        "msg": "something odd happened",
    }


@pytest.mark.parametrize(
    "fields", [{"a": "1"}, {"event": "x", "detail": 'with "quotes" and spaces'}, {"k": "tab\there"}, {"u": "é"}]
)
def test_parse_kv_reads_what_render_kv_writes(fields: dict[str, str]) -> None:
    assert parse_kv(render_kv(dict(fields))) == fields


def test_life_left_is_a_share_bounded_to_zero_and_one() -> None:
    start = datetime(2026, 12, 7, 12, tzinfo=UTC)
    end = start + timedelta(hours=10)
    assert life_left(start, end, start + timedelta(hours=8)) == pytest.approx(0.2)
    assert life_left(start, end, start - timedelta(hours=1)) == 1.0
    assert life_left(start, end, end + timedelta(hours=1)) == 0.0
    assert life_left(start, start, start) == 0.0
