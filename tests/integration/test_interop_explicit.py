"""Explicit listeners against TLS peers we did not write, both ways, on both record paths, TLS 1.3 and 1.2.

A `terminate` listener must serve any standard mTLS client with a valid SVID and an `originate` listener any
standard mTLS server, like stunnel or ghostunnel: whatever ALPN they offer or answer, or none. Here the sidecar is
the real `serve_sidecar` on loopback (tests/integration/mesh.py) and the other end is, in turn:

- curl (`--cert/--key/--cacert`, system OpenSSL), `openssl s_client` and `openssl s_server`, stunnel in client and
  server mode: processes, each given a deadline and ended by the test that started it;
- Python's `ssl` (the system's OpenSSL, not the one pyOpenSSL bundles) and tlslite-ng (an independent TLS
  implementation in pure Python), in a thread with blocking sockets and timeouts.

Each case runs with `record_layer: own` and `openssl` on TLS 1.3, and on TLS 1.2 against a listener with
`min_tls_version: "1.2"` (whose connections use OpenSSL's record layer). The refusals are read by the refused
client: a client without a certificate, one whose CA is of another trust domain, and one whose identity the listener
does not let in. A refusal of the chain is OpenSSL's alert. One by our SPIFFE checks (the SVID rules, the trust
domain, `identities`) is, with `record_layer: own` on TLS 1.3, our own record layer's bad_certificate /
access_denied, sent after the handshake before the close; with `record_layer: openssl` and on TLS 1.2 the SVID rules
and the trust domain are checked inside the handshake, in OpenSSL's certificate verify callback, and the client reads
OpenSSL's bad_certificate; a listener's `identities` are handed to the handshake there too, so a client it does not
let in reads bad_certificate (access_denied on our own records). An originate listener refusing a server by those
checks does so inside the handshake on every path, and the server reads bad_certificate.

What the handshake puts on the wire is read from `openssl s_client`'s report: the signature algorithms our
CertificateRequest offers, and the session tickets it receives; and for a TLS 1.2 listener, that suites without
ECDHE or an AEAD, renegotiation and resumption are all refused.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from tlslite import api as tlslite

from mtlsmesh import pem
from mtlsmesh.config import (
    Action,
    AuthzRule,
    CredentialFiles,
    ExplicitListener,
    ExplicitMode,
    ListenAddr,
    RecordLayer,
)
from mtlsmesh.identity import SpiffeId, TrustDomain
from tests.integration.mesh import ANY_PORT, LOOPBACK, app_server, base_config, read_all, running_sidecar
from tests.pki import Pki, forge_leaf, uri_sans

IO = 20.0  # the whole of one exchange, process start included
PEER_TIMEOUT = 10.0  # every blocking call of a thread peer

# (record layer, version): the listener's record_layer and, for "1.2", min_tls_version "1.2" with a peer held to 1.2.
CASES = [(RecordLayer.OWN, "1.3"), (RecordLayer.OPENSSL, "1.3"), (RecordLayer.OPENSSL, "1.2")]
CASE_IDS = [f"{layer.value}-tls{version}" for layer, version in CASES]
LAYERS = [RecordLayer.OWN, RecordLayer.OPENSSL]

needs_stunnel = pytest.mark.skipif(shutil.which("stunnel4") is None, reason="stunnel4 is not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# --- the app behind a terminate listener, and what the peers send -------------------------------------------------

REQUEST = b"hello through the tunnel\n"
HTTP_BODY = b"served over the terminate listener\n"


async def line_app(stream: trio.SocketStream) -> None:
    """Answer one line with `app got: <line>` (or one HTTP request with `HTTP_BODY`), then close."""
    data = bytearray()
    while b"\n" not in data and (chunk := await stream.receive_some(65536)):
        data += chunk
    if data.startswith(b"GET "):
        while b"\r\n\r\n" not in data and (chunk := await stream.receive_some(65536)):
            data += chunk
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(HTTP_BODY)}\r\nConnection: close\r\n\r\n".encode()
        await stream.send_all(head + HTTP_BODY)
    else:
        await stream.send_all(b"app got: " + bytes(data))
    await stream.send_eof()


def listener(mode: ExplicitMode, forward_to: int, layer: RecordLayer, version: str, **kw: Any) -> ExplicitListener:
    return ExplicitListener(
        f"x-{mode.value}",
        ANY_PORT,
        ListenAddr(LOOPBACK, forward_to),
        mode,
        min_tls_version=version,
        record_layer=layer,
        **kw,
    )


@contextlib.asynccontextmanager
async def terminate_sidecar(
    pki: Pki,
    layer: RecordLayer,
    version: str,
    *,
    identities: tuple[SpiffeId, ...] = (),
    bundle_extra: bytes = b"",
    app_saw: list[str] | None = None,
    authorization: tuple[AuthzRule, ...] = (),
) -> AsyncIterator[int]:
    """A sidecar whose terminate listener (on the port yielded) forwards to `line_app`. Its SVID also names
    `localhost` (curl checks the host name). `app_saw` gets the app's callers when the block ends."""
    files = pki.issue("db", dns_names=["localhost"])
    if bundle_extra:
        with open(files.bundle, "ab") as bundle:
            bundle.write(bundle_extra)
    async with app_server(line_app) as (app_port, seen):
        entry = listener(ExplicitMode.TERMINATE, app_port, layer, version, identities=identities)
        async with running_sidecar(base_config(files, explicit=(entry,), authorization=authorization)) as (_rt, state):
            yield state.bound[entry.name][1]
        if app_saw is not None:
            app_saw.extend(seen)


@contextlib.asynccontextmanager
async def originate_sidecar(
    pki: Pki, server_port: int, layer: RecordLayer, version: str, *, identities: tuple[SpiffeId, ...] = ()
) -> AsyncIterator[int]:
    """A sidecar whose originate listener (on the port yielded) forwards to an mTLS server on `server_port`,
    expecting one of `identities` there (empty: any of the trust domain)."""
    entry = listener(ExplicitMode.ORIGINATE, server_port, layer, version, identities=identities)
    async with running_sidecar(base_config(pki.issue("api"), explicit=(entry,))) as (_rt, state):
        yield state.bound[entry.name][1]


async def plain_exchange(port: int, payload: bytes = REQUEST) -> bytes:
    """What an app gets back for `payload` through a listener on `port` (it half-closes after sending)."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    try:
        await stream.send_all(payload)
        await stream.send_eof()
        return await read_all(stream)
    finally:
        await stream.aclose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


async def wait_listening(port: int, process: trio.Process) -> None:
    """Until something accepts on `port` (the peer process is up); fails if the process ended first."""
    while True:
        assert process.returncode is None, f"the peer exited with status {process.returncode}"
        try:
            stream = await trio.open_tcp_stream(LOOPBACK, port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return


@contextlib.asynccontextmanager
async def peer_process(argv: list[str], *, stdin: bool = False) -> AsyncIterator[trio.Process]:
    """A peer process for the body of the block; ended (by its own PID) when the block ends."""
    # stdin: a pipe left open when the peer must not see its end (s_server stops at it); nothing is read from the
    # peer's output, so it goes nowhere rather than into a pipe that could fill.
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with trio.move_on_after(5):
            await process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()


def version_flag(tool: str, version: str) -> list[str]:
    flags = {
        "openssl": {"1.2": ["-tls1_2"], "1.3": ["-tls1_3"]},
        "curl": {"1.2": ["--tlsv1.2", "--tls-max", "1.2"], "1.3": ["--tlsv1.3"]},
    }
    return flags[tool][version]


def stunnel_conf(directory: Path, files: CredentialFiles, version: str, **service: str | int) -> Path:
    """A stunnel configuration: foreground, no PID file, our credentials, the chain verified, one service."""
    tls_version = "TLSv1.2" if version == "1.2" else "TLSv1.3"
    lines = [
        "foreground = yes",
        "pid =",
        "debug = 4",
        "[svc]",
        f"cert = {files.cert}",
        f"key = {files.key}",
        f"CAfile = {files.bundle}",
        "verifyChain = yes",
        f"sslVersionMin = {tls_version}",
        f"sslVersionMax = {tls_version}",
        *(f"{key} = {value}" for key, value in service.items()),
    ]
    path = directory / f"stunnel-{free_port()}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


async def in_thread(function: Callable[[], Any]) -> Any:
    with trio.fail_after(IO):
        return await trio.to_thread.run_sync(function)


# --- thread peers: Python's ssl and tlslite-ng --------------------------------------------------------------------


def stdlib_context(files: CredentialFiles | None, roots: str, *, server: bool, version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(roots)
    if files is not None:
        ctx.load_cert_chain(files.cert, files.key)
    exact = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = exact
    return ctx


def stdlib_call(port: int, ctx: ssl.SSLContext, *, write_first: bool = True) -> bytes:
    """Connect, send REQUEST (unless told to read first), read to the end of the stream."""
    with socket.create_connection((LOOPBACK, port), timeout=PEER_TIMEOUT) as raw, ctx.wrap_socket(raw) as conn:
        if write_first:
            conn.sendall(REQUEST)
        out = bytearray()
        while data := conn.recv(65536):
            out += data
        return bytes(out)


def tlslite_settings(version: str) -> Any:
    settings = tlslite.HandshakeSettings()
    exact = (3, 3) if version == "1.2" else (3, 4)
    settings.minVersion = settings.maxVersion = exact
    # tlslite-ng 0.8 compresses its Certificate (RFC 8879) even when the server did not ask for it: OpenSSL then
    # rightly refuses the unexpected CompressedCertificate. Off, so the exchange tests what it is meant to.
    settings.certificate_compression_send = []
    return settings


def tlslite_credentials(files: CredentialFiles) -> tuple[Any, Any]:
    chain = tlslite.X509CertChain()
    chain.parsePemList(Path(files.cert).read_text())
    return chain, tlslite.parsePEMKey(Path(files.key).read_text(), private=True)


def tlslite_call(port: int, files: CredentialFiles, version: str) -> tuple[bytes, tuple[int, int]]:
    with socket.create_connection((LOOPBACK, port), timeout=PEER_TIMEOUT) as raw:
        conn = tlslite.TLSConnection(raw)
        chain, key = tlslite_credentials(files)
        conn.handshakeClientCert(chain, key, settings=tlslite_settings(version))
        negotiated = tuple(conn.version)
        conn.write(REQUEST)
        out = bytearray()
        while data := conn.read():
            out += data
        return bytes(out), negotiated


# === terminate: peers we did not write call our listener =========================================================


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_python_ssl_client(pki: Pki, layer: RecordLayer, version: str) -> None:
    client = pki.issue("api")
    async with terminate_sidecar(pki, layer, version) as port:
        ctx = stdlib_context(client, client.bundle, server=False, version=version)
        ctx.set_alpn_protocols(["h2", "http/1.1"])  # an ALPN that is not ours: served all the same
        assert await in_thread(lambda: stdlib_call(port, ctx)) == b"app got: " + REQUEST


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_tlslite_ng_client(pki: Pki, layer: RecordLayer, version: str) -> None:
    client = pki.issue("api")
    async with terminate_sidecar(pki, layer, version) as port:
        data, negotiated = await in_thread(lambda: tlslite_call(port, client, version))
    assert data == b"app got: " + REQUEST
    assert negotiated == ((3, 3) if version == "1.2" else (3, 4))


@needs_curl
@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_curl_client(pki: Pki, layer: RecordLayer, version: str) -> None:
    client = pki.issue("api")
    async with terminate_sidecar(pki, layer, version) as port:
        argv = ["curl", "-sS", "--max-time", "10", "--cert", client.cert, "--key", client.key, "--cacert"]
        argv += [client.bundle, "--resolve", f"localhost:{port}:{LOOPBACK}", *version_flag("curl", version)]
        argv += ["-w", "\n%{http_version} %{response_code}", f"https://localhost:{port}/"]
        with trio.fail_after(IO):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout == HTTP_BODY + b"\n1.1 200"  # curl offered h2 and http/1.1; no ALPN: HTTP/1.1


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_openssl_s_client(pki: Pki, layer: RecordLayer, version: str) -> None:
    client = pki.issue("api")
    async with terminate_sidecar(pki, layer, version) as port:
        argv = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-cert", client.cert, "-key", client.key]
        argv += ["-CAfile", client.bundle, "-verify_return_error", "-quiet", *version_flag("openssl", version)]
        with trio.fail_after(IO):
            # -quiet keeps it reading after its stdin ends; the app's close (our close_notify) ends it.
            done = await trio.run_process(argv, stdin=REQUEST, capture_stdout=True, capture_stderr=True, check=False)
    assert done.stdout == b"app got: " + REQUEST, done.stderr.decode(errors="replace")


@needs_stunnel
@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_stunnel_client(pki: Pki, tmp_path: Path, layer: RecordLayer, version: str) -> None:
    async with terminate_sidecar(pki, layer, version) as port:
        accept = free_port()
        conf = stunnel_conf(
            tmp_path,
            pki.issue("api"),
            version,
            client="yes",
            accept=f"{LOOPBACK}:{accept}",
            connect=f"{LOOPBACK}:{port}",
        )
        async with peer_process(["stunnel4", str(conf)]) as process:
            with trio.fail_after(IO):
                await wait_listening(accept, process)
                assert await plain_exchange(accept) == b"app got: " + REQUEST


# --- what our server's handshake puts on the wire, read by s_client ---------------------------------------------


async def s_client_report(pki: Pki, layer: RecordLayer, version: str) -> str:
    """s_client's full report of one exchange (its -msg trace and session summary)."""
    client = pki.issue("api")
    async with terminate_sidecar(pki, layer, version) as port:
        argv = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-cert", client.cert, "-key", client.key]
        argv += ["-CAfile", client.bundle, "-verify_return_error", "-msg", "-ign_eof"]
        argv += version_flag("openssl", version)
        with trio.fail_after(IO):
            done = await trio.run_process(argv, stdin=REQUEST, capture_stdout=True, capture_stderr=True, check=False)
    report = done.stdout.decode(errors="replace")
    assert "app got: " + REQUEST.decode() in report, done.stderr.decode(errors="replace")
    return report


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_the_certificate_request_offers_only_what_our_svids_carry(
    pki: Pki, layer: RecordLayer, version: str
) -> None:
    report = await s_client_report(pki, layer, version)
    requested = [line for line in report.splitlines() if line.startswith("Requested Signature Algorithms:")]
    assert len(requested) == 1, report
    offered = requested[0].partition(":")[2].strip().split(":")
    # handshake.SIGALGS in OpenSSL 3.0's names; nothing else (OpenSSL's default list also has SHA-1, SHA-224,
    # brainpool, DSA and, in newer builds, ML-DSA and SM2).
    assert offered == [
        "ECDSA+SHA256", "ECDSA+SHA384", "ed25519", "RSA-PSS+SHA256", "RSA-PSS+SHA384", "RSA+SHA256", "RSA+SHA384"
    ]  # fmt: skip


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_no_session_ticket_reaches_the_client(pki: Pki, layer: RecordLayer, version: str) -> None:
    report = await s_client_report(pki, layer, version)
    tickets = report.count("NewSessionTicket")
    if layer is RecordLayer.OPENSSL and version == "1.3":
        # OpenSSL's record layer sends the two TLS 1.3 tickets it wrote (their number cannot be set to 0 through
        # pyOpenSSL or cryptography's binding); they name nothing any cache holds (session cache off).
        assert tickets == 2, report
    else:
        assert tickets == 0, report


# --- refusals: the refused client reads why ---------------------------------------------------------------------


def refused_call(port: int, ctx: ssl.SSLContext) -> str:
    """The client's handshake, then a read before any write: what the refused client reads (an alert's name)."""
    try:
        data = stdlib_call(port, ctx, write_first=False)
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except OSError as exc:
        return f"os error: {exc}"
    return "served" if data else "end of stream, no alert"


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_a_client_the_policy_denies_reads_access_denied(pki: Pki, layer: RecordLayer, version: str) -> None:
    """An authorization rule refuses the caller after its handshake: it reads access_denied on both record paths
    and both versions (on OpenSSL's records the sidecar seals that alert itself), and never reaches the app."""
    client = pki.issue("api")
    deny = (AuthzRule(Action.DENY, (str(pki.id_of("api")),)),)
    saw: list[str] = []
    async with terminate_sidecar(pki, layer, version, authorization=deny, app_saw=saw) as port:
        ctx = stdlib_context(client, client.bundle, server=False, version=version)
        told = await in_thread(lambda: refused_call(port, ctx))
    assert told == "TLSV1_ALERT_ACCESS_DENIED"
    assert saw == []


@pytest.mark.parametrize(
    "suite", ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
)
async def test_a_tls12_client_the_policy_denies_reads_access_denied_whatever_the_suite(pki: Pki, suite: str) -> None:
    """Over TLS 1.2 the sidecar seals the alert under keys it derives itself (RFC 5246's PRF from the master
    secret): each AEAD suite a TLS 1.2 listener allows, as the client reads it."""
    client = pki.issue("api")
    deny = (AuthzRule(Action.DENY, (str(pki.id_of("api")),)),)
    async with terminate_sidecar(pki, RecordLayer.OPENSSL, "1.2", authorization=deny) as port:
        ctx = stdlib_context(client, client.bundle, server=False, version="1.2")
        ctx.set_ciphers(suite)
        told = await in_thread(lambda: refused_call(port, ctx))
    assert told == "TLSV1_ALERT_ACCESS_DENIED"


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_a_client_without_a_certificate_reads_why(pki: Pki, layer: RecordLayer, version: str) -> None:
    roots = pki.issue("api").bundle
    async with terminate_sidecar(pki, layer, version) as port:
        ctx = stdlib_context(None, roots, server=False, version=version)
        told = await in_thread(lambda: refused_call(port, ctx))
    # TLS 1.3 has an alert for it (RFC 8446 §4.4.2.4); TLS 1.2 says handshake_failure (RFC 5246 §7.4.6).
    assert told == ("SSLV3_ALERT_HANDSHAKE_FAILURE" if version == "1.2" else "TLSV13_ALERT_CERTIFICATE_REQUIRED")


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_a_client_from_another_trust_domain_reads_unknown_ca(
    pki: Pki, tmp_path: Path, layer: RecordLayer, version: str
) -> None:
    other = Pki(tmp_path / "other", trust_domain=TrustDomain("other.example"))
    intruder = other.issue("api")
    roots = pki.issue("api").bundle  # it trusts us; we do not trust its CA
    async with terminate_sidecar(pki, layer, version) as port:
        ctx = stdlib_context(intruder, roots, server=False, version=version)
        told = await in_thread(lambda: refused_call(port, ctx))
    assert told == "TLSV1_ALERT_UNKNOWN_CA"


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_a_trusted_client_of_another_trust_domain_reads_bad_certificate(
    pki: Pki, tmp_path: Path, layer: RecordLayer, version: str
) -> None:
    other = Pki(tmp_path / "other", trust_domain=TrustDomain("other.example"))
    intruder = other.issue("api")
    roots = pki.issue("api").bundle
    # The listener trusts the other domain's root too (as a federated bundle would): the chain verifies, and the
    # SPIFFE check refuses the trust domain (after the handshake on our records, inside it on OpenSSL's).
    async with terminate_sidecar(pki, layer, version, bundle_extra=Path(intruder.bundle).read_bytes()) as port:
        ctx = stdlib_context(intruder, roots, server=False, version=version)
        told = await in_thread(lambda: refused_call(port, ctx))
    assert told == "SSLV3_ALERT_BAD_CERTIFICATE"


# The listener's `identities`: our records refuse after the handshake with access_denied; with OpenSSL's record
# layer (and TLS 1.2) the handler hands them to the handshake as `expected`, whose verify callback refuses.
IDENTITY_CASES = [pytest.param(layer, version, id=f"{layer.value}-tls{version}") for layer, version in CASES]


@pytest.mark.parametrize(("layer", "version"), IDENTITY_CASES)
async def test_a_client_whose_identity_is_not_allowed_reads_why(pki: Pki, layer: RecordLayer, version: str) -> None:
    client = pki.issue("api")
    async with terminate_sidecar(pki, layer, version, identities=(pki.id_of("someone-else"),)) as port:
        ctx = stdlib_context(client, client.bundle, server=False, version=version)
        told = await in_thread(lambda: refused_call(port, ctx))
    # Our records say access_denied after the handshake. Inside OpenSSL's handshake the verify callback can only
    # reject the certificate: OpenSSL's alert for that is bad_certificate (as for an originate listener's refusal).
    own = layer is RecordLayer.OWN and version == "1.3"
    assert told == ("TLSV1_ALERT_ACCESS_DENIED" if own else "SSLV3_ALERT_BAD_CERTIFICATE")


@pytest.mark.parametrize("layer", LAYERS, ids=[layer.value for layer in LAYERS])
@pytest.mark.usefixtures("mesh_logs")
async def test_the_svid_rules_hold_for_any_client(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, layer: RecordLayer
) -> None:
    """A certificate our CA signed that is not a valid SVID (two URI SANs) is refused on a terminate listener too,
    whatever ALPN the client offers: nothing reaches the app, and the log line names the rule."""
    leaf, key = forge_leaf(pki.authority, now=pki.now, san=uri_sans(str(pki.id_of("a")), str(pki.id_of("b"))))
    cert, key_file = tmp_path / "two-uris.pem", tmp_path / "two-uris.key"
    cert.write_bytes(pem.render_certificates([leaf]))
    key_file.write_bytes(pem.render_private_key(key))
    roots = pki.issue("api").bundle
    ctx = stdlib_context(CredentialFiles(str(cert), str(key_file), roots), roots, server=False, version="1.3")
    ctx.set_alpn_protocols(["http/1.1"])
    saw: list[str] = []
    async with terminate_sidecar(pki, layer, "1.3", app_saw=saw) as port:
        told = await in_thread(lambda: refused_call(port, ctx))
    assert told != "served" and saw == []
    lines = [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.conn"]
    assert any("reason=handshake_failed" in line and "2 URI SANs" in line for line in lines), lines


async def test_a_malformed_client_hello_gets_an_alert_not_a_reset(pki: Pki) -> None:
    """No sniffer on a terminate listener: OpenSSL reads the first bytes and answers garbage with its alert."""
    async with terminate_sidecar(pki, RecordLayer.OWN, "1.3") as port:
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        try:
            # A handshake record whose ClientHello is cut short inside its own length fields.
            await stream.send_all(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00")
            with trio.fail_after(IO):
                got = bytearray()
                with contextlib.suppress(trio.BrokenResourceError):
                    while len(got) < 7 and (data := await stream.receive_some(64)):
                        got += data
        finally:
            await stream.aclose()
    assert got[:1] == b"\x15", bytes(got)  # an alert record
    assert got[5:6] == b"\x02"  # fatal
    assert got[6] in (10, 50, 70)  # unexpected_message, decode_error or protocol_version


# === originate: our listener calls servers we did not write =======================================================


async def echo_app(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_openssl_s_server(pki: Pki, layer: RecordLayer, version: str) -> None:
    server = pki.issue("db")
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}", "-cert", server.cert, "-key", server.key]
    argv += ["-CAfile", server.bundle, "-Verify", "2", "-verify_return_error", "-rev"]
    argv += version_flag("openssl", version)
    async with peer_process(argv, stdin=True) as process:
        with trio.fail_after(IO):
            await wait_listening(port, process)  # (s_server -rev takes that probe and goes on to the next)
            async with originate_sidecar(pki, port, layer, version) as listen:
                reply = await plain_exchange(listen, b"hello\n")
    # -rev answers each line reversed (and ends the connection when told nothing more).
    assert b"olleh" in reply, reply


@needs_stunnel
@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_stunnel_server(pki: Pki, tmp_path: Path, layer: RecordLayer, version: str) -> None:
    async with app_server(echo_app) as (app_port, _):
        accept = free_port()
        conf = stunnel_conf(
            tmp_path, pki.issue("db"), version, accept=f"{LOOPBACK}:{accept}", connect=f"{LOOPBACK}:{app_port}"
        )
        async with peer_process(["stunnel4", str(conf)]) as process:
            with trio.fail_after(IO):
                await wait_listening(accept, process)
                async with originate_sidecar(pki, accept, layer, version) as listen:
                    assert await plain_exchange(listen) == REQUEST


def serve_once(listening: socket.socket, handle: Callable[[socket.socket], None]) -> threading.Thread:
    def run() -> None:
        listening.settimeout(PEER_TIMEOUT)
        with contextlib.suppress(OSError):
            conn, _ = listening.accept()
            conn.settimeout(PEER_TIMEOUT)
            with conn:
                handle(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_python_ssl_server(pki: Pki, layer: RecordLayer, version: str) -> None:
    server = pki.issue("db")
    ctx = stdlib_context(server, server.bundle, server=True, version=version)
    seen: list[str] = []

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            seen.append(str(conn.getpeercert()["subjectAltName"]))
            data = bytearray()
            while data := data + conn.recv(65536):
                if data.endswith(b"\n"):
                    break
            conn.sendall(b"python got: " + bytes(data))
            conn.unwrap()

    with socket.create_server((LOOPBACK, 0)) as listening:
        thread = serve_once(listening, handle)
        async with originate_sidecar(pki, listening.getsockname()[1], layer, version) as listen:
            with trio.fail_after(IO):
                assert await plain_exchange(listen) == b"python got: " + REQUEST
        await in_thread(lambda: thread.join(PEER_TIMEOUT))
    assert seen == [str((("URI", str(pki.id_of("api"))),))]


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_tlslite_ng_server(pki: Pki, layer: RecordLayer, version: str) -> None:
    server = pki.issue("db")
    chain, key = tlslite_credentials(server)
    clients: list[int] = []

    def handle(raw: socket.socket) -> None:
        conn = tlslite.TLSConnection(raw)
        # tlslite-ng 0.8 needs an ALPN list once a client offers ALPN, and refuses TLS 1.2 without an overlap
        # (no_application_protocol): it answers ours. (s_server, stunnel and Python's ssl answer none.)
        settings, alpn = tlslite_settings(version), [bytearray(b"mtlsmesh")]
        conn.handshakeServer(certChain=chain, privateKey=key, reqCert=True, settings=settings, alpn=alpn)
        clients.append(len(conn.session.clientCertChain.x509List))
        data = bytearray()
        while not data.endswith(b"\n") and (chunk := conn.read()):
            data += chunk
        conn.write(b"tlslite got: " + bytes(data))
        while conn.read():  # to our close_notify: closing with it unread would reset the connection
            pass
        conn.close()

    with socket.create_server((LOOPBACK, 0)) as listening:
        thread = serve_once(listening, handle)
        async with originate_sidecar(pki, listening.getsockname()[1], layer, version) as listen:
            with trio.fail_after(IO):
                assert await plain_exchange(listen) == b"tlslite got: " + REQUEST
        await in_thread(lambda: thread.join(PEER_TIMEOUT))
    assert clients == [1]  # our leaf (the root-signed test CA has no intermediate)


async def test_an_originate_listener_refuses_a_server_of_another_trust_domain(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other", trust_domain=TrustDomain("other.example"))
    server = other.issue("db")
    ctx = stdlib_context(server, pki.issue("api").bundle, server=True, version="1.3")

    def handle(raw: socket.socket) -> None:
        with contextlib.suppress(OSError), ctx.wrap_socket(raw, server_side=True) as conn:
            conn.recv(1)

    with socket.create_server((LOOPBACK, 0)) as listening:
        thread = serve_once(listening, handle)
        async with originate_sidecar(pki, listening.getsockname()[1], RecordLayer.OWN, "1.3") as listen:
            with trio.fail_after(IO):
                stream = await trio.open_tcp_stream(LOOPBACK, listen)
                with pytest.raises(trio.BrokenResourceError):
                    await stream.send_all(REQUEST)
                    await read_all(stream)
                await stream.aclose()
        await in_thread(lambda: thread.join(PEER_TIMEOUT))


def refusing_server(ctx: ssl.SSLContext, told: list[str]) -> Callable[[socket.socket], None]:
    """A Python `ssl` server's handshake with a client that refuses it: `told` gets what the server read."""

    def handle(raw: socket.socket) -> None:
        try:
            with ctx.wrap_socket(raw, server_side=True) as conn:
                told.append("served" if conn.recv(1) else "end of stream, no alert")
        except ssl.SSLError as exc:
            told.append(exc.reason or str(exc))
        except OSError as exc:
            told.append(f"os error: {exc}")

    return handle


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_a_server_that_is_not_the_expected_identity_reads_bad_certificate(
    pki: Pki, layer: RecordLayer, version: str
) -> None:
    """Our originate client refuses a server whose SPIFFE ID is not one it expects inside the handshake, before its
    Finished: the server (Python's ssl, the system's OpenSSL) reads bad_certificate, and nothing is sent to it."""
    server = pki.issue("db")
    ctx = stdlib_context(server, server.bundle, server=True, version=version)
    told: list[str] = []
    with socket.create_server((LOOPBACK, 0)) as listening:
        thread = serve_once(listening, refusing_server(ctx, told))
        expected = (pki.id_of("someone-else"),)
        async with originate_sidecar(pki, listening.getsockname()[1], layer, version, identities=expected) as listen:
            with trio.fail_after(IO):
                stream = await trio.open_tcp_stream(LOOPBACK, listen)
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(REQUEST)
                    assert await read_all(stream) == b""
                await stream.aclose()
            await in_thread(lambda: thread.join(PEER_TIMEOUT))
    assert told == ["SSLV3_ALERT_BAD_CERTIFICATE"]


@pytest.mark.parametrize(("layer", "version"), CASES, ids=CASE_IDS)
async def test_openssl_s_server_reads_why_our_client_refused_it(
    pki: Pki, tmp_path: Path, layer: RecordLayer, version: str
) -> None:
    """The same refusal, read by `openssl s_server -msg`: the alert record our client sent, bad_certificate."""
    server = pki.issue("db")
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}", "-cert", server.cert, "-key", server.key]
    # Two connections, then it exits (and flushes its report): wait_listening's probe, and our client's.
    argv += ["-CAfile", server.bundle, "-Verify", "2", "-msg", "-naccept", "2", *version_flag("openssl", version)]
    report = tmp_path / "s_server.out"
    # -msg prints each message s_server reads or writes: "<<< TLS 1.3, Alert [length 0002], fatal bad_certificate".
    wanted = re.compile(r"<<< .*Alert \[length 0002\], fatal bad_certificate")
    with report.open("wb") as out:
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        try:
            with trio.fail_after(IO):
                await wait_listening(port, process)
                expected = (pki.id_of("someone-else"),)
                async with originate_sidecar(pki, port, layer, version, identities=expected) as listen:
                    stream = await trio.open_tcp_stream(LOOPBACK, listen)
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(REQUEST)
                        assert await read_all(stream) == b""
                    await stream.aclose()
                await process.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with trio.move_on_after(5):
                await process.wait()
            if process.stdin is not None:
                await process.stdin.aclose()
    text = report.read_text(errors="replace")
    assert wanted.search(text), text


# --- a TLS 1.2 listener: ECDHE with AEAD only, no renegotiation, no resumption ------------------------------------


async def s_client_tls12(pki: Pki, port: int, *args: str, stdin: bytes = REQUEST) -> tuple[str, str]:
    client = pki.issue("api")
    argv = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-cert", client.cert, "-key", client.key]
    argv += ["-CAfile", client.bundle, "-verify_return_error", "-tls1_2", *args]
    with trio.fail_after(IO):
        done = await trio.run_process(argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    return done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256"])
async def test_a_tls12_listener_refuses_suites_without_ecdhe_and_an_aead(pki: Pki, cipher: str) -> None:
    async with terminate_sidecar(pki, RecordLayer.OPENSSL, "1.2") as port:
        out, err = await s_client_tls12(pki, port, "-cipher", cipher, "-quiet")
    assert "app got" not in out
    assert "alert handshake failure" in err, err


async def test_a_tls12_listener_does_not_resume_a_session(pki: Pki, tmp_path: Path) -> None:
    """No ticket and no session ID (session cache off): the client has nothing to resume with, and s_client
    writes no session file."""
    saved = tmp_path / "session.pem"
    async with terminate_sidecar(pki, RecordLayer.OPENSSL, "1.2") as port:
        first, _ = await s_client_tls12(pki, port, "-sess_out", str(saved), "-ign_eof")
    assert "New, TLSv1.2" in first and "app got: " + REQUEST.decode() in first, first
    session = [line.strip() for line in first.splitlines() if line.strip().startswith("Session-ID:")]
    assert session == ["Session-ID:"], first  # empty
    assert "TLS session ticket" not in first
    assert not saved.exists()


async def test_the_tickets_of_openssls_tls13_records_resume_nothing(pki: Pki) -> None:
    """With `record_layer: openssl` OpenSSL sends its two TLS 1.3 tickets (no binding sets their number to 0, and
    neither OP_NO_TICKET nor the session cache off stops them); a client that offers one back gets a full handshake,
    its certificate checked again, and is served."""
    client = pki.issue("api")
    ctx = stdlib_context(client, client.bundle, server=False, version="1.3")
    seen: list[tuple[bool, bool]] = []  # per connection: (resumed, the session holds a ticket)
    saved: list[ssl.SSLSession] = []

    def call() -> bytes:
        offered = saved[-1] if saved else None
        raw = socket.create_connection((LOOPBACK, port), timeout=PEER_TIMEOUT)
        with raw, ctx.wrap_socket(raw, session=offered) as conn:
            conn.sendall(REQUEST)
            out = bytearray()
            while data := conn.recv(65536):
                out += data
            session = conn.session
            assert session is not None
            saved.append(session)
            seen.append((conn.session_reused, session.has_ticket))
            return bytes(out)

    async with terminate_sidecar(pki, RecordLayer.OPENSSL, "1.3") as port:
        assert await in_thread(call) == b"app got: " + REQUEST
        assert await in_thread(call) == b"app got: " + REQUEST
    assert seen == [(False, True), (False, True)]  # a ticket came each time; the second offered it, in vain


async def test_a_tls12_listener_refuses_renegotiation(pki: Pki) -> None:
    # s_client renegotiates when it reads a line "R" (apps/s_client.c); our listener refuses it with OpenSSL's
    # no_renegotiation alert, which ends the client's handshake attempt.
    async with terminate_sidecar(pki, RecordLayer.OPENSSL, "1.2") as port:
        out, err = await s_client_tls12(pki, port, "-no_ign_eof", stdin=b"R\n")
    assert "RENEGOTIATING" in out + err
    assert "no renegotiation" in out + err, out + err


@pytest.mark.parametrize("client_version", ["1.3", "1.2"])
async def test_a_tls12_listener_still_prefers_tls13(pki: Pki, client_version: str) -> None:
    """min_tls_version is a floor: a TLS 1.3 client gets TLS 1.3 there (over OpenSSL's record layer)."""
    client = pki.issue("api")
    ctx = stdlib_context(client, client.bundle, server=False, version=client_version)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    versions: list[str | None] = []

    def call() -> bytes:
        with socket.create_connection((LOOPBACK, port), timeout=PEER_TIMEOUT) as raw, ctx.wrap_socket(raw) as conn:
            versions.append(conn.version())
            conn.sendall(REQUEST)
            out = bytearray()
            while data := conn.recv(65536):
                out += data
            return bytes(out)

    async with terminate_sidecar(pki, RecordLayer.OPENSSL, "1.2") as port:
        assert await in_thread(call) == b"app got: " + REQUEST
    assert versions == [f"TLSv{client_version}"]
