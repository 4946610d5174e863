"""Shared end-to-end harness: labs as pytest fixtures that always tear down, and the probes scenarios use.

`lab_fixture(topology)` makes a module-scoped fixture: one lab per test module (building one costs a few seconds of
sidecar start-up), torn down even when tests fail, followed by a check that nothing was left behind: no
namespace with the lab's prefix, no process the lab started, no temp dir. Rules live only inside the lab's
namespaces, so removing the namespaces removes them; the check proves the namespaces are gone.

Clients here are sockets this test process opens inside a pod (`Lab.connect`): they belong to root, not to the
proxy uid 1337, so the pod's capture rules treat them exactly like an app's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from mtlsmesh.addresses import host_port
from mtlsmesh.lab import netns, pcap
from mtlsmesh.lab.demoapps import MARKER_HEADER
from mtlsmesh.lab.pods import Lab, http_get, log_records
from mtlsmesh.lab.topology import SERVICES_CHAIN, Topology


def open_lab(topology: Topology) -> Iterator[Lab]:
    """Build a lab, yield it, tear it down, then fail if anything of it is left."""
    lab = Lab(topology, tag="mme")
    try:
        lab.start()
        yield lab
    finally:
        pids = lab.processes()
        lab.close()
        assert_nothing_left(lab, pids)


def assert_nothing_left(lab: Lab, pids: list[int]) -> None:
    left_ns = [name for name in netns.list_namespaces() if name.startswith(lab.prefix)]
    assert not left_ns, f"namespaces left behind: {left_ns}"
    running = [pid for pid in pids if netns.alive(pid)]
    assert not running, f"processes left behind: {running}"
    assert not lab.workdir.exists() or lab.workdir == Path(), f"temp dir left behind: {lab.workdir}"
    # The lab's rules live inside its namespaces; none may have reached the host's tables.
    for save in ("iptables-save", "ip6tables-save"):
        host_rules = netns.run([save])
        assert SERVICES_CHAIN not in host_rules and lab.prefix not in host_rules, f"lab rules found on the host: {save}"
    assert lab.prefix not in netns.run(["ip", "-o", "link", "show"]), "lab interfaces found on the host"


def leftovers(prefix: str) -> list[str]:
    """Namespaces, and entries in the temp dir, whose names start with a lab's `prefix`: what a torn-down lab must
    not leave."""
    namespaces = [name for name in netns.list_namespaces() if name.startswith(prefix)]
    return namespaces + [entry for entry in os.listdir(tempfile.gettempdir()) if entry.startswith(prefix)]


def lab_fixture(topology: Topology) -> Callable[[], Iterator[Lab]]:
    """A module-scoped fixture named `lab` serving one lab built from `topology`."""

    @pytest.fixture(scope="module", name="lab")
    def fixture() -> Iterator[Lab]:
        yield from open_lab(topology)

    return fixture


@contextlib.contextmanager
def loopback_namespace(tag: str, addresses: Sequence[str], commands: Sequence[Sequence[str]] = ()) -> Iterator[str]:
    """A namespace `<tag><pid>` with loopback up and holding `addresses`, after `commands` have run inside it (the
    test's rules); deleted on exit, even when building it or the test fails. For tests that need one kernel, not
    a lab."""
    name = f"{tag}{os.getpid()}"
    netns.run(["ip", "netns", "add", name])
    try:
        netns.run(["ip", "-n", name, "link", "set", "lo", "up"])
        for address in addresses:
            no_dad = ["nodad"] if ":" in address else []  # an IPv6 address is usable at once, not after DAD
            netns.run(["ip", "-n", name, "addr", "add", address, "dev", "lo", *no_dad])
        for argv in commands:
            netns.run(netns.ns_exec(name, argv))
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def unique_marker(tag: str) -> str:
    return f"PLAINTEXT-MARKER-{tag}-{os.getpid()}-{time.monotonic_ns()}"


def get(lab: Lab, pod: str, host: str, port: int, path: str = "/", marker: str = "") -> tuple[int, bytes]:
    headers = {MARKER_HEADER: marker} if marker else {}
    return http_get(lab.pod_ns(pod), host, port, path, timeout=10.0, headers=headers)


def peer_prefix(host: str) -> str:
    """How the lab's apps log a peer at `host`: `198.18.0.10:` or `[2001:db8:18::a]:`, the port left out."""
    return host_port(host, 0).removesuffix("0")


def app_line(lab: Lab, pod: str, app: str, marker: str) -> str:
    """The one line of the pod's app log that carries `marker` (fails when there is none, or several)."""
    lines = [line for line in lab.app_log(pod, app).splitlines() if marker in line]
    assert len(lines) == 1, f"{pod}/{app} logged {len(lines)} lines with {marker}"
    return lines[0]


def refused(fn: Callable[[], object]) -> str:
    """Run a client exchange that the mesh must refuse; return how it was refused, fail if it succeeded.

    A refused connection shows up as a reset or as EOF before any answer: for the app its peer went away. A hang
    is not a refusal: the sidecar must answer promptly.
    """
    try:
        result = fn()
    except TimeoutError:
        pytest.fail("the connection hung instead of being refused")
    except OSError as exc:  # ConnectionResetError, EOF before an answer (ConnectionError), ...
        return type(exc).__name__
    pytest.fail(f"expected the mesh to refuse, got {result!r}")


def exchange(lab: Lab, pod: str, host: str, port: int, payload: bytes, *, timeout: float = 10.0) -> bytes:
    """Send `payload`, half-close, and read to EOF: the echo app answers with the bytes and an EOF line."""
    with lab.connect(pod, host, port, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    if not chunks:
        raise ConnectionError("closed without a byte")
    return b"".join(chunks)


def echo_answer(payload: bytes) -> bytes:
    return payload + f"EOF after {len(payload)} bytes\n".encode()


def send_stream(sock: socket.socket, total: int, seed: bytes) -> str:
    """Send `total` pseudo-random bytes (SHA-256 in counter mode, so not compressible), return their hash."""
    digest = hashlib.sha256()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048))  # 64 KiB
    sent = 0
    counter = 0
    while sent < total:
        chunk = block[: total - sent] if total - sent < len(block) else block
        chunk = counter.to_bytes(8, "big") + chunk[8:] if len(chunk) >= 8 else chunk
        sock.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
        counter += 1
    return digest.hexdigest()


def wait_records(
    lab: Lab, pod: str, predicate: Callable[[dict[str, str]], bool], count: int = 1, timeout: float = 10.0
) -> list[dict[str, str]]:
    """Wait until the pod's sidecar has logged at least `count` connection records matching `predicate` (a record
    is written when its connection ends); return them, or fail naming how many there were."""
    deadline = time.monotonic() + timeout
    while True:
        found = [record for record in log_records(lab.sidecar_log(pod)) if predicate(record)]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{pod}'s sidecar logged {len(found)} matching connections, expected {count}")
        time.sleep(0.1)


def wire_streams(pcap_path: Path) -> dict[pcap.Flow, bytes]:
    return pcap.reassemble(pcap.parse_pcap(pcap_path.read_bytes()))


def assert_tls_only(streams: dict[pcap.Flow, bytes], port: int) -> int:
    """Every flow to or from `port` carries TLS records and nothing else; returns how many application-data
    records (type 0x17, version 0x0303) were seen."""
    flows = pcap.flows_on_port(streams, [port])
    assert flows, f"no traffic on port {port} was captured"
    app_records = 0
    for flow, data in flows.items():
        scan = pcap.tls_records(data)
        assert scan.complete, f"{flow}: bytes that are not a TLS record: {data[:40]!r}"
        app_records += sum(1 for r in scan.records if (r.content_type, r.version) == (0x17, 0x0303))
    assert app_records > 0, "no TLS application-data records on the wire"
    return app_records


def assert_encrypted_hop(
    lab: Lab, pcap_path: Path, callee: str, port: int, marker: str, caller_id: str, family: int = 4
) -> None:
    """One mesh hop, proven from both ends: the capture on the callee's link holds only TLS records on `port` (at
    least a request and a response) and never the plaintext `marker`, and the callee's inbound sidecar logged an
    mTLS connection to its app port (on its address of IP version `family`) from `caller_id`."""
    streams = wire_streams(pcap_path)
    assert assert_tls_only(streams, port) >= 2
    assert not [flow for flow, data in streams.items() if marker.encode() in data], "plaintext marker on the wire"
    wait_records(
        lab,
        callee,
        lambda r: (
            r.get("dir") == "inbound"
            and r.get("orig_dst") == host_port(lab.ip(callee, family), port)
            and r.get("peer_id") == caller_id
            and r.get("decision") == "mtls"
        ),
    )


def server_certificate_serial(lab: Lab, pod: str, port: int, client_dir: Path) -> int:
    """Handshake with a pod's inbound sidecar from the node, as a mesh peer would, and return the serial number of
    the certificate it presents. `client_dir` holds a cert.pem/key.pem/bundle.pem issued by the lab's CA."""
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # SPIFFE IDs, not host names, are checked by the mesh; here only the serial
    context.load_verify_locations(str(client_dir / "bundle.pem"))
    context.load_cert_chain(str(client_dir / "cert.pem"), str(client_dir / "key.pem"))
    context.set_alpn_protocols(["mtlsmesh"])
    raw = netns.connect_in(lab.node_ns, lab.ip(pod), port, timeout=10.0)
    with context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
