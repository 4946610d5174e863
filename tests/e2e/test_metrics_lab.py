"""End-to-end: the metrics of the bookinfo mesh after real traffic, scraped as Prometheus would (from the node, on
each pod's metrics port) and parsed with prometheus_client's own parser.

The demo's bookinfo topology, with one change: ratings' inbound is PERMISSIVE, so the legacy pod (outside the
mesh) reaches it in plaintext and the call is carried. Every mesh hop must show, on both of its sidecars, its two
principals and `mutual_tls`; the plaintext calls from outside the mesh show `none` and no principal.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtlsmesh.conventions import METRICS_PORT
from mtlsmesh.lab.demo import APP_PORT, bookinfo
from mtlsmesh.lab.pods import Lab, http_get
from mtlsmesh.lab.topology import Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

REQUESTS = 2
# (caller, callee): the calls one request to productpage makes, the first from the sleep pod.
HOPS = (("sleep", "productpage"), ("productpage", "details"), ("productpage", "reviews"), ("reviews", "ratings"))


def topology() -> Topology:
    base = bookinfo()
    pods = tuple(
        dataclasses.replace(pod, sidecar={"inbound": {"mode": "permissive"}}) if pod.name == "ratings" else pod
        for pod in base.pods
    )
    return dataclasses.replace(base, pods=pods)


Samples = list[tuple[str, dict[str, str], float]]


def scrape(lab: Lab, pod: str) -> Samples:
    """GET /stats/prometheus from the node namespace, as a Prometheus server outside the pod would."""
    status, body = http_get(lab.node_ns, lab.ip(pod), METRICS_PORT, "/stats/prometheus", timeout=10)
    assert status == 200
    out: Samples = []
    for family in text_string_to_metric_families(body.decode()):
        assert family.documentation, f"{family.name} has no HELP"
        out += [(sample.name, sample.labels, sample.value) for sample in family.samples]
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for sample, got, value in samples if sample == name and labels.items() <= got.items())


def wait_count(lab: Lab, pod: str, name: str, minimum: float, timeout: float = 20.0, **labels: str) -> Samples:
    """Scrape until `name` with `labels` counts `minimum`, and return that scrape: connections are counted when they
    end, and the last one may still be closing when its answer has arrived."""
    deadline = time.monotonic() + timeout
    while total(samples := scrape(lab, pod), name, **labels) < minimum:
        if time.monotonic() > deadline:
            raise AssertionError(f"{pod}: {name}{labels} did not reach {minimum} within {timeout} s")
        time.sleep(0.2)
    return samples


def spiffe(pod: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{pod}"


def test_a_scrape_after_bookinfo_traffic_shows_who_called_whom() -> None:
    for lab in harness.open_lab(topology()):
        for index in range(REQUESTS):
            status, body = http_get(lab.pod_ns("sleep"), lab.vip("productpage"), APP_PORT, f"/p?i={index}", timeout=15)
            assert status == 200, body[:200]
        # From outside the mesh, in plaintext: carried to PERMISSIVE ratings, refused by STRICT productpage.
        assert http_get(lab.pod_ns("legacy"), lab.ip("ratings"), APP_PORT, "/plain", timeout=10)[0] == 200
        with pytest.raises(OSError):
            http_get(lab.pod_ns("legacy"), lab.ip("productpage"), APP_PORT, "/strict", timeout=10)

        for caller, callee in HOPS:
            identity = {
                "source_principal": spiffe(caller),
                "destination_principal": spiffe(callee),
                "destination_port": str(APP_PORT),
                "security_policy": "mutual_tls",
            }
            for pod, direction in ((caller, "outbound"), (callee, "inbound")):
                labels = {**identity, "direction": direction}

                closed = "mtlsmesh_tcp_connections_closed_total"
                samples = wait_count(lab, pod, closed, REQUESTS, **labels, reason="closed")
                assert total(samples, "mtlsmesh_tcp_connections_opened_total", **labels) == REQUESTS, (pod, labels)
                assert total(samples, "mtlsmesh_tcp_received_bytes_total", **labels) > 0
                assert total(samples, "mtlsmesh_tcp_sent_bytes_total", **labels) > 0
                # The same call as seen by the handshake and the duration histograms.
                handshakes = total(samples, "mtlsmesh_handshake_duration_seconds_count", direction=direction)
                assert handshakes >= REQUESTS
                assert total(samples, "mtlsmesh_ready") == 1
                assert total(samples, "mtlsmesh_svid_seconds_left") > 0

        plaintext = {
            "direction": "inbound",
            "source_principal": "unknown",
            "destination_principal": "unknown",
            "destination_port": str(APP_PORT),
            "security_policy": "none",
        }
        ratings = wait_count(lab, "ratings", "mtlsmesh_tcp_connections_closed_total", 1, **plaintext)
        assert total(ratings, "mtlsmesh_tcp_connections_opened_total", **plaintext) == 1
        assert total(ratings, "mtlsmesh_tcp_connections_closed_total", **plaintext, reason="closed") == 1
        # No call to ratings was counted as mutual TLS without its caller's identity.
        assert total(ratings, "mtlsmesh_tcp_connections_opened_total", source_principal="unknown",
                     security_policy="mutual_tls") == 0  # fmt: skip
        productpage = scrape(lab, "productpage")
        assert total(productpage, "mtlsmesh_tcp_connections_closed_total", **plaintext, reason="not_mesh") == 1
        assert total(productpage, "mtlsmesh_tcp_connections_opened_total", **plaintext) == 0  # refused: never carried
