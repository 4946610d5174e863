"""End-to-end: a server-first port (the app speaks first, like MySQL) in a STRICT and in a PERMISSIVE pod.

A declared server-first port is never sniffed and carries mesh mTLS only, in both modes (`policy.route_inbound`):
a mesh caller gets the app's banner at once, through mTLS; a plaintext caller from outside the mesh sends nothing
(it waits for the banner), so the inbound TLS server waits for a ClientHello until `timeouts.handshake` and resets
it, and the app never sees it. The pods:
  strict    mesh, inbound STRICT; banner on 3306 (server_first)
  open      mesh, inbound PERMISSIVE; banner on 3306 (server_first); banner on 3307, undeclared (sniffed)
  client    mesh
  outside   outside the mesh (no capture, no sidecar)
"""

from __future__ import annotations

import socket
import time

import pytest

from mtlsmesh.lab.pods import Lab
from mtlsmesh.lab.topology import AppSpec, PodSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
HANDSHAKE_TIMEOUT = 2.0  # the sidecars' timeouts.handshake: how long a silent plaintext caller is held
SNIFF_TIMEOUT = 1.0  # the sidecars' inbound.sniff_timeout (the default)


def banner_pod(name: str, mode: str) -> PodSpec:
    apps = tuple(
        AppSpec(f"banner{port}", ("tcp", "--name", f"{name}-{port}", "--port", str(port), "--mode", "banner"),
                ports=(port,))
        for port in (3306, 3307)
    )  # fmt: skip
    sidecar = {
        "inbound": {"mode": mode, "ports": {3306: {"server_first": True}}},
        "timeouts": {"handshake": f"{HANDSHAKE_TIMEOUT:g}s"},
    }
    return PodSpec(name, apps=apps, sidecar=sidecar)


TOPOLOGY = Topology(
    pods=(banner_pod("strict", "strict"), banner_pod("open", "permissive"), PodSpec("client"),
          PodSpec("outside", mesh=False)),
)  # fmt: skip

lab = harness.lab_fixture(TOPOLOGY)


@pytest.mark.parametrize("pod", ["strict", "open"])
def test_a_mesh_caller_gets_the_banner_through_mtls(lab: Lab, pod: str) -> None:
    with lab.connect("client", lab.ip(pod), 3306) as sock:
        assert sock.recv(100) == f"BANNER {pod}-3306\n".encode()  # at once: nothing waited for the client
        sock.sendall(b"hello after banner\n")
        sock.shutdown(socket.SHUT_WR)
        rest = harness.read_all(sock)
    assert rest == harness.echo_answer(b"hello after banner\n")
    harness.wait_records(
        lab,
        pod,
        lambda r: (
            r.get("orig_dst") == f"{lab.ip(pod)}:3306"
            and r.get("peer_id") == CLIENT_ID
            and r.get("decision") == "mtls"
            and r.get("reason") == "closed"
        ),
    )


@pytest.mark.parametrize("pod", ["strict", "open"])
def test_a_plaintext_caller_is_reset_after_the_handshake_timeout(lab: Lab, pod: str) -> None:
    """What the docs promise: no banner, a reset once timeouts.handshake is over, and the app never sees it."""
    before = lab.app_log(pod, "banner3306").count("eof_after=")  # one line per connection the app served
    started = time.monotonic()
    with lab.connect("outside", lab.ip(pod), 3306, timeout=HANDSHAKE_TIMEOUT + 15) as sock:
        how = harness.refused(lambda: harness.read_all(sock))
    waited = time.monotonic() - started
    assert how in ("ConnectionResetError", "ConnectionError"), how
    assert waited >= HANDSHAKE_TIMEOUT * 0.9, waited  # held for the handshake timeout, not refused at once
    records = harness.wait_records(
        lab,
        pod,
        lambda r: (
            r.get("orig_dst") == f"{lab.ip(pod)}:3306"
            and r.get("client", "").startswith(f"{lab.ip('outside')}:")
            and r.get("reason") == "handshake_timeout"
        ),
    )
    assert records[0]["decision"] == "mtls" and records[0]["peer_id"] == "-"
    assert lab.app_log(pod, "banner3306").count("eof_after=") == before  # the app never saw it


def test_an_undeclared_permissive_port_makes_a_server_first_client_wait_the_sniff_timeout(lab: Lab) -> None:
    """Why a server-first port must be declared: on a sniffed PERMISSIVE port the plaintext client that waits for
    the banner gets it only once the sniff timeout is over and the sidecar passes the silent connection through."""
    started = time.monotonic()
    with lab.connect("outside", lab.ip("open"), 3307, timeout=SNIFF_TIMEOUT + 15) as sock:
        assert sock.recv(100) == b"BANNER open-3307\n"
        waited = time.monotonic() - started
    assert waited >= SNIFF_TIMEOUT * 0.9, waited
    harness.wait_records(
        lab,
        "open",
        lambda r: (
            r.get("orig_dst") == f"{lab.ip('open')}:3307"
            and r.get("client", "").startswith(f"{lab.ip('outside')}:")
            and r.get("decision") == "passthrough"
        ),
    )
