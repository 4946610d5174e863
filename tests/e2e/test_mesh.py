"""End-to-end: real pods (namespaces), real capture rules, sidecars as uid 1337, real apps, real traffic.

One lab serves every scenario in this module; each test uses its own ports or pods, so they do not depend on
each other's order. The pods:
  web       mesh; HTTP on 9080 (PERMISSIVE), 9081 (STRICT), 9099 (excluded from capture); banner on 3306
            (server first); echo on 7000 (ALLOW only for sa/client); hash on 7001; DENY sa/intruder on 9081
  client    mesh, ALLOW_ANY, port 9099 excluded from outbound capture
  intruder  mesh, REGISTRY_ONLY
  outside   outside the mesh (no capture, no sidecar): HTTP on 8080
  Service web: VIP:80 -> web:9080
The lab is dual stack: the scenarios marked with `FAMILIES` run over IPv4 and again over IPv6 (the pods' and the
Service's IPv6 addresses), with the same identities, decisions and wire checks.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from mtlsmesh.addresses import host_port
from mtlsmesh.lab.pods import Lab, log_records
from mtlsmesh.lab.topology import AppSpec, PodSpec, ServiceSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
WEB_ID = "spiffe://cluster.local/ns/default/sa/web"
INTRUDER_ID = "spiffe://cluster.local/ns/default/sa/intruder"

TOPOLOGY = Topology(
    pods=(
        PodSpec(
            "web",
            apps=(
                AppSpec(
                    "http",
                    ("http", "--name", "web", "--port", "9080", "--port", "9081", "--port", "9099"),
                    ports=(9080, 9081, 9099),
                ),
                AppSpec("banner", ("tcp", "--name", "web-banner", "--port", "3306", "--mode", "banner"), ports=(3306,)),
                AppSpec("echo", ("tcp", "--name", "web-echo", "--port", "7000", "--mode", "echo"), ports=(7000,)),
                AppSpec("hash", ("tcp", "--name", "web-hash", "--port", "7001", "--mode", "hash"), ports=(7001,)),
            ),
            exclude_inbound_ports=(9099,),
            sidecar={
                "inbound": {"mode": "strict", "ports": {9080: {"mode": "permissive"}, 3306: {"server_first": True}}},
                "authorization": [
                    {"action": "DENY", "principals": [INTRUDER_ID], "ports": [9081]},
                    {"action": "ALLOW", "principals": [CLIENT_ID], "ports": [7000]},
                ],
            },
        ),
        PodSpec("client", exclude_outbound_ports=(9099,)),
        PodSpec("intruder", sidecar={"outbound": {"policy": "REGISTRY_ONLY"}}),
        PodSpec(
            "outside",
            mesh=False,
            apps=(AppSpec("http", ("http", "--name", "outside", "--port", "8080"), ports=(8080,)),),
        ),
    ),
    services=(ServiceSpec("web", 80, "web", 9080),),
)

lab = harness.lab_fixture(TOPOLOGY)

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
APP_SOURCE = {4: "127.0.0.6", 6: "::6"}  # what the inbound sidecar dials the app from, per family
GATEWAY = {4: "198.18.0.1", 6: "2001:db8:18::1"}  # the node's bridge address: what a hairpin SNATs to


@FAMILIES
def test_mesh_to_mesh_is_encrypted_on_the_wire(lab: Lab, family: int) -> None:
    marker = harness.unique_marker(f"wire-v{family}")
    with lab.capture("web") as pcap_path:
        status, body = harness.get(lab, "client", lab.ip("web", family), 9080, "/wire", marker)
    assert status == 200
    assert marker.encode() in body  # the app saw the plaintext and echoed the marker back
    # Delivered by the inbound sidecar, from the app source of this family.
    assert f"peer={harness.peer_prefix(APP_SOURCE[family])}" in harness.app_line(lab, "web", "http", marker)
    harness.assert_encrypted_hop(lab, pcap_path, "web", 9080, marker, CLIENT_ID, family)
    # Both ends checked the other's identity: the client's outbound sidecar verified the web pod's.
    harness.wait_records(
        lab,
        "client",
        lambda r: (
            r.get("dir") == "outbound"
            and r.get("orig_dst") == host_port(lab.ip("web", family), 9080)
            and r.get("peer_id") == WEB_ID
            and r.get("decision") == "mtls"
        ),
    )


@FAMILIES
def test_authorization_deny_refuses_and_allow_admits(lab: Lab, family: int) -> None:
    web = lab.ip("web", family)
    # DENY sa/intruder on 9081; everyone else is admitted there.
    status, _ = harness.get(lab, "client", web, 9081, "/deny-check")
    assert status == 200
    harness.refused(lambda: harness.get(lab, "intruder", web, 9081, f"/denied-v{family}"))
    # ALLOW only sa/client on 7000: the client is admitted, the intruder matches no ALLOW rule.
    payload = b"allowed caller\n"
    assert harness.exchange(lab, "client", web, 7000, payload) == harness.echo_answer(payload)
    harness.refused(lambda: harness.exchange(lab, "intruder", web, 7000, b"not allowed\n"))
    assert f"/denied-v{family}" not in lab.app_log("web", "http")

    # The web pod's inbound sidecar authenticated the intruder (mTLS), then refused it by policy, on both ports.
    def denied(port: int) -> Callable[[dict[str, str]], bool]:
        return lambda r: (
            r.get("orig_dst") == host_port(web, port)
            and r.get("peer_id") == INTRUDER_ID
            and r.get("decision") == "mtls"
            and r.get("reason") == "denied"
            and INTRUDER_ID in r.get("detail", "")
            and f"port {port}" in r.get("detail", "")
        )

    for port in (9081, 7000):
        harness.wait_records(lab, "web", denied(port))


@FAMILIES
def test_outside_pod_reaches_permissive_port_not_strict(lab: Lab, family: int) -> None:
    web = lab.ip("web", family)
    marker = harness.unique_marker(f"permissive-v{family}")
    status, body = harness.get(lab, "outside", web, 9080, "/from-outside", marker)
    assert status == 200
    assert marker.encode() in body
    harness.refused(lambda: harness.get(lab, "outside", web, 9081, f"/strict-from-outside-v{family}"))
    assert f"/strict-from-outside-v{family}" not in lab.app_log("web", "http")
    from_outside = harness.peer_prefix(lab.ip("outside", family))

    def outside_to(port: int, decision: str) -> Callable[[dict[str, str]], bool]:
        return lambda r: (
            r.get("client", "").startswith(from_outside)
            and r.get("orig_dst") == host_port(web, port)
            and r.get("decision") == decision
        )

    harness.wait_records(lab, "web", outside_to(9080, "passthrough"))
    harness.wait_records(lab, "web", outside_to(9081, "refuse"))


@FAMILIES
def test_mesh_pod_reaches_outside_only_under_allow_any(lab: Lab, family: int) -> None:
    outside = lab.ip("outside", family)
    marker = harness.unique_marker(f"passthrough-v{family}")
    status, body = harness.get(lab, "client", outside, 8080, "/passthrough", marker)
    assert status == 200
    assert marker.encode() in body
    # The outside app saw the client pod's own address: passthrough, not a proxy of ours in between on its side.
    line = harness.app_line(lab, "outside", "http", marker)
    assert f"peer={harness.peer_prefix(lab.ip('client', family))}" in line
    harness.refused(lambda: harness.get(lab, "intruder", outside, 8080, f"/registry-only-v{family}"))
    assert f"/registry-only-v{family}" not in lab.app_log("outside", "http")
    to_outside = host_port(outside, 8080)
    harness.wait_records(
        lab, "client", lambda r: r.get("orig_dst") == to_outside and r.get("decision") == "passthrough"
    )
    harness.wait_records(lab, "intruder", lambda r: r.get("orig_dst") == to_outside and r.get("decision") == "refuse")


@FAMILIES
def test_excluded_port_bypasses_the_sidecars(lab: Lab, family: int) -> None:
    web = lab.ip("web", family)
    marker = harness.unique_marker(f"excluded-v{family}")
    with lab.capture("web") as pcap_path:
        status, _ = harness.get(lab, "client", web, 9099, "/excluded", marker)
        outside_status, _ = harness.get(lab, "outside", web, 9099, "/excluded-outside")
    assert (status, outside_status) == (200, 200)  # STRICT would refuse the outside pod on a captured port
    streams = harness.wire_streams(pcap_path)
    assert [flow for flow, data in streams.items() if marker.encode() in data], "excluded port traffic not plain"
    line = harness.app_line(lab, "web", "http", marker)
    assert f"peer={harness.peer_prefix(lab.ip('client', family))}" in line  # no sidecar in between
    for pod in ("web", "client"):
        assert not [r for r in log_records(lab.sidecar_log(pod)) if r.get("orig_dst", "").endswith(":9099")]


@FAMILIES
def test_pod_calls_its_own_ip(lab: Lab, family: int) -> None:
    marker = harness.unique_marker(f"self-v{family}")
    status, body = harness.get(lab, "web", lab.ip("web", family), 9080, "/self", marker)
    assert status == 200
    assert marker.encode() in body


@FAMILIES
def test_pod_calls_its_own_service_vip(lab: Lab, family: int) -> None:
    # The hairpin, as on a cluster: the web pod calls the Service in front of itself. Its outbound sidecar verifies
    # the Service's identity (its own), the node DNATs the dial back to the pod and SNATs it to the node's address
    # (kube-proxy's hairpin masquerade), and the pod's inbound sidecar takes it over mTLS from its own outbound one.
    vip, web = lab.vip("web", family), lab.ip("web", family)
    marker = harness.unique_marker(f"own-vip-v{family}")
    with lab.capture("web") as pcap_path:
        status, body = harness.get(lab, "web", vip, 80, "/own-vip", marker)
    assert status == 200
    assert b'"service": "web"' in body and marker.encode() in body  # its own app's answer
    assert f"peer={harness.peer_prefix(APP_SOURCE[family])}" in harness.app_line(lab, "web", "http", marker)
    streams = harness.wire_streams(pcap_path)
    # On the pod's wire: out to the VIP, back in from the node to the app port; TLS both ways, no plaintext.
    assert harness.assert_tls_only(streams, 80) >= 2
    assert harness.assert_tls_only(streams, 9080) >= 2
    assert not [flow for flow, data in streams.items() if marker.encode() in data], "plaintext marker on the wire"
    harness.wait_records(
        lab,
        "web",
        lambda r: (
            r.get("dir") == "outbound"
            and r.get("orig_dst") == host_port(vip, 80)
            and r.get("peer_id") == WEB_ID
            and r.get("decision") == "mtls"
        ),
    )
    harness.wait_records(
        lab,
        "web",
        lambda r: (
            r.get("dir") == "inbound"
            and r.get("orig_dst") == host_port(web, 9080)
            and r.get("client", "").startswith(harness.peer_prefix(GATEWAY[family]))
            and r.get("peer_id") == WEB_ID
            and r.get("decision") == "mtls"
        ),
    )


@FAMILIES
def test_service_vip_is_dnated_on_the_node(lab: Lab, family: int) -> None:
    vip = lab.vip("web", family)
    marker = harness.unique_marker(f"vip-v{family}")
    with lab.capture("client") as pcap_path:
        status, body = harness.get(lab, "client", vip, 80, "/vip", marker)
    assert status == 200
    assert b'"service": "web"' in body
    streams = harness.wire_streams(pcap_path)
    # On the client's wire the connection goes to the VIP, and carries only TLS.
    assert harness.assert_tls_only(streams, 80) >= 2
    assert not [flow for flow, data in streams.items() if marker.encode() in data]
    assert lab.nat_rules("client", family).count("MTLSMESH") >= 4  # the capture rules of this family
    # The client's sidecar saw the VIP as the original destination and verified the backend's identity; the node
    # DNATed its dial, so the web pod's sidecar saw the pod address.
    harness.wait_records(
        lab,
        "client",
        lambda r: (
            r.get("orig_dst") == host_port(vip, 80) and r.get("peer_id") == WEB_ID and r.get("decision") == "mtls"
        ),
    )
    harness.wait_records(
        lab,
        "web",
        lambda r: (
            r.get("orig_dst") == host_port(lab.ip("web", family), 9080)
            and r.get("client", "").startswith(harness.peer_prefix(lab.ip("client", family)))
            and r.get("peer_id") == CLIENT_ID
        ),
    )


def test_server_first_protocol(lab: Lab) -> None:
    with lab.connect("client", lab.ip("web"), 3306) as sock:
        banner = sock.recv(100)  # the client says nothing first: a sniffing sidecar would wait forever
        assert banner == b"BANNER web-banner\n"
        sock.sendall(b"hello after banner\n")
        sock.shutdown(socket.SHUT_WR)
        rest = harness.read_all(sock)
    assert rest == harness.echo_answer(b"hello after banner\n")
    harness.wait_records(
        lab,
        "web",
        lambda r: r.get("orig_dst") == f"{lab.ip('web')}:3306" and r.get("peer_id") == CLIENT_ID,
    )


@FAMILIES
def test_half_close_crosses_the_mesh(lab: Lab, family: int) -> None:
    with lab.connect("client", lab.ip("web", family), 7000) as sock:
        sock.sendall(b"first half\n")
        assert sock.recv(100) == b"first half\n"
        sock.shutdown(socket.SHUT_WR)  # our FIN must reach the app, and its answer must still come back
        rest = harness.read_all(sock)
    assert rest == b"EOF after 11 bytes\n"


def test_half_close_from_the_server_side(lab: Lab) -> None:
    # The server app (played by this test inside the web pod) says its piece and shuts down its sending side first;
    # the client must see EOF while its own direction stays open and still reaches the server.
    received: list[bytes] = []
    with lab.listen("web", 7100) as listener:
        listener.settimeout(10)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                conn.sendall(b"server speaks and stops\n")
                conn.shutdown(socket.SHUT_WR)
                received.append(harness.read_all(conn))

        server = threading.Thread(target=serve)
        server.start()
        try:
            with lab.connect("client", lab.ip("web"), 7100) as sock:
                sock.sendall(b"hello\n")
                assert harness.read_all(sock) == b"server speaks and stops\n"
                sock.sendall(b"client still talking after the server's FIN\n")
                sock.shutdown(socket.SHUT_WR)
        finally:
            server.join(timeout=15)
    assert received == [b"hello\nclient still talking after the server's FIN\n"]
    harness.wait_records(
        lab, "web", lambda r: r.get("orig_dst") == f"{lab.ip('web')}:7100" and r.get("peer_id") == CLIENT_ID
    )


@pytest.mark.slow
def test_256_mib_transfer_is_intact(lab: Lab) -> None:
    total = 256 * 1024 * 1024
    start = time.monotonic()
    with lab.connect("client", lab.ip("web"), 7001, timeout=120) as sock:
        digest = harness.send_stream(sock, total, b"bulk")
        sock.shutdown(socket.SHUT_WR)
        answer = harness.read_all(sock).decode()
    assert answer == f"{total} {digest}\n"
    assert time.monotonic() - start < 240
    # It crossed the mesh: the web pod's inbound sidecar relayed every byte of it over mTLS from the client.
    orig_dst = f"{lab.ip('web')}:7001"
    harness.wait_records(
        lab,
        "web",
        lambda r: r.get("orig_dst") == orig_dst and r.get("peer_id") == CLIENT_ID and r.get("bytes_in") == str(total),
    )


def test_200_concurrent_connections(lab: Lab) -> None:
    count = 200
    # Open all first, so all 200 are in flight through both sidecars at once, then talk on each.
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        socks = list(pool.map(lambda _: lab.connect("client", lab.ip("web"), 7000, timeout=60), range(count)))
        try:
            start = time.monotonic()

            def talk(index: int) -> bool:
                payload = hashlib.sha256(str(index).encode()).hexdigest().encode() * 4
                sock = socks[index]
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                return harness.read_all(sock) == harness.echo_answer(payload)

            results = list(pool.map(talk, range(count)))
            elapsed = time.monotonic() - start
        finally:
            for sock in socks:
                sock.close()
    assert results.count(True) == count
    assert elapsed < 60
    orig_dst = f"{lab.ip('web')}:7000"
    harness.wait_records(
        lab, "web", lambda r: r.get("orig_dst") == orig_dst and r.get("peer_id") == CLIENT_ID, count=count
    )


def test_only_the_proxy_uid_reads_the_key(lab: Lab) -> None:
    key = lab.pod_dir("web") / "svid" / "key.pem"
    info = key.stat()  # follows the Secret-like symlinks to the current version
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (1337, 1337, 0o600)
    app_read = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "cat", str(key)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert app_read.returncode != 0  # the app's uid never holds the key
    assert app_read.stdout == b""
