"""The sidecar at its edges: outbound routing decisions, limits, abandoned handshakes, the HTTP endpoints,
credential reloads under traffic, and explicit (non-transparent) listeners."""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import os
import shutil
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from mtlsmesh import admin, credentials, netio, pem, sidecar
from mtlsmesh.config import (
    Destination,
    ExplicitListener,
    ExplicitMode,
    InboundConfig,
    ListenAddr,
    Mode,
    OutboundConfig,
    OutboundPolicy,
)
from mtlsmesh.credentials import CredentialStore, load_credentials
from mtlsmesh.errors import CertificateError
from mtlsmesh.outcome import Decision, Reason
from tests.integration.mesh import (
    ADMIN_TOKEN,
    ANY_PORT,
    LOOPBACK,
    app_server,
    base_config,
    client_hello,
    conn_lines,
    connect,
    echo,
    exchange,
    fixed_dst,
    mesh_pair,
    outcome,
    read_all,
    running_sidecar,
)
from tests.pki import MALFORMED_SAN, TD, Pki, files_in, forge_leaf

pytestmark = pytest.mark.usefixtures("mesh_logs")

IO = 15.0


# --- outbound decisions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expect"),
    [(OutboundPolicy.ALLOW_ANY, "passthrough"), (OutboundPolicy.REGISTRY_ONLY, "refuse")],
)
async def test_outbound_outside_the_mesh(
    pki: Pki, caplog: pytest.LogCaptureFixture, policy: OutboundPolicy, expect: str
) -> None:
    async with app_server(echo) as (app_port, seen):
        outbound = OutboundConfig(enabled=True, listen=ANY_PORT, policy=policy, destinations=())
        cfg = base_config(pki.issue("productpage"), outbound=outbound)
        with trio.fail_after(IO):
            async with running_sidecar(cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (_rt, state):
                client = await connect(state.bound["outbound"][1])
                try:
                    await client.send_all(b"plain")
                    await client.send_eof()
                except trio.BrokenResourceError:  # the reset came first and the send saw it (once)
                    kind, data = "reset", b""
                else:
                    kind, data = await outcome(client)
    (line,) = conn_lines(caplog.records, "outbound")
    assert f"decision={expect}" in line
    if expect == "passthrough":
        assert (kind, data) == ("eof", b"plain")
        assert seen == ["127.0.0.1"]  # outbound passthrough keeps the kernel's source
    else:
        assert (kind, data) == ("reset", b"")
        assert " reason=registry_only detail=" in line and seen == []


async def test_outbound_refuses_a_loop_into_itself(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    destinations = (Destination((), frozenset(), ()),)  # everything is "in the mesh"
    cfg = base_config(pki.issue("a"), outbound=OutboundConfig(enabled=True, listen=ANY_PORT, destinations=destinations))
    own_port: list[int] = []

    def orig_dst(stream: trio.SocketStream) -> tuple[ipaddress.IPv4Address, int]:
        return ipaddress.IPv4Address(LOOPBACK), own_port[0]  # as if the app had dialed 15001 itself

    with trio.fail_after(IO):
        async with running_sidecar(cfg, orig_dst=orig_dst) as (_rt, state):
            own_port.append(state.bound["outbound"][1])
            client = await connect(own_port[0])
            kind, _ = await outcome(client)
    assert kind == "reset"
    (line,) = conn_lines(caplog.records, "outbound")
    assert line.endswith(' reason=loop detail="the original destination is this listener"')
    assert "decision=refuse" in line


@pytest.mark.parametrize("mode", ["permissive", "strict"])
async def test_inbound_refuses_a_loop_into_itself(pki: Pki, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    # A client dialing pod-IP:15006 itself: the original destination is the inbound listener. Passed through, the
    # dial from 127.0.0.6 would land on the listener again, once per connection, until max_connections.
    inbound_cfg = InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5, mode=Mode(mode))
    cfg = base_config(pki.issue("a"), inbound=inbound_cfg, max_connections=20)
    own_port: list[int] = []

    def orig_dst(stream: trio.SocketStream) -> tuple[ipaddress.IPv4Address, int]:
        return ipaddress.IPv4Address(LOOPBACK), own_port[0]

    with trio.fail_after(IO):
        async with running_sidecar(cfg, orig_dst=orig_dst) as (_rt, state):
            own_port.append(state.bound["inbound"][1])
            client = await connect(own_port[0])
            try:
                await client.send_all(b"x")  # one plaintext byte
            except trio.BrokenResourceError:  # the reset came first
                kind = "reset"
            else:
                kind, _ = await outcome(client)
            await trio.sleep(0.3)  # room for a loop to show up in the log, were there one
    assert kind == "reset"
    (line,) = conn_lines(caplog.records, "inbound")
    assert line.endswith(' reason=loop detail="the original destination is this listener"')
    assert "decision=refuse" in line


async def test_inbound_refuses_a_connection_from_the_app_source(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    # Under capture only the sidecar's own dial to the app comes from 127.0.0.6; one reaching the inbound listener
    # has come back around (app_source 127.0.0.1 under the standard rules, or a pod-IP:15006 dial): refuse it.
    async with app_server(echo) as (app_port, seen):
        inbound_cfg = InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5, mode=Mode.PERMISSIVE)
        cfg = base_config(pki.issue("a"), inbound=inbound_cfg)
        with trio.fail_after(IO):
            async with running_sidecar(cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (_rt, state):
                port = state.bound["inbound"][1]
                source = ipaddress.IPv4Address("127.0.0.6")
                try:
                    looped = await netio.dial(LOOPBACK, port, timeout=IO, source=source)
                except ConnectionResetError:  # the sidecar accepted and reset it before the dial looked
                    kind = "reset"
                else:
                    try:
                        await looped.send_all(b"x")
                    except trio.BrokenResourceError:  # the reset came first
                        kind = "reset"
                    else:
                        kind, _ = await outcome(looped)
                assert await exchange(port, b"plain") == b"plain"  # any other source still passes (PERMISSIVE)
    assert kind == "reset"
    first, second = conn_lines(caplog.records, "inbound")
    assert first.endswith(' reason=loop detail="connection from the app source address"')
    assert "client=127.0.0.6:" in first and "decision=refuse" in first
    assert "decision=passthrough" in second
    assert seen == ["127.0.0.6"]  # only the legitimate connection reached the app


async def test_no_original_destination_is_refused_with_a_reason(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    # The real lookup on a connection no NAT rule touched: the kernel has no original destination to give.
    cfg = base_config(pki.issue("a"), outbound=OutboundConfig(enabled=True, listen=ANY_PORT))
    with trio.fail_after(IO):
        async with running_sidecar(cfg) as (_rt, state):
            client = await connect(state.bound["outbound"][1])
            kind, _ = await outcome(client)
    assert kind == "reset"
    (line,) = conn_lines(caplog.records, "outbound")
    # Without conntrack: no_orig_dst; with it, the "original" destination is the listener itself: a loop.
    assert " reason=no_orig_dst detail=" in line or " reason=loop detail=" in line
    assert "decision=refuse" in line


# --- limits and abuse ------------------------------------------------------------------------------------------


async def test_max_connections_refuses_the_one_too_many(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with app_server(echo) as (app_port, _):
        with trio.fail_after(IO):
            async with mesh_pair(pki, app_port, client_changes={"max_connections": 1}) as mesh:
                first = await connect(mesh.port)
                await first.send_all(b"one")
                assert await first.receive_some(10) == b"one"  # established and relaying
                try:
                    second = await connect(mesh.port)
                except OSError:  # the RST can beat trio's check that connect() finished
                    kind = "reset"
                else:
                    kind, _ = await outcome(second)
                assert kind == "reset"
                await first.send_eof()
                assert await read_all(first) == b""
                await first.aclose()
                while mesh.client_rt.tracker.active:
                    await trio.sleep(0.01)
                assert await exchange(mesh.port, b"after") == b"after"
    lines = conn_lines(caplog.records, "outbound")
    assert sum(line.endswith(' reason=limit detail="max_connections reached"') for line in lines) == 1
    assert mesh.client_rt.stats.connections[("outbound", Decision.REFUSE, Reason.LIMIT)] == 1


ABANDONED = 1000  # connections opened and dropped mid-handshake


async def test_many_connections_abandoned_mid_handshake(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    hello = client_hello()
    async with app_server(echo) as (app_port, seen):
        with trio.fail_after(120):
            async with mesh_pair(pki, app_port) as mesh:
                limiter = trio.CapacityLimiter(100)
                started = trio.current_time()

                async def abandon(index: int) -> None:
                    async with limiter:
                        stream = await connect(mesh.inbound_port)
                        await stream.send_all(hello[: len(hello) if index % 2 else len(hello) // 2])
                        if index % 3 == 0 and index % 2:
                            await stream.receive_some(65536)  # the server's first flight: truly mid-handshake
                        await netio.abort_close(stream) if index % 2 else await stream.aclose()

                async with trio.open_nursery() as nursery:
                    for index in range(ABANDONED):
                        nursery.start_soon(abandon, index)
                assert await exchange(mesh.port, b"still serving") == b"still serving"
                with trio.fail_after(30):
                    while mesh.server_rt.tracker.active:
                        await trio.sleep(0.05)
                elapsed = trio.current_time() - started
    # Half a ClientHello then EOF: refused before any decision. A whole one: carried as mTLS, and the handshake
    # fails (or, when the RST overtakes the bytes, the caller reset while being sniffed). Either way, not closed.
    lines = conn_lines(caplog.records, "inbound")
    refused = [line for line in lines if not line.endswith(" reason=closed")]
    assert len(refused) == ABANDONED and len(lines) == ABANDONED + 1
    before_decision = (" reason=closed_during_sniff ", " reason=reset_by_peer ")
    for line in refused:
        if "decision=refuse" in line:
            assert any(reason in line for reason in before_decision), line
        else:
            assert "decision=mtls" in line and " reason=handshake_failed " in line, line
    counts = mesh.server_rt.stats.connections
    assert counts[("inbound", Decision.REFUSE, Reason.CLOSED_DURING_SNIFF)] == ABANDONED // 2
    failed = counts[("inbound", Decision.MTLS, Reason.HANDSHAKE_FAILED)]
    assert failed > 0 and failed + counts[("inbound", Decision.REFUSE, Reason.RESET_BY_PEER)] == ABANDONED // 2
    assert seen == ["127.0.0.6"]
    print(f"{ABANDONED} abandoned handshakes handled in {elapsed:.1f} s")


# --- HTTP endpoints ---------------------------------------------------------------------------------------------


async def http(port: int, request: bytes) -> tuple[int, bytes]:
    stream = await connect(port)
    await stream.send_all(request)
    response = await read_all(stream)
    await stream.aclose()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


AUTH = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()


@pytest.mark.parametrize(
    ("endpoint", "request_bytes", "status", "body_part"),
    [
        ("health", b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n", 200, b"ready"),
        ("health", b"GET /stats/prometheus HTTP/1.1\r\n\r\n", 404, b"not found"),
        ("health", b"\x16\x03\x01garbage\r\n\r\n", 400, b"bad request"),
        ("health", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431, b"too large"),
        ("metrics", b"GET /stats/prometheus HTTP/1.1\r\n\r\n", 200, b"mtlsmesh_connections_total"),
        ("admin", b"GET /certs HTTP/1.1\r\n\r\n", 200, b"spiffe://cluster.local/ns/default/sa/a"),
        ("admin", b"GET /config_dump HTTP/1.1\r\n\r\n", 200, b'"trust_domain": "cluster.local"'),
        ("admin", b"POST /logging?level=loud HTTP/1.1\r\n" + AUTH + b"\r\n", 400, b"level must be"),
        ("admin", b"POST /logging?level=info HTTP/1.1\r\n\r\n", 401, b"needs Authorization"),
    ],
)
async def test_http_endpoints(pki: Pki, endpoint: str, request_bytes: bytes, status: int, body_part: bytes) -> None:
    cfg = base_config(pki.issue("a"))
    with trio.fail_after(IO):
        async with running_sidecar(cfg) as (_rt, state):
            got_status, body = await http(state.bound[endpoint][1], request_bytes)
    assert got_status == status
    assert body_part in body
    assert b"PRIVATE KEY" not in body


async def test_http_stalled_client_gets_a_timeout_and_others_are_answered(pki: Pki) -> None:
    cfg = base_config(pki.issue("a"))
    with trio.fail_after(IO):
        async with running_sidecar(cfg) as (_rt, state):
            port = state.bound["health"][1]
            stalled = await connect(port)
            await stalled.send_all(b"GET /healthz/ready HTT")
            assert (await http(port, b"GET /healthz/ready HTTP/1.0\r\n\r\n"))[0] == 200
            with trio.fail_after(admin.READ_TIMEOUT + 2):
                response = await read_all(stalled)
            assert response.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize(("endpoint", "idle_count"), [("health", admin.MAX_CLIENTS), ("health", 3 * admin.MAX_CLIENTS),
                                                      ("metrics", 2 * admin.MAX_CLIENTS)])  # fmt: skip
async def test_idle_connections_do_not_lock_out_a_probe(pki: Pki, endpoint: str, idle_count: int) -> None:
    # The health port is open to every pod: connections that never send a request must not keep the kubelet out.
    path = b"/healthz/ready" if endpoint == "health" else b"/stats/prometheus"
    with trio.fail_after(IO):
        async with running_sidecar(base_config(pki.issue("a"))) as (_rt, state):
            port = state.bound[endpoint][1]
            idle = [await connect(port) for _ in range(idle_count)]
            try:
                await trio.sleep(0.2)  # all accepted and waiting for their request
                for _ in range(3):
                    status, _ = await http(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert status == 200
            finally:
                for stream in idle:
                    await trio.aclose_forcefully(stream)


async def test_health_answers_once_the_request_line_is_in(pki: Pki) -> None:
    with trio.fail_after(IO):
        async with running_sidecar(base_config(pki.issue("a"))) as (_rt, state):
            probe = await connect(state.bound["health"][1])
            await probe.send_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n")  # headers not finished yet
            with trio.fail_after(admin.HEALTH_READ_TIMEOUT / 2):
                first = await probe.receive_some(4096)
            await probe.send_all(b"\r\n")
            rest = await read_all(probe)
    assert (first + rest).startswith(b"HTTP/1.1 200 OK\r\n") and (first + rest).endswith(b"\r\n\r\nready\n")


async def test_admin_drain_turns_health_to_503(pki: Pki) -> None:
    cfg = base_config(pki.issue("a"), timeouts=dataclasses.replace(base_config(pki.issue("a")).timeouts, drain=5.0))
    with trio.fail_after(IO):
        async with running_sidecar(cfg) as (rt, state):
            health = state.bound["health"][1]
            assert await http(health, b"GET /healthz/ready HTTP/1.1\r\n\r\n") == (200, b"ready\n")
            rt.tracker.opened()  # an open connection keeps the drain going while we look
            assert await http(state.bound["admin"][1], b"POST /drain HTTP/1.1\r\n" + AUTH + b"\r\n") == (
                200,
                b"draining\n",
            )
            with trio.fail_after(2):
                while not state.draining:
                    await trio.sleep(0.01)
            assert await http(health, b"GET /healthz/ready HTTP/1.1\r\n\r\n") == (503, b"draining\n")
            rt.tracker.closed()


async def test_a_stalled_handshake_hits_the_handshake_timeout(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    changes = {"timeouts": dataclasses.replace(base_config(pki.issue("x")).timeouts, handshake=0.5)}
    async with app_server(echo) as (app_port, seen):
        with trio.fail_after(IO):
            async with mesh_pair(pki, app_port, server_changes=changes) as mesh:
                stalled = await connect(mesh.inbound_port)
                await stalled.send_all(client_hello())  # a whole ClientHello, then nothing more
                started = trio.current_time()
                kind, _ = await outcome(stalled)
                elapsed = trio.current_time() - started
    assert kind == "reset" and 0.4 < elapsed < 3
    (line,) = conn_lines(caplog.records, "inbound")
    assert "reason=handshake_timeout" in line and seen == []


# --- credentials ------------------------------------------------------------------------------------------------


def test_credentials_that_do_not_belong_together_are_refused_at_startup(pki: Pki, tmp_path: Path) -> None:
    good = pki.issue("a")
    other = pki.issue("b")
    mixed = dataclasses.replace(good, key=other.key)
    with pytest.raises(CertificateError, match="does not match the certificate"):
        load_credentials(mixed, TD)
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match="corrupt PEM certificate"):
        load_credentials(dataclasses.replace(good, cert=str(corrupt)), TD)
    foreign = Pki(tmp_path / "foreign").issue("c")
    with pytest.raises(CertificateError, match="does not chain to the bundle"):
        load_credentials(dataclasses.replace(good, bundle=foreign.bundle), TD)
    with pytest.raises(CertificateError, match="no such file"):
        load_credentials(dataclasses.replace(good, key=str(tmp_path / "missing.pem")), TD)


def swap_secret(pki: Pki, name: str, live: Path, generation: int) -> None:
    """What the kubelet does to a Secret volume: write a new directory, then swap the `..data` symlink."""
    source = Path(pki.issue(name).cert).parent
    target = live / f"..gen{generation}"
    shutil.copytree(source, target)
    tmp_link = live / "..data_tmp"
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, live / "..data")


async def test_reload_under_traffic_breaks_no_connection(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "secret"
    live.mkdir()
    swap_secret(pki, "reviews", live, 0)
    for name in ("cert.pem", "key.pem", "bundle.pem"):
        (live / name).symlink_to(f"..data/{name}")
    server_files = files_in(live, reload_interval=0.05)

    async with app_server(echo) as (app_port, _):
        server_cfg = base_config(server_files, inbound=InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5))
        with trio.fail_after(60):
            async with running_sidecar(server_cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (server_rt, state):
                inbound_port = state.bound["inbound"][1]
                client_cfg = base_config(
                    pki.issue("productpage"),
                    outbound=OutboundConfig(
                        enabled=True, listen=ANY_PORT, destinations=(Destination((), frozenset({inbound_port})),)
                    ),
                )
                async with running_sidecar(client_cfg, orig_dst=fixed_dst(LOOPBACK, inbound_port)) as (_c, cstate):
                    port = cstate.bound["outbound"][1]
                    first = server_rt.credentials.current.fingerprint
                    streams = [await connect(port) for _ in range(4)]
                    sent = [0] * len(streams)
                    echoed = [0] * len(streams)
                    stop = trio.Event()

                    async def pump(i: int) -> None:
                        chunk = os.urandom(8192)
                        while not stop.is_set():
                            await streams[i].send_all(chunk)
                            sent[i] += len(chunk)
                            await trio.sleep(0.005)
                        await streams[i].send_eof()

                    async def drain(i: int) -> None:
                        while data := await streams[i].receive_some(65536):
                            echoed[i] += len(data)

                    async with trio.open_nursery() as nursery:
                        for i in range(len(streams)):
                            nursery.start_soon(pump, i)
                            nursery.start_soon(drain, i)
                        for generation in (1, 2):
                            await trio.sleep(0.3)
                            swap_secret(pki, "reviews", live, generation)
                            with trio.fail_after(5):
                                while server_rt.credentials.reloads < generation:
                                    await trio.sleep(0.02)
                            # New connections handshake with the new SVID while the old ones keep flowing.
                            assert await exchange(port, b"new handshake") == b"new handshake"
                        # A bad update is refused and the last good material keeps serving.
                        (live / "..gen2" / "key.pem").write_bytes(b"not a key")
                        with trio.fail_after(5):
                            while server_rt.credentials.reload_failures < 1:
                                await trio.sleep(0.02)
                        assert await exchange(port, b"still good") == b"still good"
                        await trio.sleep(0.2)
                        stop.set()
                    for stream in streams:
                        await stream.aclose()
    assert server_rt.credentials.reloads == 2
    assert server_rt.credentials.current.fingerprint != first
    assert all(s > 0 for s in sent)
    assert echoed == sent


async def test_reload_of_a_malformed_certificate_keeps_serving(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its subjectAltName only fails when the extensions are parsed (lazily, by the SVID checks): a refused reload,
    # never an error that ends the reload task and the sidecar with it.
    cert, key = forge_leaf(pki.authority, now=pki.now, san=MALFORMED_SAN)
    async with app_server(echo) as (app_port, _), mesh_pair(pki, app_port) as mesh:
        store = mesh.server_rt.credentials
        before = store.current.fingerprint
        with trio.fail_after(IO):
            assert await exchange(mesh.port, b"before") == b"before"
            Path(store.files.cert).write_bytes(pem.render_certificates([cert, *pki.authority.chain]))
            Path(store.files.key).write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
            while not any("malformed certificate extensions" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.05)
            assert await exchange(mesh.port, b"after") == b"after"
    assert store.current.fingerprint == before and store.reloads == 0
    (refusal,) = [r for r in caplog.records if "malformed certificate extensions" in r.getMessage()]
    assert refusal.getMessage().startswith("event=reload_refused reason=") and before in refusal.getMessage()


def test_an_unexpected_error_in_a_reload_keeps_the_old_credentials(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The last defence: whatever a reload raises (here a stand-in for a bug), the serving material stays.
    files = pki.issue("a")
    store = CredentialStore.load(files, TD)
    before = store.current

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the checks")

    monkeypatch.setattr(credentials, "load_credentials", broken)
    Path(files.cert).write_bytes(Path(files.cert).read_bytes())  # a new stamp: the store tries again
    os.utime(files.cert, ns=(0, 0))
    assert store.check_once() is False
    assert store.current is before and store.reload_failures == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.credentials"]
    assert (
        line
        == f"event=reload_refused reason='unexpected RuntimeError: a bug in the checks' keeping={before.fingerprint}"
    )


def test_credential_store_ignores_unchanged_files(pki: Pki) -> None:
    store = CredentialStore.load(pki.issue("a"), TD)
    assert store.check_once() is False
    assert store.reloads == 0


# --- explicit listeners -----------------------------------------------------------------------------------------


async def test_explicit_originate_and_terminate_listeners(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with app_server(echo) as (app_port, seen):
        terminate = ExplicitListener("db-server", ANY_PORT, ListenAddr(LOOPBACK, app_port), ExplicitMode.TERMINATE)
        server_cfg = base_config(pki.issue("db"), explicit=(terminate,))
        with trio.fail_after(IO):
            async with running_sidecar(server_cfg) as (_s, server_state):
                originate = ExplicitListener(
                    "db",
                    ANY_PORT,
                    ListenAddr(LOOPBACK, server_state.bound["db-server"][1]),
                    ExplicitMode.ORIGINATE,
                    (pki.id_of("db"),),
                )
                client_cfg = base_config(pki.issue("api"), explicit=(originate,))
                async with running_sidecar(client_cfg) as (_c, client_state):
                    assert await exchange(client_state.bound["db"][1], b"SELECT 1") == b"SELECT 1"
    assert seen == ["127.0.0.1"]  # explicit listeners dial forward_to with the kernel's source
    out_line = next(line for line in conn_lines(caplog.records, "outbound"))
    in_line = next(line for line in conn_lines(caplog.records, "inbound"))
    assert "listener=db " in out_line and "peer_id=spiffe://cluster.local/ns/default/sa/db" in out_line
    assert "listener=db-server " in in_line and "peer_id=spiffe://cluster.local/ns/default/sa/api" in in_line


@pytest.mark.parametrize(("caller", "allowed"), [("api", True), ("intruder", False)])
async def test_terminate_listener_lets_through_only_its_identities(
    pki: Pki, caplog: pytest.LogCaptureFixture, caller: str, allowed: bool
) -> None:
    async with app_server(echo) as (app_port, seen):
        terminate = ExplicitListener(
            "db-server", ANY_PORT, ListenAddr(LOOPBACK, app_port), ExplicitMode.TERMINATE, (pki.id_of("api"),)
        )
        with trio.fail_after(IO):
            async with running_sidecar(base_config(pki.issue("db"), explicit=(terminate,))) as (_s, server_state):
                originate = ExplicitListener(
                    "db", ANY_PORT, ListenAddr(LOOPBACK, server_state.bound["db-server"][1]), ExplicitMode.ORIGINATE
                )
                async with running_sidecar(base_config(pki.issue(caller), explicit=(originate,))) as (_c, state):
                    client = await connect(state.bound["db"][1])
                    try:
                        await client.send_all(b"SELECT secret")
                        await client.send_eof()
                    except trio.BrokenResourceError:
                        kind, data = "reset", b""
                    else:
                        kind, data = await outcome(client)
    in_line = next(line for line in conn_lines(caplog.records, "inbound"))
    assert f"peer_id=spiffe://cluster.local/ns/default/sa/{caller}" in in_line
    if allowed:
        assert (kind, data) == ("eof", b"SELECT secret") and seen == ["127.0.0.1"]
    else:
        assert (kind, data) == ("reset", b"") and seen == []  # nothing reached the app
        assert "decision=mtls" in in_line  # carried as mTLS, then denied: decided before the identity was known
        assert in_line.endswith(
            " reason=denied detail=\"spiffe://cluster.local/ns/default/sa/intruder is not one of this listener's"
            ' identities (spiffe://cluster.local/ns/default/sa/api)"'
        )


@pytest.mark.skipif(not os.path.exists("/proc/net/if_inet6"), reason="needs IPv6")
async def test_a_wildcard_ipv6_listener_serves_ipv4_clients_too(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with app_server(echo) as (app_port, _):
        outbound = OutboundConfig(enabled=True, listen=ListenAddr("::", 0))
        cfg = base_config(pki.issue("a"), outbound=outbound)
        with trio.fail_after(IO):
            async with running_sidecar(cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (_rt, state):
                assert state.bound["outbound"][0] == "::"
                assert await exchange(state.bound["outbound"][1], b"v4 via v6") == b"v4 via v6"
    (line,) = conn_lines(caplog.records, "outbound")
    assert " client=127.0.0.1:" in line and "decision=passthrough" in line  # shown as IPv4, not ::ffff:127.0.0.1


@pytest.mark.parametrize("error", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
async def test_the_wildcard_ipv6_listener_falls_back_to_ipv4_without_ipv6(
    pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    # What a kernel booted with ipv6.disable=1 answers to an AF_INET6 socket or a bind of [::]; this machine has
    # IPv6, so the answer is put in place of the dual-stack bind.
    async def no_ipv6(port: int, *_: bool) -> trio.socket.SocketType:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(sidecar, "_bind_dual_stack", no_ipv6)
    async with app_server(echo) as (app_port, _):
        cfg = base_config(pki.issue("a"), outbound=OutboundConfig(enabled=True, listen=ListenAddr("::", 0)))
        with trio.fail_after(IO):
            async with running_sidecar(cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (_rt, state):
                assert state.bound["outbound"][0] == "0.0.0.0"
                assert await exchange(state.bound["outbound"][1], b"v4 only") == b"v4 only"
    (warning,) = [r.getMessage() for r in caplog.records if "event=ipv6_unavailable" in r.getMessage()]
    assert warning.startswith(f"event=ipv6_unavailable listener=outbound error='[Errno {error}] ")


async def test_health_turns_503_when_our_svid_expires(pki: Pki) -> None:
    # An expired SVID is refused by every peer: the pod must leave its Services until a reload brings a new one.
    files = pki.issue("a", now=datetime.now(UTC), ttl=timedelta(seconds=2))
    with trio.fail_after(IO):
        async with running_sidecar(base_config(files)) as (rt, state):
            health = state.bound["health"][1]
            assert await http(health, b"GET /healthz/ready HTTP/1.1\r\n\r\n") == (200, b"ready\n")
            await trio.sleep(max(0.0, (rt.credentials.current.not_after - datetime.now(UTC)).total_seconds()) + 0.1)
            assert await http(health, b"GET /healthz/ready HTTP/1.1\r\n\r\n") == (503, b"certificate expired\n")


async def test_an_endpoint_bug_costs_one_request_not_the_sidecar(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = admin.Endpoints.answer

    def answer(
        self: admin.Endpoints,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        view: admin.WorkersView | None = None,
    ) -> admin.Response:
        if target == "/boom":  # a stand-in for a bug in an answer
            raise RuntimeError("a bug in an endpoint")
        return original(self, method, target, headers, view)

    monkeypatch.setattr(admin.Endpoints, "answer", answer)
    with trio.fail_after(IO):
        async with running_sidecar(base_config(pki.issue("a"))) as (_rt, state):
            port = state.bound["admin"][1]
            stream = await connect(port)
            await stream.send_all(b"GET /boom HTTP/1.1\r\n\r\n")
            assert await outcome(stream) == ("eof", b"")  # closed without an answer
            assert await http(port, b"GET /healthz/ready HTTP/1.1\r\n\r\n") == (200, b"ready\n")
    (record,) = [r for r in caplog.records if "event=internal_error" in r.getMessage()]
    assert record.getMessage() == "event=internal_error listener=admin" and record.exc_info is not None


async def test_keepalive_on_accepted_and_dialed_sockets(pki: Pki) -> None:
    """Both sockets of a relayed connection probe an idle peer, so a dead one is found even with no idle timeout."""
    wanted = {
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE): 1,
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): netio.KEEPALIVE_IDLE,
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): netio.KEEPALIVE_INTERVAL,
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): netio.KEEPALIVE_COUNT,
    }
    seen: dict[str, dict[tuple[int, int], int]] = {}

    def options(sock: trio.socket.SocketType) -> dict[tuple[int, int], int]:
        return {key: sock.getsockopt(*key) for key in wanted}

    async with app_server(echo) as (app_port, _seen):
        app = ipaddress.ip_address(LOOPBACK)

        def orig_dst(stream: trio.SocketStream) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
            seen["accepted"] = options(stream.socket)
            return app, app_port

        async def dial(host: str, port: int, *, timeout: float, source: object = None) -> trio.SocketStream:
            stream = await netio.dial(host, port, timeout=timeout)
            seen["dialed"] = options(stream.socket)
            return stream

        outbound = OutboundConfig(enabled=True, listen=ANY_PORT, policy=OutboundPolicy.ALLOW_ANY, destinations=())
        cfg = base_config(pki.issue("productpage"), outbound=outbound)
        store = CredentialStore.load(cfg.credentials, cfg.trust_domain)  # type: ignore[arg-type]
        stop = trio.Event()
        with trio.fail_after(IO):
            async with trio.open_nursery() as nursery:
                serve = functools.partial(sidecar.serve_sidecar, cfg, store, stop=stop, orig_dst=orig_dst, dial=dial)
                _rt, state = await nursery.start(serve)
                try:
                    assert await exchange(state.bound["outbound"][1], b"ping") == b"ping"
                finally:
                    stop.set()
    assert seen == {"accepted": wanted, "dialed": wanted}


async def test_accept_ready_takes_every_waiting_connection_and_leaves_the_listener_its_socket() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    raw = netio.listening_socket(listener)
    clients: list[trio.SocketStream] = []
    accepted: list[trio.SocketStream] = []
    try:
        assert netio.accept_ready(raw) is None  # an empty backlog: no wait, no exception
        clients = [await trio.open_tcp_stream(LOOPBACK, port) for _ in range(3)]  # each waits in the backlog
        peers = []
        while (ready := netio.accept_ready(raw)) is not None:
            accepted.append(ready[0])
            peers.append(ready[1])
        assert peers == [(LOOPBACK, client.socket.getsockname()[1]) for client in clients]
        assert [stream.socket.getpeername()[1] for stream in accepted] == [peer[1] for peer in peers]
        assert netio.accept_ready(raw) is None
    finally:
        raw.detach()
        for stream in (*clients, *accepted):
            await stream.aclose()
    assert listener.socket.fileno() != -1  # the plain socket let go of the descriptor without closing it
    late = await trio.open_tcp_stream(LOOPBACK, port)
    with trio.fail_after(IO):
        served = await listener.accept()
    await late.aclose()
    await served.aclose()
    await listener.aclose()
