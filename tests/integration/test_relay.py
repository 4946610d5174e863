"""The relay over in-memory stream pairs and loopback TCP: counts, half-close, idle timeout, and failure mapping."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import pytest
import trio
from OpenSSL import SSL
from trio.testing import memory_stream_pair

from mtlsmesh import ca, handshake, netio, runtime, sslstream, tls
from mtlsmesh.identity import workload_id
from mtlsmesh.outcome import Reason
from mtlsmesh.relay import relay
from tests.pki import TD, material_for


def pairs() -> tuple[trio.StapledStream, trio.StapledStream, trio.StapledStream, trio.StapledStream]:
    """client ↔ (downstream | relay | upstream) ↔ server"""
    client, downstream = memory_stream_pair()
    upstream, server = memory_stream_pair()
    return client, downstream, upstream, server  # type: ignore[return-value]


async def tcp_pair(*, buffer: int | None = None) -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection (dialer, accepted). `buffer`: small kernel buffers on both ends, so a
    slow reader pushes back on the writer at once."""
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dialer = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        for sock in (listener, dialer):  # before connect: the window is agreed on at the handshake
            if buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await dialer.connect(listener.getsockname())
        accepted, _ = await listener.accept()
    return trio.SocketStream(dialer), trio.SocketStream(accepted)


async def test_counts_and_half_close_each_way() -> None:
    client, downstream, upstream, server = pairs()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            results = []

            async def run() -> None:
                results.append(await relay(downstream, upstream))

            nursery.start_soon(run)
            await client.send_all(b"12345")
            assert await server.receive_some() == b"12345"
            await client.send_eof()
            assert await server.receive_some() == b""  # the FIN crossed; the other way is still open
            await server.send_all(b"abc")
            assert await client.receive_some() == b"abc"
            await server.send_eof()
            assert await client.receive_some() == b""
    (result,) = results
    assert (result.downstream_to_upstream, result.upstream_to_downstream) == (5, 3)
    assert (result.reason, result.detail, result.aborted) == (Reason.CLOSED, "", False)


async def test_idle_timeout_closes_a_quiet_relay_but_not_a_busy_one() -> None:
    client, downstream, upstream, server = pairs()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            results = []

            async def run() -> None:
                results.append(await relay(downstream, upstream, idle_timeout=0.3))

            nursery.start_soon(run)
            started = trio.current_time()
            for _ in range(6):  # 0.6 s of traffic, one byte every 0.1 s: never idle for 0.3 s
                await client.send_all(b"x")
                assert await server.receive_some() == b"x"
                await trio.sleep(0.1)
            assert not results
        elapsed = trio.current_time() - started
    (result,) = results
    assert (result.reason, result.detail, result.aborted) == (Reason.IDLE_TIMEOUT, "", True)
    assert 0.8 < elapsed < 2.0


@pytest.mark.parametrize("upstream_kind", ["tcp", "tls", "tls-openssl"])
async def test_a_send_blocked_by_a_slow_reader_is_not_idle(upstream_kind: str) -> None:
    """Bytes leaving towards a slow reader are progress: a relay whose only activity for several idle timeouts is a
    send held back by backpressure stays up and delivers everything, to a plain socket and to TLS over a socket."""
    client, downstream = await tcp_pair()
    upstream_tcp, server_tcp = await tcp_pair(buffer=4096)
    upstream: trio.abc.HalfCloseableStream = upstream_tcp
    server: trio.abc.HalfCloseableStream = server_tcp
    total = 240 * 1024
    results = []
    with trio.fail_after(20):
        if upstream_kind != "tcp":  # TLS over the socket, with our record layer or OpenSSL's (record_layer)
            authority = ca.create_ca(TD, now=datetime.now(UTC))
            layer = sslstream.OpenSSLStream if upstream_kind == "tls-openssl" else tls.TLSStream
            up_tls = layer(upstream_tcp, tls_context(authority, "client", tls.Side.CLIENT), tls.Side.CLIENT)
            server_tls = layer(server_tcp, tls_context(authority, "server", tls.Side.SERVER), tls.Side.SERVER)
            async with trio.open_nursery() as handshakes:
                handshakes.start_soon(up_tls.do_handshake)
                handshakes.start_soon(server_tls.do_handshake)
            upstream, server = up_tls, server_tls
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await client.send_all(b"z" * total)
                await client.send_eof()

            async def run() -> None:
                results.append(await relay(downstream, upstream, idle_timeout=1.0))

            # The bytes wait in the relay's receive buffer: its first read takes a large chunk, and then its only
            # activity is sending that chunk to a reader taking 4 KiB every 50 ms (about 3 s), over the 1 s timeout.
            nursery.start_soon(send)
            await trio.sleep(0.2)
            nursery.start_soon(run)
            started = trio.current_time()
            got = 0
            while data := await server.receive_some(4096):
                got += len(data)
                await trio.sleep(0.05)
            elapsed = trio.current_time() - started
            await server.send_eof()
    (result,) = results
    assert (result.reason, result.aborted, got) == (Reason.CLOSED, False, total)
    assert result.downstream_to_upstream == total
    assert elapsed > 2.0  # the test really outlasted the idle timeout


def tls_context(authority: ca.Authority, name: str, side: tls.Side) -> SSL.Context:
    return handshake.build_context(material_for(authority, workload_id(TD, "default", name)), side)


@pytest.mark.parametrize("breaks", ["client", "server"])
async def test_a_broken_side_aborts_both(breaks: str) -> None:
    """Over loopback TCP, where an abort is visible: a reset on one side reaches the other side as a reset (an RST,
    ECONNRESET), never as the clean end of stream (b"") a graceful close would give."""
    client, downstream = await tcp_pair()
    upstream, server = await tcp_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            results = []

            async def run() -> None:
                results.append(
                    await relay(
                        downstream, upstream, downstream_reset=Reason.RESET_BY_APP, upstream_reset=Reason.RESET_BY_PEER
                    )
                )

            nursery.start_soon(run)
            await client.send_all(b"x")
            assert await server.receive_some() == b"x"
            victim, other = (client, server) if breaks == "client" else (server, client)
            await netio.abort_close(victim)  # an RST to the relay
            with pytest.raises(trio.BrokenResourceError, match="Connection reset by peer"):
                await other.receive_some()  # b"" here would be a clean close, not an abort
            await other.aclose()
    (result,) = results
    assert result.aborted
    assert result.reason is (Reason.RESET_BY_APP if breaks == "client" else Reason.RESET_BY_PEER)
    assert "Connection reset by peer" in result.detail


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({"a": "plain", "b": 3}, "a=plain b=3"),
        ({"reason": "denied: rule 0"}, 'reason="denied: rule 0"'),
        ({"x": 'say "hi"'}, 'x="say \\"hi\\""'),
        ({"empty": ""}, 'empty=""'),
        ({"nl": "a\nb"}, 'nl="a\\nb"'),
    ],
)
def test_log_values_are_quoted_when_needed(fields: dict[str, object], line: str) -> None:
    assert runtime.render_kv(fields) == line
