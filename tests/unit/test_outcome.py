"""Outcomes: the closed sets behind the labels, the record's defaults, and the log line and counters made of them."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest

from mtlsmesh.identity import parse_workload_id
from mtlsmesh.outcome import Decision, Failure, Outcome, Reason
from mtlsmesh.runtime import ConnRecord, Stats

REVIEWS = parse_workload_id("spiffe://cluster.local/ns/default/sa/reviews")


def test_the_reasons_are_one_closed_set() -> None:
    # The metric's label values: a change here is a change to every dashboard, so it is spelled out.
    assert [reason.value for reason in Reason] == [
        "closed", "idle_timeout", "reset_by_app", "reset_by_peer",
        "bad_record_mac", "unexpected_message", "record_overflow", "decode_error", "illegal_parameter",
        "no_orig_dst", "loop", "registry_only", "not_mesh", "sniff_timeout", "closed_during_sniff",
        "client_hello_too_large", "limit",
        "handshake_failed", "handshake_timeout", "denied", "connect_failed", "connect_timeout",
        "drain_timeout", "cancelled", "error", "internal_error",
    ]  # fmt: skip
    assert [decision.value for decision in Decision] == ["mtls", "passthrough", "refuse"]


@pytest.mark.parametrize("member", [*Decision, *Reason], ids=str)
def test_every_label_is_a_plain_word_and_formats_as_itself(member: Decision | Reason) -> None:
    assert re.fullmatch(r"[a-z][a-z_]*", member.value)  # a label value and a log word that never needs quotes
    assert str(member) == f"{member}" == member.value


def test_an_outcome_starts_undecided_and_without_a_reason() -> None:
    outcome = Outcome()
    assert (outcome.decision, outcome.reason, outcome.detail, outcome.peer_id) == (
        Decision.REFUSE,
        Reason.INTERNAL_ERROR,  # a handler that ends without saying why is a bug, and is counted as one
        "",
        None,
    )
    with pytest.raises(TypeError):
        Outcome(Decision.MTLS)  # type: ignore[misc]  # keyword-only: the record's own fields come first


def test_a_failure_is_a_value() -> None:
    failure = Failure(Reason.HANDSHAKE_FAILED, "peer presented no certificate")
    assert failure == Failure(Reason.HANDSHAKE_FAILED, "peer presented no certificate")
    assert Failure(Reason.HANDSHAKE_TIMEOUT).detail == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        failure.reason = Reason.DENIED  # type: ignore[misc]


def test_the_connection_record_is_an_outcome_in_one_slotted_object() -> None:
    rec = ConnRecord("outbound", "outbound")
    assert isinstance(rec, Outcome) and not hasattr(rec, "__dict__")
    assert rec.decision is Decision.REFUSE and rec.reason is Reason.INTERNAL_ERROR


def fields(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(line))


def test_the_log_line_of_a_clean_mtls_connection_has_no_detail() -> None:
    rec = ConnRecord("inbound", "inbound", client_addr="198.18.0.12:43186", orig_dst="198.18.0.13:9080")
    rec.decision, rec.reason, rec.peer_id, rec.bytes_in, rec.bytes_out = Decision.MTLS, Reason.CLOSED, REVIEWS, 134, 274
    line = rec.line()
    assert re.fullmatch(
        r"dir=inbound listener=inbound client=198\.18\.0\.12:43186 orig_dst=198\.18\.0\.13:9080 "
        r"peer_id=spiffe://cluster\.local/ns/default/sa/reviews decision=mtls bytes_in=134 bytes_out=274 "
        r"duration_ms=\d+ reason=closed",
        line,
    ), line


def test_the_log_line_keeps_the_detail_quoted_after_the_reason() -> None:
    rec = ConnRecord("outbound", "outbound", client_addr="127.0.0.1:5", orig_dst="[::1]:9080")
    rec.decision, rec.reason = Decision.MTLS, Reason.HANDSHAKE_FAILED
    rec.detail = 'peer said "no" = no'
    line = rec.line()
    assert line.endswith(' reason=handshake_failed detail="peer said \\"no\\" = no"'), line
    parsed = fields(line)
    assert (parsed["decision"], parsed["reason"], parsed["detail"], parsed["peer_id"]) == (
        "mtls",
        "handshake_failed",
        'peer said "no" = no',
        "-",
    )


def test_an_undecided_record_logs_as_refused_with_an_internal_error() -> None:
    parsed = fields(ConnRecord("inbound", "db-server").line())
    assert (parsed["decision"], parsed["reason"], parsed["client"], parsed["orig_dst"]) == (
        "refuse",
        "internal_error",
        "-",
        "-",
    )
    assert "detail" not in parsed


def test_counters_are_keyed_by_the_outcome_not_by_its_detail() -> None:
    stats = Stats()
    for detail in ("peer presented no certificate", "unknown ca", "transport broken"):
        rec = ConnRecord("inbound", "inbound", bytes_in=10, bytes_out=1)
        rec.decision, rec.reason, rec.detail = Decision.MTLS, Reason.HANDSHAKE_FAILED, detail
        stats.record(rec)
    rec = ConnRecord("outbound", "outbound")
    rec.reason = Reason.LIMIT
    stats.record(rec)
    assert stats.connections == {
        ("inbound", Decision.MTLS, Reason.HANDSHAKE_FAILED): 3,
        ("outbound", Decision.REFUSE, Reason.LIMIT): 1,
    }
    assert stats.bytes == {("inbound", "in"): 30, ("inbound", "out"): 3, ("outbound", "in"): 0, ("outbound", "out"): 0}
