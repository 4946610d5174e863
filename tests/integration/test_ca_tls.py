"""Certificates from `mtlsmesh ca` in a real TLS 1.3 handshake: pyOpenSSL on both ends of a loopback TCP connection.

Both sides present an SVID and require the other's, as the sidecars do. The handshake must succeed with SVIDs from
one CA (with and without an intermediate) and fail when one side's certificate comes from another CA or has
expired. In TLS 1.3 the client's handshake call completes before the server has judged the client's certificate,
so a refusal by the server reaches the client only at its first read (docs/ARCHITECTURE.md §13): the tests read.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from OpenSSL import SSL

from mtlsmesh import ca, svid
from mtlsmesh.cli import main
from mtlsmesh.identity import SpiffeId, parse_trust_domain, workload_id

TD = parse_trust_domain("cluster.local")
ALPN = b"mtlsmesh"
IO_TIMEOUT = 10.0  # seconds; a stuck handshake fails the test instead of hanging it


@dataclass(frozen=True, slots=True)
class Creds:
    cert: Path
    key: Path
    bundle: Path


def creds_in(directory: Path, *, bundle_from: Path | None = None) -> Creds:
    return Creds(directory / "cert.pem", directory / "key.pem", (bundle_from or directory) / "bundle.pem")


def issue(ca_dir: Path, out: Path, namespace: str, service_account: str) -> Creds:
    argv = ["ca", "issue", "--ca-dir", str(ca_dir), "--namespace", namespace, "--service-account", service_account]
    assert main([*argv, "--out", str(out)]) == 0
    return creds_in(out)


@pytest.fixture(params=[False, True], ids=["root-signs", "intermediate-signs-constrained"])
def pki(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Two CAs made by `mtlsmesh ca init`, `ca` and `other`, with the same trust domain.

    The second variant adds an intermediate and the URI name constraint, which OpenSSL must honour in a handshake.
    """
    intermediate = ["--intermediate", "--name-constraint"] if request.param else []
    for name in ("ca", "other"):
        assert main(["ca", "init", "--dir", str(tmp_path / name), *intermediate]) == 0
    yield tmp_path


def build_context(creds: Creds, *, server: bool) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(str(creds.cert))
    context.use_privatekey_file(str(creds.key))
    context.check_privatekey()
    context.load_verify_locations(str(creds.bundle))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if server:
        context.set_alpn_select_callback(
            lambda _conn, offered: ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS
        )
    else:
        context.set_alpn_protos([ALPN])
    return context


def _bounded(sock: socket.socket) -> None:
    # Kernel-level timeouts keep the socket blocking for OpenSSL (a Python-level timeout would make it
    # non-blocking and surface as WantReadError) while still bounding every read and write.
    timeval = struct.pack("ll", int(IO_TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


@dataclass
class Outcome:
    peer_id: SpiffeId | None = None
    received: bytes = b""
    alpn: bytes | None = None
    version: str = ""
    error: str = ""


def _serve_one(listener: socket.socket, context: SSL.Context, outcome: Outcome) -> None:
    raw, _client_addr = listener.accept()
    _bounded(raw)
    conn = SSL.Connection(context, raw)
    conn.set_accept_state()
    try:
        conn.do_handshake()
        peer = conn.get_peer_certificate(as_cryptography=True)
        assert peer is not None
        outcome.peer_id = svid.leaf_spiffe_id(peer)  # OpenSSL verified the chain; now the SPIFFE rules
        outcome.alpn = conn.get_alpn_proto_negotiated()
        outcome.version = conn.get_protocol_version_name()
        outcome.received = conn.recv(1024)
        conn.sendall(b"pong:" + outcome.received)
        conn.shutdown()
    except SSL.Error as exc:
        outcome.error = str(exc)
        _linger(raw)
    finally:
        raw.close()


def _linger(raw: socket.socket) -> None:
    # Closing with the client's unread bytes (its Finished, its first write) in our receive buffer makes the
    # kernel send RST, which can overtake the alert: the client would see ECONNRESET instead of the reason.
    # Half-close, then drain until the client closes too.
    try:
        raw.shutdown(socket.SHUT_WR)
        for _ in range(64):
            if not raw.recv(65536):
                break
    except OSError:
        pass


def handshake(server_creds: Creds, client_creds: Creds) -> tuple[Outcome, Outcome]:
    """One mutual-TLS exchange over loopback; returns what the server and the client saw."""
    server, client = Outcome(), Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(
            target=_serve_one, args=(listener, build_context(server_creds, server=True), server), daemon=True
        )
        thread.start()
        raw = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
        raw.settimeout(None)
        _bounded(raw)
        conn = SSL.Connection(build_context(client_creds, server=False), raw)
        conn.set_connect_state()
        try:
            conn.do_handshake()
            peer = conn.get_peer_certificate(as_cryptography=True)
            assert peer is not None
            client.peer_id = svid.leaf_spiffe_id(peer)
            client.alpn = conn.get_alpn_proto_negotiated()
            client.version = conn.get_protocol_version_name()
            conn.sendall(b"ping")
            client.received = conn.recv(1024)  # where a TLS 1.3 client learns the server refused its certificate
        except SSL.Error as exc:
            client.error = str(exc)
        finally:
            raw.close()
        thread.join(IO_TIMEOUT * 2)
        assert not thread.is_alive()
    return server, client


def test_mutual_tls_with_svids_from_ca_issue(pki: Path) -> None:
    server_creds = issue(pki / "ca", pki / "reviews", "default", "reviews")
    client_creds = issue(pki / "ca", pki / "productpage", "default", "productpage")
    server, client = handshake(server_creds, client_creds)
    assert server.error == "" and client.error == ""
    assert server.version == client.version == "TLSv1.3"
    assert server.alpn == client.alpn == ALPN
    assert server.peer_id == workload_id(TD, "default", "productpage")
    assert client.peer_id == workload_id(TD, "default", "reviews")
    assert server.received == b"ping"
    assert client.received == b"pong:ping"


def test_server_refuses_a_client_of_another_ca(pki: Path) -> None:
    server_creds = issue(pki / "ca", pki / "reviews", "default", "reviews")
    issue(pki / "other", pki / "intruder", "default", "productpage")
    # The intruder trusts our CA, so only the server's judgement can stop it.
    intruder = creds_in(pki / "intruder", bundle_from=pki / "reviews")
    server, client = handshake(server_creds, intruder)
    assert "certificate verify failed" in server.error
    assert server.peer_id is None and server.received == b""
    # The client's handshake call succeeded (it even checked the server's SVID); its first read brings the alert.
    assert client.version == "TLSv1.3"
    assert client.peer_id == workload_id(TD, "default", "reviews")
    assert client.received == b""
    assert "alert unknown ca" in client.error


def test_client_refuses_a_server_of_another_ca(pki: Path) -> None:
    issue(pki / "other", pki / "impostor", "default", "reviews")
    client_creds = issue(pki / "ca", pki / "productpage", "default", "productpage")
    impostor = creds_in(pki / "impostor", bundle_from=pki / "productpage")
    server, client = handshake(impostor, client_creds)
    assert "certificate verify failed" in client.error
    assert client.peer_id is None
    assert "alert unknown ca" in server.error
    assert server.received == b""


def _expired(pki: Path, name: str, service_account: str) -> Creds:
    """An SVID of a CA whose files the other side trusts, valid two days ago for an hour."""
    past = datetime.now(UTC) - timedelta(days=3)
    old_ca = ca.create_ca(TD, now=past)
    ca.save_authority(old_ca, pki / f"{name}-ca")
    issued = ca.issue_svid(old_ca, workload_id(TD, "default", service_account), now=past, ttl=timedelta(hours=1))
    issued.write_to_dir(pki / name)
    return creds_in(pki / name)


def _trusting_both(pki: Path, own: Creds, expired: Creds) -> Creds:
    """`own` SVID with a bundle that trusts the expired SVID's CA as well, so only the dates can fail a handshake."""
    both = pki / "both"
    both.mkdir()
    (both / "bundle.pem").write_bytes(own.bundle.read_bytes() + expired.bundle.read_bytes())
    return Creds(own.cert, own.key, both / "bundle.pem")


def test_server_refuses_an_expired_client(pki: Path) -> None:
    server_creds = issue(pki / "ca", pki / "reviews", "default", "reviews")
    expired = _expired(pki, "stale", "productpage")
    # The server trusts the expired SVID's CA too: the date alone must fail it.
    server_trusting_both = _trusting_both(pki, server_creds, expired)
    client = Creds(expired.cert, expired.key, server_creds.bundle)
    server, client_outcome = handshake(server_trusting_both, client)
    assert "certificate verify failed" in server.error
    assert server.received == b""
    assert client_outcome.version == "TLSv1.3"  # the handshake call passed; the read fails
    assert client_outcome.received == b""
    assert "alert certificate expired" in client_outcome.error


def test_client_refuses_an_expired_server(pki: Path) -> None:
    client_creds = issue(pki / "ca", pki / "productpage", "default", "productpage")
    expired = _expired(pki, "stale", "reviews")
    client = _trusting_both(pki, client_creds, expired)
    server, client_outcome = handshake(Creds(expired.cert, expired.key, client_creds.bundle), client)
    assert "certificate verify failed" in client_outcome.error
    assert client_outcome.peer_id is None
    assert "alert certificate expired" in server.error
