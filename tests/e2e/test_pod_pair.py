"""A client namespace and a pod namespace joined by a veth, the pod under the real capture rules (`mtlsmesh
iptables`, defaults) with a sidecar running as the proxy uid on its default listeners.

Loops (over IPv4 and IPv6): a client outside the pod dials pod-IP:15006 itself in PERMISSIVE. PREROUTING redirects
it to 15006 with original destination pod-IP:15006; passing it through would dial pod-IP:15006 from 127.0.0.6 (or
::6), which the rules let reach 15006 again, and so on until `max_connections`: one plaintext byte would take the
whole pod down. The sidecar must refuse that one connection and handle nothing else.
IPv6: capture is on for IPv6 by default, so the default listeners must take IPv6 too (dual stack `[::]`): an app's
IPv6 connection to a destination outside the mesh is passed through, not refused.
Needs root; namespaces and processes are removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import yaml

from mtlsmesh import inbound
from mtlsmesh.addresses import host_port
from mtlsmesh.conventions import PROXY_GID, PROXY_UID
from mtlsmesh.lab import netns
from mtlsmesh.outcome import Failure, Reason
from tests.e2e import harness
from tests.pki import Pki

ROOT = Path(__file__).resolve().parents[2]
CLIENT_IP, POD_IP = "198.18.61.1", "198.18.61.2"
CLIENT_IP6, POD_IP6 = "2001:db8:61::1", "2001:db8:61::2"  # RFC 3849 documentation range, never routed
MAX_CONNECTIONS = 50


@pytest.fixture
def pod_pair() -> Iterator[tuple[str, str]]:
    """A client namespace and a pod namespace joined by a veth; the pod has the default capture rules."""
    capture = [sys.executable, "-m", "mtlsmesh", "iptables"]
    with harness.loopback_namespace("fxlc", []) as client, harness.loopback_namespace("fxlp", []) as pod:
        pid = os.getpid()
        client_if, pod_if = f"fxlc{pid}v", f"fxlp{pid}v"
        veth = ["type", "veth", "peer", "name", pod_if, "netns", pod]
        netns.run(["ip", "link", "add", client_if, "netns", client, *veth])
        for ns, dev, address, address6 in ((client, client_if, CLIENT_IP, CLIENT_IP6), (pod, pod_if, POD_IP, POD_IP6)):
            netns.run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev])
            netns.run(["ip", "-n", ns, "addr", "add", f"{address6}/64", "dev", dev, "nodad"])
            netns.run(["ip", "-n", ns, "link", "set", dev, "up"])
        subprocess.run(netns.ns_exec(pod, capture), check=True, capture_output=True, timeout=30, cwd=ROOT)
        yield client, pod


def sidecar_config(proxy_dir: Path) -> Path:
    """Credentials for the proxy uid; every listener at its default."""
    pki = Pki(proxy_dir / "pki")
    files = pki.issue("web")
    for path in (files.cert, files.key, files.bundle):
        os.chown(path, PROXY_UID, PROXY_GID)
    for directory in (proxy_dir / "pki", Path(files.cert).parent):
        directory.chmod(0o755)
    config = proxy_dir / "config.yaml"
    settings = {
        "credentials": {"cert": files.cert, "key": files.key, "bundle": files.bundle},
        "inbound": {"mode": "permissive"},
        "max_connections": MAX_CONNECTIONS,
    }
    config.write_text(yaml.safe_dump(settings))
    config.chmod(0o644)
    return config


@contextlib.contextmanager
def running_sidecar(pod_ns: str, config: Path) -> Iterator[list[str]]:
    """The sidecar in `pod_ns` as the proxy uid, ready; at exit it is stopped and the list gets its connection
    lines."""
    argv = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_GID}", "--clear-groups"]
    argv += [sys.executable, "-m", "mtlsmesh", "sidecar", "--config", str(config)]
    sidecar = subprocess.Popen(
        netns.ns_exec(pod_ns, argv),
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[str] = []
    try:
        assert sidecar.stderr is not None
        deadline = time.monotonic() + 30
        while not lines or "event=ready" not in lines[-1]:
            assert time.monotonic() < deadline and sidecar.poll() is None, f"the sidecar did not get ready: {lines}"
            lines.append(sidecar.stderr.readline())
        yield lines
        sidecar.terminate()
        _, err = sidecar.communicate(timeout=30)
        lines.extend(err.splitlines())
    finally:
        if sidecar.poll() is None:
            sidecar.kill()  # only the process this test started (ip netns exec and setpriv exec into it)
            sidecar.wait(timeout=10)


def conn_lines(lines: list[str], direction: str) -> list[str]:
    return [line for line in lines if "logger=mtlsmesh.conn" in line and f"dir={direction} " in line]


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_one_plaintext_byte_to_the_inbound_port_is_one_refused_connection(
    pod_pair: tuple[str, str], proxy_dir: Path, family: int
) -> None:
    client_ns, pod_ns = pod_pair
    client_ip, pod_ip = (CLIENT_IP, POD_IP) if family == 4 else (CLIENT_IP6, POD_IP6)
    with running_sidecar(pod_ns, sidecar_config(proxy_dir)) as lines:
        sock = netns.connect_in(client_ns, pod_ip, 15006, timeout=5)
        try:
            sock.sendall(b"x")  # not TLS: PERMISSIVE would pass it through
            time.sleep(2)  # a loop makes hundreds of connections in this time
        except OSError:
            pass  # reset already: that is the expected answer
        finally:
            sock.close()
    inbound = conn_lines(lines, "inbound")
    assert len(inbound) == 1, "\n".join(inbound[:5]) + f"\n... {len(inbound)} inbound connections"
    assert "decision=refuse" in inbound[0]
    assert inbound[0].endswith(' reason=loop detail="the original destination is this listener"')
    client, orig_dst = host_port(client_ip, 0).removesuffix("0"), host_port(pod_ip, 15006)
    assert f"client={client}" in inbound[0] and f"orig_dst={orig_dst}" in inbound[0]


SERVER6 = f"""
import socket
server = socket.socket(socket.AF_INET6)
server.bind(("{CLIENT_IP6}", 8080))
server.listen(1)
print("listening", flush=True)
conn, _ = server.accept()
conn.sendall(b"hello over IPv6")
conn.close()
"""


@pytest.mark.root
def test_ipv6_from_the_app_to_outside_the_mesh_is_passed_through(pod_pair: tuple[str, str], proxy_dir: Path) -> None:
    client_ns, pod_ns = pod_pair
    server = subprocess.Popen(
        netns.ns_exec(client_ns, [sys.executable, "-c", SERVER6]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        with running_sidecar(pod_ns, sidecar_config(proxy_dir)) as lines:
            # A socket of this (root) process inside the pod: captured like an app's.
            sock = netns.socket_in(pod_ns, socket.AF_INET6)
            try:
                sock.settimeout(10)
                sock.connect((CLIENT_IP6, 8080))
                reply = harness.read_all(sock)
            finally:
                sock.close()
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()  # only the process this test started
            server.wait(timeout=10)
    assert reply == b"hello over IPv6"
    assert any("event=ready" in line and "outbound=::" in line for line in lines), lines
    (outbound,) = conn_lines(lines, "outbound")
    assert "decision=passthrough" in outbound and f"orig_dst=[{CLIENT_IP6}]:8080" in outbound


def _loop_reasons_by_source() -> dict[str, Failure | None]:
    """Accept one connection from ::6 and one from ::1 on [::1], and ask the guard about each (orig dst ::1:9080)."""
    reasons: dict[str, Failure | None] = {}
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.bind(("::1", 0))
        listener.listen(2)
        for source in ("::6", "::1"):
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
                client.bind((source, 0))
                client.connect(listener.getsockname()[:2])
                accepted, _ = listener.accept()
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
                app_source = ipaddress.IPv4Address("127.0.0.6")
                reasons[source] = inbound.loop_reason(stream, app_source, ipaddress.IPv6Address("::1"), 9080)
                accepted.close()
    return reasons


@pytest.mark.root
def test_a_connection_from_the_ipv6_twin_of_the_app_source_is_a_loop() -> None:
    # An IPv6 app is dialed from ::6 when app_source is 127.0.0.6; ::6 sits on no interface in the host namespace,
    # so this runs in one of our own with ::6 on lo.
    with harness.loopback_namespace("fxl6", ["::6/128"]) as name:
        reasons = netns.run_in_netns(name, _loop_reasons_by_source)
    assert reasons == {"::6": Failure(Reason.LOOP, "connection from the app source address"), "::1": None}
