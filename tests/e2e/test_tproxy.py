"""End-to-end: pods in TPROXY mode. The init step installs the TPROXY rules, the sidecar's inbound listener is
transparent and dials the app from the caller's own address, so the app sees who called it (not 127.0.0.6), over
mTLS between the sidecars. The pods:
  server    mesh, TPROXY; HTTP on 9080 (STRICT) and 9081 (PERMISSIVE)
  client    mesh, TPROXY (its outbound side is REDIRECT in both modes); HTTP on 9080
  outside   outside the mesh (no capture, no sidecar)
"""

from __future__ import annotations

import pytest

from mtlsmesh.lab.pods import Lab, log_records
from mtlsmesh.lab.topology import AppSpec, PodSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


def tproxy_pod(name: str, ports: tuple[int, ...], sidecar: dict[str, object]) -> PodSpec:
    args = ("http", "--name", name, *(word for port in ports for word in ("--port", str(port))))
    return PodSpec(
        name,
        apps=(AppSpec("http", args, ports=ports),),
        capture_args=("--interception-mode", "TPROXY"),
        sidecar={"inbound": {"interception_mode": "TPROXY", **sidecar}},  # the init step and the sidecar agree
    )


TOPOLOGY = Topology(
    pods=(
        tproxy_pod("server", (9080, 9081), {"mode": "strict", "ports": {9081: {"mode": "permissive"}}}),
        tproxy_pod("client", (9080,), {}),
        PodSpec("outside", mesh=False),
    ),
)

lab = harness.lab_fixture(TOPOLOGY)


def test_the_app_sees_the_mesh_callers_real_address(lab: Lab) -> None:
    marker = harness.unique_marker("tproxy")
    with lab.capture("server") as pcap_path:
        status, body = harness.get(lab, "client", lab.ip("server"), 9080, "/tproxy", marker)
    assert status == 200 and marker.encode() in body
    lines = [line for line in lab.app_log("server", "http").splitlines() if marker in line]
    assert lines, "the app never logged the request"
    assert all(f"peer={lab.ip('client')}:" in line for line in lines), lines  # the caller, not 127.0.0.6
    harness.assert_encrypted_hop(lab, pcap_path, "server", 9080, marker, CLIENT_ID)
    records = harness.wait_records(
        lab,
        "server",
        lambda r: r.get("orig_dst") == f"{lab.ip('server')}:9080" and r.get("peer_id") == CLIENT_ID,
    )
    assert records[-1]["decision"] == "mtls" and records[-1]["client"].startswith(f"{lab.ip('client')}:")


def test_a_plaintext_caller_of_a_permissive_port_is_seen_as_itself(lab: Lab) -> None:
    marker = harness.unique_marker("tproxy-plain")
    status, _ = harness.get(lab, "outside", lab.ip("server"), 9081, "/plain", marker)
    assert status == 200
    lines = [line for line in lab.app_log("server", "http").splitlines() if marker in line]
    assert lines and all(f"peer={lab.ip('outside')}:" in line for line in lines), lines


def test_strict_still_refuses_plaintext(lab: Lab) -> None:
    harness.refused(lambda: harness.get(lab, "outside", lab.ip("server"), 9080, "/strict-plain"))
    assert "/strict-plain" not in lab.app_log("server", "http")


def test_the_other_way_round_and_many_in_a_row(lab: Lab) -> None:
    """The server pod calls the client pod (both TPROXY), 20 times: every reply found its way back to a sidecar."""
    for index in range(20):
        marker = harness.unique_marker(f"back{index}")
        status, body = harness.get(lab, "server", lab.ip("client"), 9080, f"/back/{index}", marker)
        assert status == 200 and marker.encode() in body
    lines = [line for line in lab.app_log("client", "http").splitlines() if "/back/" in line]
    assert len(lines) >= 20 and all(f"peer={lab.ip('server')}:" in line for line in lines), lines[:3]
    ids = {r.get("peer_id") for r in log_records(lab.sidecar_log("client")) if r.get("dir") == "inbound"}
    assert SERVER_ID in ids
