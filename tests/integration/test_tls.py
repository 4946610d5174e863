"""The TLS stream: trio's stream contract over memory and lockstep pairs, and every peer the sidecars must refuse.

In TLS 1.3 the client's handshake finishes before the server has judged the client's certificate, so a refusal by
the server reaches the client only at its first read (docs/ARCHITECTURE.md §13): refusal tests read.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import trio
from OpenSSL import SSL
from trio.testing import check_half_closeable_stream, lockstep_stream_pair, memory_stream_pair

from bench.handshake import openssl_handshake
from mtlsmesh import ca, handshake, sslstream, tls
from mtlsmesh.errors import HandshakeError
from mtlsmesh.identity import TrustDomain, parse_spiffe_id, workload_id
from tests.pki import MALFORMED_SAN, TD, forge_leaf, material_for, uri_sans

NOW = datetime.now(UTC)
IO = 10.0


@pytest.fixture(scope="module")
def authority() -> ca.Authority:
    return ca.create_ca(TD, now=NOW - timedelta(days=3), intermediate=True)  # old enough to sign an expired leaf


@pytest.fixture(scope="module")
def contexts(authority: ca.Authority) -> tuple[SSL.Context, SSL.Context]:
    client = handshake.build_context(material_for(authority, workload_id(TD, "default", "client")), tls.Side.CLIENT)
    server = handshake.build_context(material_for(authority, workload_id(TD, "default", "server")), tls.Side.SERVER)
    return client, server


# The two record paths (`record_layer: own | openssl`): tests that take the `layer` fixture run on both, with the
# same expectations; the others are about our own record layer's details.
LAYERS = {"own": tls.TLSStream, "openssl": sslstream.OpenSSLStream}
OPENERS = {tls.TLSStream: tls.open_mtls, sslstream.OpenSSLStream: sslstream.open_mtls}
Layer = type[tls.TLSStream]  # either class; the tests use only what both have


@pytest.fixture(params=sorted(LAYERS))
def layer(request: pytest.FixtureRequest) -> Layer:
    return LAYERS[request.param]  # type: ignore[return-value]


def tls_pair(
    contexts: tuple[SSL.Context, SSL.Context],
    transports: tuple[trio.abc.Stream, trio.abc.Stream],
    layer: Layer = tls.TLSStream,
) -> tuple[tls.TLSStream, tls.TLSStream]:
    """A client and a server TLS stream, not yet shaken hands, over the two ends of a transport pair."""
    (client_ctx, server_ctx), (a, b) = contexts, transports
    return layer(a, client_ctx, tls.Side.CLIENT), layer(b, server_ctx, tls.Side.SERVER)


async def handshake_both(client: tls.TLSStream, server: tls.TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)


async def test_stream_contract_over_memory_and_lockstep_pairs(
    layer: Layer, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    async def memory_pair() -> tuple[tls.TLSStream, tls.TLSStream]:
        return tls_pair(contexts, memory_stream_pair(), layer)

    async def lockstep_pair() -> tuple[tls.TLSStream, tls.TLSStream]:
        # A lockstep transport has no buffer at all. After the handshake an OpenSSL TLS 1.3 server writes session
        # tickets (pyOpenSSL cannot set their number to 0; our own record layer drops them, OpenSSL's sends them);
        # with no buffer that write waits for a client read. So the pair is handed over after the handshake and
        # after the client has read what came, as a socket's buffer would have let it.
        client, server = tls_pair(contexts, lockstep_stream_pair(), layer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(client.receive_some)  # reads the tickets, then waits: cancelled below

            async def serve() -> None:
                await server.do_handshake()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve)
        return client, server

    with trio.fail_after(60):
        await check_half_closeable_stream(memory_pair, lockstep_pair)


async def test_negotiates_tls13_with_the_hybrid_group(layer: Layer, contexts: tuple[SSL.Context, SSL.Context]) -> None:
    client, server = tls_pair(contexts, memory_stream_pair(), layer)
    with trio.fail_after(IO):
        await handshake_both(client, server)
    version, cipher, group = client.negotiated
    assert version == tls.NEGOTIATED_VERSION
    assert cipher == tls.NEGOTIATED_CIPHER
    if handshake.GROUPS == handshake.PQ_GROUPS:
        assert group == tls.NEGOTIATED_GROUP_PQ
    assert server.negotiated == client.negotiated
    assert client.alpn() == tls.ALPN


async def test_half_close_lets_the_other_direction_go_on(
    layer: Layer, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    client, server = tls_pair(contexts, memory_stream_pair(), layer)
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"request")
            assert await server.receive_some() == b"request"
        await client.send_eof()
        assert await server.receive_some() == b""  # close_notify
        await server.send_all(b"reply after the client's close_notify")
        assert await client.receive_some() == b"reply after the client's close_notify"
        await server.send_eof()
        assert await client.receive_some() == b""


@pytest.mark.parametrize("transport", ["memory", "socket"])
async def test_a_key_update_request_after_our_close_notify_does_not_break_our_reading(
    contexts: tuple[SSL.Context, SSL.Context], transport: str
) -> None:
    """After our close_notify the peer may go on sending (RFC 8446 §6.1), and may ask for a KeyUpdate: we owe it
    only before our next application data (§4.6.3), which will never come. Answering would write to a transport
    shut for writing and lose what the peer sends next."""
    pair: tuple[trio.abc.Stream, trio.abc.Stream]
    if transport == "memory":
        pair = memory_stream_pair()
    else:
        left, right = trio.socket.socketpair()
        pair = (trio.SocketStream(left), trio.SocketStream(right))
    client, server = tls_pair(contexts, pair)
    with trio.fail_after(IO):
        await handshake_both(client, server)
        await client.send_eof()
        assert await server.receive_some() == b""
        assert server._session is not None and client._session is not None
        server._session.request_key_update()
        await server.send_all(b"sent under the server's next key")
        written_under = client._session._write.secret
        assert await client.receive_some() == b"sent under the server's next key"
        assert client._session._write.secret == written_under, "we answered after our close_notify"
        await server.send_eof()
        assert await client.receive_some() == b""
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize(
    ("tail", "then"),
    [
        ("close_notify", "eof"),  # records, then close_notify, all in one transport read
        ("garbage", "broken"),  # records, then bytes that are no TLS record
    ],
)
async def test_one_receive_decrypts_every_buffered_record_and_keeps_what_follows(
    contexts: tuple[SSL.Context, SSL.Context], tail: str, then: str
) -> None:
    payload = os.urandom(3 * tls.RECORD_SIZE + 100)  # four records
    a, b = memory_stream_pair()
    client, server = tls_pair(contexts, (a, b))
    with trio.fail_after(IO):
        await handshake_both(client, server)
        await client.send_all(payload)
        if tail == "close_notify":
            await client.send_eof()
        else:
            await a.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))  # an application record that fails to decrypt
        assert await server.receive_some(1 << 20) == payload  # everything before the tail, in one call
        if then == "eof":
            assert await server.receive_some(1 << 20) == b""
        else:
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some(1 << 20)


async def test_truncation_without_close_notify_is_a_broken_stream(
    layer: Layer, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    a, b = memory_stream_pair()
    client, server = tls_pair(contexts, (a, b), layer)
    with trio.fail_after(IO):
        await handshake_both(client, server)
        await a.aclose()  # the transport goes away with no close_notify
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


def two_uri_sans(authority: ca.Authority) -> handshake.Material:
    cert, key = forge_leaf(
        authority,
        now=NOW - timedelta(minutes=1),
        san=uri_sans("spiffe://cluster.local/ns/default/sa/one", "spiffe://cluster.local/ns/default/sa/two"),
    )
    return handshake.Material((cert, *authority.chain), key, authority.roots)


def malformed_san(authority: ca.Authority) -> handshake.Material:
    cert, key = forge_leaf(authority, now=NOW - timedelta(minutes=1), san=MALFORMED_SAN)
    return handshake.Material((cert, *authority.chain), key, authority.roots)


def without_certificate(authority: ca.Authority) -> SSL.Context:
    """A TLS 1.3 client offering our ALPN that trusts our roots but presents no certificate."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_alpn_protos([tls.ALPN])
    for root in authority.roots:
        ctx.get_cert_store().add_cert(__import__("OpenSSL").crypto.X509.from_cryptography(root))  # type: ignore[union-attr]
    ctx.set_verify(SSL.VERIFY_PEER)
    return ctx


def tls12_client(material: handshake.Material) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_alpn_protos([tls.ALPN])
    ctx.use_certificate(material.chain[0])
    ctx.use_privatekey(material.key)
    return ctx


ClientMaker = Callable[[ca.Authority, ca.Authority], SSL.Context]

# Refused by our SVID checks once its chain verified: the client reads the fatal alert bad_certificate. With our
# record layer the server sends it under its application key after the handshake, before it closes (RFC 8446 §6.2);
# with OpenSSL's it is OpenSSL's alert from inside the handshake (the check runs in the certificate verify callback).
CLOSED_AFTER_HANDSHAKE = r"alert bad certificate$"


# (case, client, the server's whole reason (a regex), what the client is told). The server's reason for a failed
# chain is OpenSSL's "certificate verify failed" whatever the cause; its alert names the cause, the client reads it.
BAD_CLIENTS: list[tuple[str, ClientMaker, str, str]] = [
    (
        "foreign-ca",
        # Signed by another CA of the same trust domain; it trusts our roots, so only the server refuses.
        lambda ours, other: handshake.build_context(
            dataclasses.replace(material_for(other, workload_id(TD, "default", "intruder")), roots=ours.roots),
            tls.Side.CLIENT,
        ),
        "certificate verify failed",
        r"alert unknown ca$",
    ),
    (
        "expired",
        lambda ours, other: handshake.build_context(
            material_for(ours, workload_id(TD, "default", "old"), now=NOW - timedelta(days=2), ttl=timedelta(hours=1)),
            tls.Side.CLIENT,
        ),
        "certificate verify failed",
        r"alert certificate expired$",
    ),
    (
        "no-certificate",
        lambda ours, other: without_certificate(ours),
        "peer did not return a certificate",
        r"alert certificate required$",
    ),
    (
        "two-uri-sans",
        lambda ours, other: handshake.build_context(two_uri_sans(ours), tls.Side.CLIENT),
        r"peer certificate is not a valid SVID: 2 URI SANs: an SVID carries exactly one \(L-1, V-6\)",
        CLOSED_AFTER_HANDSHAKE,
    ),
    (
        "malformed-san",
        # Chains fine; its extensions do not parse: a refusal with the reason, not an internal error.
        lambda ours, other: handshake.build_context(malformed_san(ours), tls.Side.CLIENT),
        "peer certificate is not a valid SVID: malformed certificate extensions: error parsing asn1 .*",
        CLOSED_AFTER_HANDSHAKE,
    ),
    (
        "tls12",
        lambda ours, other: tls12_client(material_for(ours, workload_id(TD, "default", "legacy"))),
        "unsupported protocol",
        r"alert protocol version$",
    ),
]


@pytest.mark.parametrize(("case", "make_client", "reason", "told"), BAD_CLIENTS, ids=[c[0] for c in BAD_CLIENTS])
async def test_server_refuses_bad_clients(
    layer: Layer, authority: ca.Authority, case: str, make_client: ClientMaker, reason: str, told: str
) -> None:
    other = ca.create_ca(TD, now=NOW)
    server_ctx = handshake.build_context(material_for(authority, workload_id(TD, "default", "server")), tls.Side.SERVER)
    client_ctx = make_client(authority, other)
    a, b = memory_stream_pair()
    client = layer(a, client_ctx, tls.Side.CLIENT)
    server_error: list[HandshakeError] = []

    async def serve() -> None:
        with pytest.raises(HandshakeError, match=f"failed: {reason}$") as exc:
            await OPENERS[layer](b, server_ctx, tls.Side.SERVER, TD)
        server_error.append(exc.value)
        await b.aclose()

    async def call() -> None:
        # The client may finish its handshake; its first read must then fail.
        with pytest.raises((trio.BrokenResourceError, HandshakeError), match=told):
            await client.do_handshake()
            await client.send_all(b"hello")
            await client.receive_some()

    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(call)
    assert server_error


@pytest.mark.parametrize(
    ("expected", "trust_domain", "match"),
    [
        (("spiffe://cluster.local/ns/default/sa/ratings",), "cluster.local", "not an expected identity"),
        ((), "other.example", "not in trust domain"),
    ],
)
async def test_client_refuses_an_unexpected_server_identity(
    layer: Layer, contexts: tuple[SSL.Context, SSL.Context], expected: tuple[str, ...], trust_domain: str, match: str
) -> None:
    client_ctx, server_ctx = contexts
    a, b = memory_stream_pair()
    server = layer(b, server_ctx, tls.Side.SERVER)
    server_saw: list[str] = []

    async def serve() -> None:
        try:
            await server.do_handshake()
            server_saw.append("done")
        except HandshakeError as exc:
            server_saw.append(exc.reason)

    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(HandshakeError, match=match):
                await OPENERS[layer](
                    a,
                    client_ctx,
                    tls.Side.CLIENT,
                    TrustDomain(trust_domain),
                    expected=tuple(parse_spiffe_id(e) for e in expected),
                )
            await a.aclose()  # what the caller does on a refusal
    # The client judged the server before sending its Finished, inside the handshake: the server never completed a
    # handshake with it, and it read why (OpenSSL's alert, from the client's verify callback).
    assert len(server_saw) == 1 and server_saw[0].endswith("alert bad certificate"), server_saw


async def test_client_refuses_a_server_from_a_foreign_ca(
    layer: Layer, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    client_ctx, _ = contexts
    other = ca.create_ca(TD, now=NOW)
    server_ctx = handshake.build_context(material_for(other, workload_id(TD, "default", "server")), tls.Side.SERVER)
    a, b = memory_stream_pair()
    server = layer(b, server_ctx, tls.Side.SERVER)
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                with pytest.raises((HandshakeError, trio.BrokenResourceError)):
                    await server.do_handshake()

            nursery.start_soon(serve)
            with pytest.raises(HandshakeError, match="certificate verify failed"):
                await OPENERS[layer](a, client_ctx, tls.Side.CLIENT, TD)
            await a.aclose()


@pytest.mark.parametrize("intermediate", [False, True], ids=["root-signed", "with-intermediate"])
def test_each_side_sends_its_leaf_and_intermediates_and_never_the_root(intermediate: bool) -> None:
    # Not OpenSSL's auto chain, which would verify our own leaf on every handshake to build a chain ending at
    # the root and send the root too.
    issuer = ca.create_ca(TD, now=NOW, intermediate=intermediate)
    client_material = material_for(issuer, workload_id(TD, "default", "client"))
    server_material = material_for(issuer, workload_id(TD, "default", "server"))
    assert len(client_material.chain) == len(server_material.chain) == (2 if intermediate else 1)
    # openssl_handshake fails unless the server took the client's certificate and Finished.
    client, server = openssl_handshake(
        handshake.build_context(client_material, tls.Side.CLIENT),
        handshake.build_context(server_material, tls.Side.SERVER),
    )
    # A client's chain includes the server's leaf; a server's leaves out the client's (OpenSSL's convention).
    sent_by_server = [c.to_cryptography() for c in client.get_peer_cert_chain() or []]
    sent_by_client = [c.to_cryptography() for c in server.get_peer_cert_chain() or []]
    assert sent_by_server == list(server_material.chain)
    assert sent_by_client == list(client_material.chain[1:])


def test_build_context_refuses_a_key_that_does_not_match(authority: ca.Authority) -> None:
    good = material_for(authority, workload_id(TD, "default", "a"))
    other = material_for(authority, workload_id(TD, "default", "b"))
    with pytest.raises(Exception, match="OpenSSL refused the credential"):
        handshake.build_context(handshake.Material(good.chain, other.key, good.roots), tls.Side.SERVER)


async def test_full_duplex_over_a_socketpair_does_not_deadlock(
    layer: Layer, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    """Both ends send a lot at once while reading: each side's receive must not wait behind its own blocked send."""
    client_ctx, server_ctx = contexts
    left, right = trio.socket.socketpair()
    for sock in (left, right):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    client = layer(trio.SocketStream(left), client_ctx, tls.Side.CLIENT)
    server = layer(trio.SocketStream(right), server_ctx, tls.Side.SERVER)
    total = 8 << 20
    block = os.urandom(1 << 16)
    got = {"client": 0, "server": 0}

    async def send(stream: tls.TLSStream) -> None:
        for _ in range(total // len(block)):
            await stream.send_all(block)
        await stream.send_eof()

    async def receive(stream: tls.TLSStream, name: str) -> None:
        while data := await stream.receive_some(65536):
            got[name] += len(data)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for stream, name in ((client, "client"), (server, "server")):
                nursery.start_soon(send, stream)
                nursery.start_soon(receive, stream, name)
    assert got == {"client": total, "server": total}
    await client.aclose()
    await server.aclose()


def test_streams_in_two_threads_keep_their_bytes_apart(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    """The data path copies through scratch buffers; two trio loops in two threads must not see each other's bytes
    (OpenSSL calls let the other thread run)."""
    client_ctx, server_ctx = contexts

    async def transfer(payload: bytes) -> bytes:
        left, right = trio.socket.socketpair()
        client = tls.TLSStream(trio.SocketStream(left), client_ctx, tls.Side.CLIENT)
        server = tls.TLSStream(trio.SocketStream(right), server_ctx, tls.Side.SERVER)
        received = bytearray()

        async def send() -> None:
            await client.send_all(payload)
            await client.send_eof()

        async def receive() -> None:
            while data := await server.receive_some(1 << 18):
                received.extend(data)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        await client.aclose()
        await server.aclose()
        return bytes(received)

    payloads = [os.urandom(4 << 20), os.urandom(4 << 20)]
    results: dict[int, bytes | BaseException] = {}

    def run(index: int) -> None:
        try:
            results[index] = trio.run(transfer, payloads[index])
        except BaseException as exc:  # handed to the test's thread below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {0: payloads[0], 1: payloads[1]}


@pytest.mark.parametrize("transport", ["memory", "socket"])
async def test_a_transport_closed_during_the_handshake_is_a_refusal(
    layer: Layer, contexts: tuple[SSL.Context, SSL.Context], transport: str
) -> None:
    """A transport closed under the handshake (trio.ClosedResourceError) is a failed handshake, which the sidecar
    refuses and logs, not an error it does not know (an internal_error with a traceback)."""
    if transport == "memory":
        a, _b = memory_stream_pair()
        stream: trio.abc.Stream = a
    else:
        left, right = trio.socket.socketpair()
        right.close()
        stream = trio.SocketStream(left)
    await stream.aclose()
    client = layer(stream, contexts[0], tls.Side.CLIENT)
    with trio.fail_after(IO), pytest.raises(HandshakeError, match="transport closed"):
        await client.do_handshake()


async def drive_raw_client(raw: SSL.Connection, transport: trio.abc.Stream) -> bytes:
    """Run a plain pyOpenSSL client's handshake over `transport` until it completes; return its last flight, unsent."""
    while True:
        try:
            raw.do_handshake()
        except SSL.WantReadError:
            await transport.send_all(raw.bio_read(1 << 16))
            raw.bio_write(await transport.receive_some(1 << 16))
            continue
        return raw.bio_read(1 << 16)


async def test_records_right_behind_the_clients_finished_are_not_lost(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    # The server's last handshake read can bring the client's first records too (one TCP segment): they must reach
    # the record layer, not stay inside OpenSSL, and be opened with the right sequence numbers.
    client_ctx, server_ctx = contexts
    a, b = memory_stream_pair()
    server = tls.TLSStream(b, server_ctx, tls.Side.SERVER)
    raw = SSL.Connection(client_ctx, None)  # stock OpenSSL records on the client side
    raw.set_connect_state()
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            finished = await drive_raw_client(raw, a)
            raw.sendall(b"first")
            raw.sendall(b"second")
            await a.send_all(finished + raw.bio_read(1 << 16))  # one transport chunk: Finished and two records
        assert await server.receive_some(1 << 16) == b"firstsecond"
        # and back: our first records come after the two session tickets OpenSSL wrote for the server
        await server.send_all(b"reply")
        data = b""
        while True:
            raw.bio_write(await a.receive_some(1 << 16))
            try:
                data += raw.recv(1 << 16)
                break
            except SSL.WantReadError:
                continue
        assert data == b"reply"


class Recording(trio.abc.HalfCloseableStream):
    """A transport that notes every write it is given (what would be one segment each on a socket)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def record_types(write: bytes) -> list[int]:
    """The outer content types of the records in one write."""
    types, pos = [], 0
    while pos < len(write):
        types.append(write[pos])
        pos += 5 + int.from_bytes(write[pos + 3 : pos + 5], "big")
    return types


async def test_a_client_that_sends_first_puts_its_finished_and_first_records_in_one_write(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    a, b = memory_stream_pair()
    wire = Recording(a)  # type: ignore[arg-type]
    client = tls.TLSStream(wire, contexts[0], tls.Side.CLIENT)
    server = tls.TLSStream(b, contexts[1], tls.Side.SERVER)
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake(send_last=False)
            assert len(wire.writes) == 1  # the ClientHello only: the Finished is held
            await client.send_all(b"request")
        assert len(wire.writes) == 2
        # its Certificate..Finished flight (under handshake keys) and the request, in one write
        assert len(record_types(wire.writes[1])) >= 4
        assert await server.receive_some() == b"request"


async def test_a_held_finished_leaves_before_the_client_waits_for_the_server(
    layer: Layer,
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    # A server-first protocol: the client only reads. Holding its Finished must not deadlock the two.
    client, server = tls_pair(contexts, memory_stream_pair(), layer)
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                await server.do_handshake()
                await server.send_all(b"220 greeting")

            nursery.start_soon(serve)
            await client.do_handshake(send_last=False)
            assert await client.receive_some() == b"220 greeting"


@pytest.mark.parametrize("first", ["data", "close"])
async def test_the_server_sends_no_session_tickets(contexts: tuple[SSL.Context, SSL.Context], first: str) -> None:
    # OpenSSL writes two TLS 1.3 tickets that name nothing we would resume; the hand-over drops them, so the
    # server's first write after its handshake flight is its first record alone (tests/integration/test_interop_*
    # read the same from s_client's side).
    a, b = memory_stream_pair()
    wire = Recording(b)  # type: ignore[arg-type]
    client = tls.TLSStream(a, contexts[0], tls.Side.CLIENT)
    server = tls.TLSStream(wire, contexts[1], tls.Side.SERVER)
    with trio.fail_after(IO):
        await handshake_both(client, server)
        assert len(wire.writes) == 1  # its first flight
        if first == "data":
            await server.send_all(b"reply")
            assert await client.receive_some() == b"reply"
        else:
            await server.send_eof()
            assert await client.receive_some() == b""
        # the reply or close_notify, one record, and no ticket before it
        assert len(wire.writes) == 2
        assert record_types(wire.writes[1]) == [23]


def secrets_of(stream: tls.TLSStream) -> tuple[bytes, bytes]:
    session = stream._session
    assert session is not None
    return session._read.secret, session._write.secret


async def test_both_traffic_secrets_are_wiped_at_close_and_after_a_refusal(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    # Closed: both secrets go with the connection, not with the object's last reference.
    client, server = tls_pair(contexts, memory_stream_pair())
    with trio.fail_after(IO):
        await handshake_both(client, server)
        assert all(secrets_of(client)) and all(secrets_of(server))
        await client.aclose()
        assert secrets_of(client) == (b"", b"")
        # Refused after the handshake (a policy denial): the alert goes out under the old key, then both are wiped.
        await server.refuse(49)
        assert secrets_of(server) == (b"", b"")
        assert server.violation == 49


async def test_a_record_violation_wipes_the_secrets_once_closed(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    a, b = memory_stream_pair()
    client, server = tls_pair(contexts, (a, b))
    with trio.fail_after(IO):
        await handshake_both(client, server)
        await client.send_all(b"ok")
        assert await server.receive_some() == b"ok"
        await a.send_all(bytes((23, 3, 3, 0x48, 0x01)))  # a record over the limit, judged from its header
        with pytest.raises(trio.BrokenResourceError, match="over the limit"):
            await server.receive_some()
        assert server.violation == 22
        await server.close_refused()
        assert secrets_of(server) == (b"", b"")


@pytest.mark.parametrize(
    ("behind", "told"),
    [
        (bytes((23, 3, 3, 0xFF, 0xFF)), "over the limit"),
        (b"\x16\x03", "record type 22"),
        (bytes((23, 3, 3, 0, 5)), "too short"),
    ],
    ids=["oversized header", "plaintext record type", "too short for a tag"],
)
async def test_a_bogus_header_right_behind_the_handshake_is_judged_at_once(
    contexts: tuple[SSL.Context, SSL.Context], behind: bytes, told: str
) -> None:
    # A header that no record may have, left behind the client's Finished, is refused on the first receive: the
    # server does not wait for bytes that would only make it whole.
    client_ctx, server_ctx = contexts
    a, b = memory_stream_pair()
    server = tls.TLSStream(b, server_ctx, tls.Side.SERVER)
    raw = SSL.Connection(client_ctx, None)
    raw.set_connect_state()
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            finished = await drive_raw_client(raw, a)
            await a.send_all(finished + behind)
        with trio.fail_after(1), pytest.raises(trio.BrokenResourceError, match=told):
            await server.receive_some()


async def test_reading_pauses_while_too_much_waits_to_be_sent(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    # Above tls.OUTGOING_LIMIT queued, the receive path drains before it reads: a peer that does not read what it
    # is owed cannot make us hold more by sending.
    a, b = lockstep_stream_pair()
    client, server = tls_pair(contexts, (a, b))
    with trio.fail_after(IO):
        await handshake_both(client, server)
        session = server._session
        assert session is not None
        session.seal(memoryview(bytes(tls.OUTGOING_LIMIT + 1)), bytearray(1 << 15))  # owed, not yet sent
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                got.append(await server.receive_some())

            nursery.start_soon(receive)
            nursery.start_soon(client.send_all, b"after")  # would be read at once, were it not for the queue
            await trio.sleep(0.1)
            assert got == []  # the receive drains first: it waits for the peer to read
            received = 0
            while received < tls.OUTGOING_LIMIT + 1:
                received += len(await client.receive_some(1 << 20))
        assert got == [b"after"] and session.queued == 0
