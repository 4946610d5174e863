"""The sidecar's metrics: identity labels, the bounded label sets, the closed set of reasons, the text exposition as
prometheus_client's own parser reads it."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtlsmesh import metrics
from mtlsmesh.identity import parse_spiffe_id
from mtlsmesh.outcome import Decision, Reason
from mtlsmesh.runtime import ConnRecord, Stats

OURS = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/productpage")
THEIRS = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/reviews")


def samples(stats: Stats, name: str) -> list[tuple[dict[str, str], float]]:
    text = stats.render().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def record(
    stats: Stats, direction: str, decision: Decision, reason: Reason, orig_dst: str, peer: object = None
) -> None:
    rec = ConnRecord(direction, direction, orig_dst=orig_dst, bytes_in=7, bytes_out=11)
    rec.decision, rec.reason, rec.peer_id = decision, reason, peer  # type: ignore[assignment]
    stats.carried(rec, OURS)
    stats.record(rec, OURS)


@pytest.mark.parametrize(
    ("direction", "decision", "peer", "expected"),
    [
        # Outbound we are the source, inbound the destination; principals only under mutual TLS.
        ("outbound", Decision.MTLS, THEIRS, (str(OURS), str(THEIRS), "mutual_tls")),
        ("inbound", Decision.MTLS, THEIRS, (str(THEIRS), str(OURS), "mutual_tls")),
        ("inbound", Decision.MTLS, None, ("unknown", str(OURS), "mutual_tls")),  # the handshake failed
        ("inbound", Decision.PASSTHROUGH, None, ("unknown", "unknown", "none")),  # a plaintext caller
        ("outbound", Decision.PASSTHROUGH, None, ("unknown", "unknown", "none")),  # a destination outside the mesh
        ("inbound", Decision.REFUSE, None, ("unknown", "unknown", "none")),
    ],
)
def test_identity_labels(direction: str, decision: Decision, peer: object, expected: tuple[str, str, str]) -> None:
    stats = Stats()
    record(stats, direction, decision, Reason.CLOSED, "198.18.0.12:9080", peer)
    ((labels, value),) = samples(stats, "mtlsmesh_tcp_connections_opened_total")
    assert value == 1
    assert labels == {
        "direction": direction,
        "source_principal": expected[0],
        "destination_principal": expected[1],
        "destination_port": "9080",
        "security_policy": expected[2],
    }
    ((closed, _),) = samples(stats, "mtlsmesh_tcp_connections_closed_total")
    assert closed == {**labels, "reason": "closed"}
    assert samples(stats, "mtlsmesh_tcp_received_bytes_total") == [(labels, 7)]
    assert samples(stats, "mtlsmesh_tcp_sent_bytes_total") == [(labels, 11)]


@pytest.mark.parametrize(
    ("orig_dst", "port"), [("198.18.0.12:9080", "9080"), ("[2001:db8::1]:443", "443"), ("-", "unknown")]
)
def test_the_destination_port_comes_from_the_original_destination(orig_dst: str, port: str) -> None:
    stats = Stats()
    record(stats, "outbound", Decision.PASSTHROUGH, Reason.CLOSED, orig_dst)
    ((labels, _),) = samples(stats, "mtlsmesh_tcp_connections_opened_total")
    assert labels["destination_port"] == port


def test_every_reason_is_a_label_value_and_nothing_else_is() -> None:
    # The reason label is the Reason enum: every member renders, and the set is the enum's (a new member needs no
    # list to be updated here or in the metrics).
    stats = Stats()
    for reason in Reason:
        record(stats, "inbound", Decision.MTLS, reason, "198.18.0.12:9080", THEIRS)
    reasons = {labels["reason"] for labels, _ in samples(stats, "mtlsmesh_tcp_connections_closed_total")}
    assert reasons == {reason.value for reason in Reason}
    overview = {labels["reason"] for labels, _ in samples(stats, "mtlsmesh_connections_total")}
    assert overview == reasons


def test_handshakes_are_timed_by_result() -> None:
    stats = Stats()
    stats.count_handshake("outbound", 0.002, None)
    stats.count_handshake("outbound", 0.003, None)
    stats.count_handshake("inbound", 10.0, Reason.HANDSHAKE_TIMEOUT)
    counts = {
        (labels["direction"], labels["result"]): value
        for labels, value in samples(stats, "mtlsmesh_handshake_duration_seconds_count")
    }
    assert counts == {("outbound", "ok"): 2, ("inbound", "handshake_timeout"): 1}
    sums = {labels["result"]: value for labels, value in samples(stats, "mtlsmesh_handshake_duration_seconds_sum")}
    assert sums["ok"] == pytest.approx(0.005)
    buckets = {
        labels["le"]: value
        for labels, value in samples(stats, "mtlsmesh_handshake_duration_seconds_bucket")
        if labels["result"] == "ok"
    }
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.005"], buckets["+Inf"]) == (0, 1, 2, 2)


def test_a_port_scan_costs_a_bounded_number_of_series_and_of_memory() -> None:
    # A scan of many ports through a passthrough destination (or a crowd of callers) makes a new label set per
    # connection; beyond the cap they all share the overflow set, and the totals stay exact.
    cap, scanned = 50, 4000
    stats = Stats(max_label_sets=cap)

    def scan(ports: range) -> None:
        for port in ports:
            record(stats, "outbound", Decision.PASSTHROUGH, Reason.CONNECT_FAILED, f"198.18.0.99:{port}")

    scan(range(1, scanned // 2))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        scan(range(scanned // 2, scanned))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes for {scanned // 2} more connections past the cap"
    opened = samples(stats, "mtlsmesh_tcp_connections_opened_total")
    assert len(opened) == cap + 1  # the cap, and one overflow set for this direction and policy
    assert sum(value for _, value in opened) == scanned - 1
    overflow = {
        "direction": "outbound",
        "source_principal": "overflow",
        "destination_principal": "overflow",
        "destination_port": "overflow",
        "security_policy": "none",
    }
    assert (overflow, scanned - 1 - cap) in opened
    ((_, overflowed),) = samples(stats, "mtlsmesh_metric_label_sets_overflowed_total")
    assert overflowed == 2 * (scanned - 1 - cap)  # counted at open and at close
    ((_, in_use),) = samples(stats, "mtlsmesh_metric_label_sets")
    assert in_use == cap + 1
    # Connections already counted keep their own label set after the cap is reached.
    first = {**overflow, "source_principal": "unknown", "destination_principal": "unknown", "destination_port": "1"}
    assert (first, 1) in opened


def test_the_live_gauges_ask_at_scrape_time() -> None:
    stats = Stats()
    assert samples(stats, "mtlsmesh_ready") == [({}, 0)]  # nobody serves it yet: not ready
    assert samples(stats, "mtlsmesh_svid_not_after_timestamp_seconds") == []
    ready = [False]
    stats.live = metrics.Live(
        ready=lambda: ready[0], not_after=lambda: None, reloads=lambda: 3, reload_failures=lambda: 1
    )
    assert samples(stats, "mtlsmesh_ready") == [({}, 0)]
    ready[0] = True
    assert samples(stats, "mtlsmesh_ready") == [({}, 1)]
    assert samples(stats, "mtlsmesh_credential_reloads_total") == [({}, 3)]
    assert samples(stats, "mtlsmesh_credential_reload_failures_total") == [({}, 1)]


def test_every_family_has_help() -> None:
    stats = Stats()
    record(stats, "inbound", Decision.MTLS, Reason.CLOSED, "198.18.0.12:9080", THEIRS)
    stats.count_handshake("inbound", 0.001, None)
    families = list(text_string_to_metric_families(stats.render().decode()))
    assert len(families) >= 12
    for family in families:
        assert family.documentation and family.name.startswith("mtlsmesh_"), family.name
