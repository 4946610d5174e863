"""Two in-process sidecars on loopback: app → outbound sidecar ═mTLS═▶ inbound sidecar → app.

Real listeners, real TLS 1.3 with SVIDs from the CA, real sockets; only the original destination is injected.
Each test checks what the app and the client see, and the one log line per connection.
"""

from __future__ import annotations

import os
import re

import pytest
import trio

from mtlsmesh import tls
from mtlsmesh.config import Action, AuthzRule, InboundConfig, Mode, PortConfig, RecordLayer, Timeouts
from mtlsmesh.errors import HandshakeError
from tests.integration.mesh import (
    ANY_PORT,
    app_server,
    client_hello,
    conn_lines,
    connect,
    echo,
    exchange,
    mesh_pair,
    outcome,
    read_all,
)
from tests.integration.test_tls import BAD_CLIENTS, ClientMaker
from tests.pki import Pki

pytestmark = pytest.mark.usefixtures("mesh_logs")

IO = 10.0  # seconds any single scenario may take


@pytest.fixture(params=list(RecordLayer), ids=lambda layer: f"records-{layer.value}")
def layered(request: pytest.FixtureRequest) -> dict[str, object]:
    """Both sidecars' `record_layer` (global): the tests that take it run on both record paths."""
    return {"record_layer": request.param}


async def test_bytes_flow_both_ways_and_the_app_sees_127_0_0_6(
    layered: dict[str, object], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    payload = os.urandom(300_000)
    with trio.fail_after(IO):
        async with (
            app_server(echo) as (app_port, seen),
            mesh_pair(pki, app_port, server_changes=layered, client_changes=layered) as mesh,
        ):
            got = await exchange(mesh.port, payload)
    assert got == payload
    assert seen == ["127.0.0.6"]
    outbound, inbound = conn_lines(caplog.records, "outbound"), conn_lines(caplog.records, "inbound")
    assert len(outbound) == 1 and len(inbound) == 1, caplog.records
    assert "decision=mtls" in outbound[0] and "peer_id=spiffe://cluster.local/ns/default/sa/reviews" in outbound[0]
    assert "decision=mtls" in inbound[0] and "peer_id=spiffe://cluster.local/ns/default/sa/productpage" in inbound[0]
    assert f"bytes_in={len(payload)}" in outbound[0] and f"bytes_out={len(payload)}" in outbound[0]
    # Inbound counts the plaintext the app got and sent, not the ClientHello the sniffer handed to the handshake.
    assert f"bytes_in={len(payload)}" in inbound[0] and f"bytes_out={len(payload)}" in inbound[0]
    assert outbound[0].endswith(" reason=closed") and inbound[0].endswith(" reason=closed")  # no detail


async def test_half_close_from_the_app_side_lets_the_client_keep_sending(layered: dict[str, object], pki: Pki) -> None:
    """The app says its piece and shuts its write side first; the client keeps sending after seeing that EOF."""
    received: list[bytes] = []

    async def banner_then_listen(stream: trio.SocketStream) -> None:
        await stream.send_all(b"banner")
        await stream.send_eof()
        received.append(await read_all(stream))

    with trio.fail_after(IO):
        async with (
            app_server(banner_then_listen) as (app_port, _),
            mesh_pair(pki, app_port, server_changes=layered, client_changes=layered) as mesh,
        ):
            client = await connect(mesh.port)
            assert await read_all(client) == b"banner"  # EOF arrived: the app half-closed
            await client.send_all(b"still talking after your EOF")
            await client.send_eof()
            with trio.fail_after(IO):
                while not received:
                    await trio.sleep(0.01)
            await client.aclose()
    assert received == [b"still talking after your EOF"]


async def test_a_reset_by_the_app_reaches_the_client_as_a_reset(
    layered: dict[str, object], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    from mtlsmesh import netio

    async def reset_mid_stream(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        await stream.send_all(b"partial")
        await trio.sleep(0.05)
        await netio.abort_close(stream)

    with trio.fail_after(IO):
        async with (
            app_server(reset_mid_stream) as (app_port, _),
            mesh_pair(pki, app_port, server_changes=layered, client_changes=layered) as mesh,
        ):
            client = await connect(mesh.port)
            await client.send_all(b"hello")
            kind, data = await outcome(client)
    assert kind == "reset"
    assert data in (b"", b"partial")
    assert any(" reason=reset_by_app detail=" in line for line in conn_lines(caplog.records, "inbound"))
    assert any(" reason=reset_by_peer detail=" in line for line in conn_lines(caplog.records, "outbound"))


async def test_a_reset_by_the_client_reaches_the_app_as_a_reset(layered: dict[str, object], pki: Pki) -> None:
    from mtlsmesh import netio

    app_saw: list[str] = []

    async def record(stream: trio.SocketStream) -> None:
        kind, _ = await outcome(stream)
        app_saw.append(kind)

    with trio.fail_after(IO):
        async with (
            app_server(record) as (app_port, _),
            mesh_pair(pki, app_port, server_changes=layered, client_changes=layered) as mesh,
        ):
            client = await connect(mesh.port)
            await client.send_all(b"some bytes")
            await trio.sleep(0.2)
            await netio.abort_close(client)
            while not app_saw:
                await trio.sleep(0.01)
    assert app_saw == ["reset"]


async def test_policy_denies_a_caller_and_others_keep_working(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    deny = (AuthzRule(Action.DENY, ("spiffe://cluster.local/ns/default/sa/productpage",)),)
    with trio.fail_after(IO):
        async with app_server(echo) as (app_port, seen):
            async with mesh_pair(pki, app_port, server_changes={"authorization": deny}) as mesh:
                client = await connect(mesh.port)
                await client.send_all(b"let me in")
                kind, data = await outcome(client)
                await client.aclose()
            async with mesh_pair(pki, app_port, client="details", server_changes={"authorization": deny}) as mesh:
                assert await exchange(mesh.port, b"allowed") == b"allowed"
    assert (kind, data) == ("reset", b"")
    assert seen == ["127.0.0.6"]  # only the allowed caller reached the app
    denied = [line for line in conn_lines(caplog.records, "inbound") if " reason=denied detail=" in line]
    assert len(denied) == 1 and "peer_id=spiffe://cluster.local/ns/default/sa/productpage" in denied[0]
    assert "decision=mtls" in denied[0] and 'detail="rule 0 DENY matches' in denied[0]


async def test_a_server_with_an_unexpected_identity_is_refused(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    expected = (pki.id_of("ratings"),)
    with trio.fail_after(IO):
        async with app_server(echo) as (app_port, seen), mesh_pair(pki, app_port, identities=expected) as mesh:
            client = await connect(mesh.port)
            kind, _ = await outcome(client)
    assert kind == "reset"
    assert seen == []
    (line,) = conn_lines(caplog.records, "outbound")
    assert "not an expected identity" in line and "decision=mtls" in line and " reason=handshake_failed " in line


async def test_an_upstream_that_refuses_resets_the_app(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    app_port = closed.getsockname()[1]  # bound, never listening: connect is refused
    with trio.fail_after(IO):
        async with mesh_pair(pki, app_port) as mesh:
            client = await connect(mesh.port)
            kind, _ = await outcome(client)
    closed.close()
    assert kind == "reset"
    (line,) = conn_lines(caplog.records, "inbound")
    assert line.endswith(' reason=connect_failed detail="Connection refused"') and "decision=mtls" in line


async def test_an_upstream_that_never_answers_hits_the_connect_timeout(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs.
    blackhole = trio.socket.socket()
    await blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    app_port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = trio.socket.socket()
        fillers.append(filler)
        with trio.move_on_after(0.3):
            await filler.connect(("127.0.0.1", app_port))
    server_changes = {"timeouts": Timeouts(handshake=2.0, connect=0.5, idle=None, drain=1.0)}
    try:
        with trio.fail_after(IO):
            async with mesh_pair(pki, app_port, server_changes=server_changes) as mesh:
                client = await connect(mesh.port)
                started = trio.current_time()
                kind, _ = await outcome(client)
                elapsed = trio.current_time() - started
    finally:
        for sock in (blackhole, *fillers):
            sock.close()
    assert kind == "reset"
    assert 0.4 < elapsed < 5
    (line,) = conn_lines(caplog.records, "inbound")
    assert line.endswith(" reason=connect_timeout") and "decision=mtls" in line


BAD_INBOUND = [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_mesh"),
    ("half-client-hello", client_hello()[:60], "sniff_timeout"),
    ("foreign-tls", client_hello(alpn=b"h2"), "not_mesh"),
    ("silence", b"", "sniff_timeout"),
    ("half-client-hello-then-fin", client_hello()[:60], "closed_during_sniff"),
]


@pytest.mark.parametrize(("case", "first_bytes", "reason"), BAD_INBOUND, ids=[c[0] for c in BAD_INBOUND])
async def test_strict_inbound_refuses_what_is_not_mesh_tls(
    pki: Pki, caplog: pytest.LogCaptureFixture, case: str, first_bytes: bytes, reason: str
) -> None:
    with trio.fail_after(IO):
        async with app_server(echo) as (app_port, seen), mesh_pair(pki, app_port) as mesh:
            bad = await connect(mesh.inbound_port)
            if first_bytes:
                await bad.send_all(first_bytes)
            if case.endswith("then-fin"):
                await bad.send_eof()
            started = trio.current_time()
            kind, _ = await outcome(bad)
            elapsed = trio.current_time() - started
            assert await exchange(mesh.port, b"others keep working") == b"others keep working"
            await bad.aclose()
    assert kind in ("reset", "eof")
    if reason == "sniff_timeout":
        assert elapsed >= 0.4  # sniff_timeout is 0.5 s in these configs
    refused = [line for line in conn_lines(caplog.records, "inbound") if "decision=refuse" in line]
    assert len(refused) == 1 and f" reason={reason} detail=" in refused[0], refused
    assert seen == ["127.0.0.6"]


async def test_permissive_port_passes_plaintext_through(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with app_server(echo) as (app_port, seen):
        inbound = InboundConfig(
            enabled=True, listen=ANY_PORT, sniff_timeout=0.5, ports={app_port: PortConfig(mode=Mode.PERMISSIVE)}
        )
        with trio.fail_after(IO):
            async with mesh_pair(pki, app_port, server_changes={"inbound": inbound}) as mesh:
                plain = await connect(mesh.inbound_port)
                await plain.send_all(b"plaintext hello")
                await plain.send_eof()
                assert await read_all(plain) == b"plaintext hello"
    (line,) = conn_lines(caplog.records, "inbound")
    assert "decision=passthrough" in line and "peer_id=-" in line
    # The sniffed bytes were sent to the app ahead of the relay, and counted once.
    assert f"bytes_in={len(b'plaintext hello')} bytes_out={len(b'plaintext hello')}" in line
    assert seen == ["127.0.0.6"]


@pytest.mark.parametrize(("case", "make_client", "reason", "told"), BAD_CLIENTS, ids=[c[0] for c in BAD_CLIENTS])
async def test_inbound_refuses_bad_mesh_clients_with_a_log_line(
    layered: dict[str, object],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    case: str,
    make_client: ClientMaker,
    reason: str,
    told: str,
) -> None:
    other = Pki(pki.root / "other").authority
    client_ctx = make_client(pki.authority, other)
    with trio.fail_after(IO):
        async with (
            app_server(echo) as (app_port, seen),
            mesh_pair(pki, app_port, server_changes=layered, client_changes=layered) as mesh,
        ):
            transport = await connect(mesh.inbound_port)
            bad = tls.TLSStream(transport, client_ctx, tls.Side.CLIENT)
            with pytest.raises((trio.BrokenResourceError, HandshakeError), match=told):
                await bad.do_handshake()
                await bad.send_all(b"hello")
                await bad.receive_some()  # TLS 1.3: the server's refusal shows at the first read
            await trio.aclose_forcefully(bad)
            assert await exchange(mesh.port, b"others keep working") == b"others keep working"
    # Decided as mTLS once the sniff saw a mesh ClientHello; the handshake then failed.
    refused = [line for line in conn_lines(caplog.records, "inbound") if not line.endswith(" reason=closed")]
    assert len(refused) == 1, refused
    assert "decision=mtls" in refused[0] and "peer_id=-" in refused[0]
    assert re.search(f' reason=handshake_failed detail="{reason}"$', refused[0]), refused[0]
    assert seen == ["127.0.0.6"]


async def test_a_disable_port_is_not_sniffed(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """DISABLE passes bytes through at once: a plaintext client of a server-first app gets the greeting."""

    async def greet_first(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 hello\r\n")
        await echo(stream)

    async with app_server(greet_first) as (app_port, _):
        inbound = InboundConfig(
            enabled=True, listen=ANY_PORT, sniff_timeout=5.0, ports={app_port: PortConfig(mode=Mode.DISABLE)}
        )
        with trio.fail_after(3):  # far below the 5 s sniff timeout: nothing waited for the client
            async with mesh_pair(pki, app_port, server_changes={"inbound": inbound}) as mesh:
                plain = await connect(mesh.inbound_port)
                assert await plain.receive_some(100) == b"220 hello\r\n"
                await plain.send_all(b"QUIT")
                await plain.send_eof()
                assert await read_all(plain) == b"QUIT"
    lines = conn_lines(caplog.records, "inbound")
    assert len(lines) == 1 and "decision=passthrough" in lines[0]


@pytest.mark.parametrize("mode", [Mode.STRICT, Mode.PERMISSIVE])
async def test_a_server_first_port_is_mesh_only_in_both_modes(
    pki: Pki, caplog: pytest.LogCaptureFixture, mode: Mode
) -> None:
    """A server-first port is not sniffed and carries mesh mTLS only, whatever the mesh-wide mode: the mesh caller
    gets the greeting at once; a plaintext caller sends nothing, so the TLS server waits for a ClientHello until
    timeouts.handshake and resets it, and the app never sees it."""

    async def greet_first(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 hello\r\n")
        await echo(stream)

    async with app_server(greet_first) as (app_port, seen):
        inbound = InboundConfig(
            enabled=True, listen=ANY_PORT, mode=mode, sniff_timeout=5.0, ports={app_port: PortConfig(server_first=True)}
        )
        changes = {"inbound": inbound, "timeouts": Timeouts(handshake=1.0)}
        async with mesh_pair(pki, app_port, server_changes=changes) as mesh:
            with trio.fail_after(3):  # far below the 5 s sniff timeout: the mesh caller waited for nothing
                meshed = await connect(mesh.port)
                assert await meshed.receive_some(100) == b"220 hello\r\n"
                await meshed.send_all(b"QUIT")
                await meshed.send_eof()
                assert await read_all(meshed) == b"QUIT"
            assert len(seen) == 1
            with trio.fail_after(10):  # the 1 s handshake timeout, with room for a loaded machine
                plain = await connect(mesh.inbound_port)
                try:
                    answer: bytes | None = await plain.receive_some(100)
                except trio.BrokenResourceError:  # reset
                    answer = None
            assert answer is None, f"a plaintext caller of a mesh-only port got {answer!r}, not a reset"
            assert len(seen) == 1  # the app never saw the plaintext caller
    lines = conn_lines(caplog.records, "inbound")
    assert any("decision=mtls" in line and " reason=closed" in line for line in lines), lines
    warned = [r.getMessage() for r in caplog.records if "event=config_warning" in r.getMessage()]
    assert len(warned) == (1 if mode is Mode.PERMISSIVE else 0), warned  # inherited PERMISSIVE: said once, at start
    assert all(f"inbound.ports.{app_port}: server_first under inbound.mode permissive" in line for line in warned)
    assert any(
        "decision=mtls" in line and "peer_id=-" in line and "reason=handshake_timeout" in line for line in lines
    ), lines
