"""Our record layer (`records.Session` behind `tls.TLSStream`) against TLS implementations we did not write.

Every other TLS test puts our stream on both ends, where a mistake made the same way on both sides (a nonce, a
sequence number, a key derivation, a KeyUpdate) goes unseen. Here the other end is OpenSSL as others ship it, over
real TCP sockets on 127.0.0.1:

- Python's `ssl` module, which links the system's OpenSSL (another build than the one pyOpenSSL bundles), run in a
  thread with a blocking socket and a timeout;
- the `openssl s_server` / `s_client` commands, driven through their stdin; a line "K" alone makes them send a
  KeyUpdate that asks us to update too, "k" one that does not (apps/s_server.c, apps/s_client.c);
- a relay between us and a peer that flips one bit of a record's ciphertext, to show both ends refuse it and name it.

The data, half-close and KeyUpdate tests also run with OpenSSL's record layer (`sslstream.OpenSSLStream`, the
`record_layer: openssl` fallback), so both paths meet the same peers.

What this module does not test: refusals during the handshake (test_tls does; the one here is the alert that reaches
our client after its handshake), or throughput.

Two details of those peers shape the tests. s_server reads its stdin commands only without -quiet, so its stdout
carries its connection report too: our data is searched for in it. s_client reads them only when it does not ignore
EOF on stdin: -quiet turns -ign_eof on, -no_ign_eof after it turns it off again. Both judge each read from stdin by
its first bytes, so a command read together with data would swallow it or go out as data: a line is typed only after
the previous one has had its effect (the line arrived, the KeyUpdate was followed).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import trio

from mtlsmesh import handshake, records, sslstream, tls
from mtlsmesh.config import CredentialFiles
from mtlsmesh.identity import SpiffeId
from tests.pki import TD, Pki, material_for

IO = 10.0  # the whole of one test
WAIT = 5.0  # one expected effect (a line through a peer, a KeyUpdate followed)
PEER_TIMEOUT = 5.0  # every blocking call of the stdlib peer

T = TypeVar("T")

SUITES = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"]
SIDES = [tls.Side.CLIENT, tls.Side.SERVER]
# The record paths (`record_layer`): the data, half-close and KeyUpdate tests run on OpenSSL's too, the fallback.
LAYERS = {"own": tls.TLSStream, "openssl": sslstream.OpenSSLStream}
OPENERS = {tls.TLSStream: tls.open_mtls, sslstream.OpenSSLStream: sslstream.open_mtls}


@dataclass(frozen=True, slots=True)
class Ends:
    """Our SVID (in memory, for `handshake.build_context`) and the peer's (in files, for OpenSSL), from one CA."""

    ours: handshake.Material
    peer: CredentialFiles
    peer_id: SpiffeId


@pytest.fixture
def ends(pki: Pki) -> Ends:
    return Ends(material_for(pki.authority, pki.id_of("ours")), pki.issue("peer"), pki.id_of("peer"))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1 (which one connected says nothing about which end is the TLS client)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        left = socket.create_connection(listener.getsockname()[:2], timeout=PEER_TIMEOUT)
        right, _ = listener.accept()
    right.settimeout(PEER_TIMEOUT)
    return left, right


def trio_stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def open_ours(
    ends: Ends, transport: trio.abc.Stream, side: tls.Side, layer: type[tls.TLSStream] = tls.TLSStream
) -> tls.TLSStream:
    context = handshake.build_context(ends.ours, side)
    opener = OPENERS[layer]
    return await opener(transport, context, side, TD, expected=(ends.peer_id,))  # type: ignore[no-any-return]


def session_of(stream: tls.TLSStream) -> records.Session:
    session = stream._session
    assert session is not None, "the handshake is not over"
    return session


async def wait_until(done: Callable[[], bool], what: str, said: Callable[[], str] = lambda: "") -> None:
    """Poll until `done()`, at most WAIT seconds; the failure names what did not happen (and what the peer said)."""
    with trio.move_on_after(WAIT):
        while not done():
            await trio.sleep(0.01)
        return
    pytest.fail(f"no {what} within {WAIT}s{said()}")


# --- the stdlib ssl peer ---------------------------------------------------------------------------------------


def stdlib_context(files: CredentialFiles, *, server: bool) -> ssl.SSLContext:
    """TLS 1.3 only, mutual auth against our bundle, ALPN mtlsmesh: what a sidecar would be to it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(files.bundle)
    ctx.check_hostname = False  # an SVID names a SPIFFE ID, not a host; the chain is still verified
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([tls.ALPN.decode()])
    return ctx


def recv_exactly(conn: ssl.SSLSocket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"stdlib peer: end of stream after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def echo(total: int) -> Callable[[ssl.SSLSocket], bool]:
    """A peer that echoes `total` bytes as they come, then reads our close_notify (True when recv saw it as the
    end of the stream) and sends its own."""

    def script(conn: ssl.SSLSocket) -> bool:
        got = 0
        while got < total:
            data = conn.recv(65536)
            if not data:
                raise AssertionError(f"stdlib peer: end of stream after {got} of {total} bytes")
            conn.sendall(data)
            got += len(data)
        at_end = conn.recv(1) == b""
        conn.unwrap()
        return at_end

    return script


class Corrupter:
    """Cuts one direction of a relay into records and, once armed, flips a bit in the middle of the next
    application-data record's ciphertext."""

    def __init__(self) -> None:
        self.armed = False
        self.flipped = 0
        self._pending = bytearray()

    def feed(self, data: bytes) -> bytes:
        """What to forward of what came so far: whole records only, the partial one kept for later."""
        self._pending += data
        out = bytearray()
        while len(self._pending) >= records.HEADER_SIZE:
            length = int.from_bytes(self._pending[3:5], "big")
            end = records.HEADER_SIZE + length
            if len(self._pending) < end:
                break
            record = bytearray(self._pending[:end])
            del self._pending[:end]
            if self.armed and not self.flipped and record[0] == records.APPLICATION_DATA:
                record[records.HEADER_SIZE + length // 2] ^= 0x01
                self.flipped += 1
            out += record
        return bytes(out)


async def forward(source: trio.SocketStream, sink: trio.SocketStream, corrupter: Corrupter | None) -> None:
    try:
        while data := await source.receive_some(65536):
            out = corrupter.feed(data) if corrupter is not None else data
            if out:
                await sink.send_all(out)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one end gave up (after a refused record): the other sees the connection end


async def relay(a: trio.SocketStream, b: trio.SocketStream, a_to_b: Corrupter | None, b_to_a: Corrupter | None) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward, a, b, a_to_b)
            nursery.start_soon(forward, b, a, b_to_a)
    finally:
        await a.aclose()
        await b.aclose()


async def with_stdlib_peer(
    ends: Ends,
    our_side: tls.Side,
    peer_script: Callable[[ssl.SSLSocket], T],
    our_script: Callable[[tls.TLSStream], Awaitable[None]],
    *,
    to_ours: Corrupter | None = None,
    to_peer: Corrupter | None = None,
    layer: type[tls.TLSStream] = tls.TLSStream,
) -> T:
    """Run `peer_script` on a stdlib `ssl` socket in a thread and `our_script` on our stream, over TCP on loopback
    (through a relay when a corrupter is given); returns what the peer script returned."""
    peer_server = our_side is tls.Side.CLIENT
    ctx = stdlib_context(ends.peer, server=peer_server)
    ours_sock, theirs = tcp_pair()
    relayed: tuple[socket.socket, socket.socket] | None = None
    if to_ours is not None or to_peer is not None:
        # us <-> (relay's end facing us ... relay's end facing the peer) <-> the peer
        facing_us = theirs
        facing_peer, theirs = tcp_pair()
        relayed = (facing_peer, facing_us)
    result: list[T] = []

    def peer() -> None:
        with ctx.wrap_socket(theirs, server_side=peer_server) as conn:
            result.append(peer_script(conn))

    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, peer)
            if relayed is not None:
                facing_peer, facing_us = relayed
                nursery.start_soon(relay, trio_stream(facing_peer), trio_stream(facing_us), to_ours, to_peer)
            stream = await open_ours(ends, trio_stream(ours_sock), our_side, layer)
            async with stream:
                await our_script(stream)
    assert result, "the stdlib peer returned nothing"
    return result[0]


# --- stdlib ssl: data, half-close, tickets, KeyUpdate ------------------------------------------------------------


async def receive_exactly(stream: tls.TLSStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(1 << 20)
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def send_and_receive_echo(stream: tls.TLSStream, sends: list[bytes]) -> bytes:
    """Send each piece with its own send_all while reading the echo at the same time; returns the echo."""
    echoed: list[bytes] = []

    async def send() -> None:
        for piece in sends:
            await stream.send_all(piece)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        echoed.append(await receive_exactly(stream, sum(map(len, sends))))
    return echoed[0]


async def close_both_ways(stream: tls.TLSStream) -> None:
    await stream.send_eof()
    assert await stream.receive_some() == b"", "the peer's close_notify did not end our stream"


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("our_side", SIDES, ids=lambda s: f"ours-{s.value}")
@pytest.mark.parametrize("size", [1, records.MAX_PLAINTEXT, records.MAX_PLAINTEXT + 1, 300 * 1024])
async def test_stdlib_peer_echoes_what_we_send(ends: Ends, our_side: tls.Side, size: int, layer: type) -> None:
    """Our records decrypt at the system OpenSSL, and its records at ours: one byte, exactly one full record, one
    byte over (a second record), and many records in both directions at once."""
    payload = os.urandom(size)

    async def ours(stream: tls.TLSStream) -> None:
        assert stream.negotiated[0] == "TLSv1.3"
        assert await send_and_receive_echo(stream, [payload]) == payload
        await close_both_ways(stream)

    assert await with_stdlib_peer(ends, our_side, echo(size), ours, layer=layer), "the peer saw no close_notify"


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("our_side", SIDES, ids=lambda s: f"ours-{s.value}")
async def test_stdlib_peer_goes_on_sending_after_our_close_notify(ends: Ends, our_side: tls.Side, layer: type) -> None:
    """Our close_notify is an end of stream to OpenSSL, which may then still send (RFC 8446 §6.1) and close."""
    reply = b"sent after your close_notify " * 1000  # two records

    def peer(conn: ssl.SSLSocket) -> tuple[bytes, bytes]:
        request = recv_exactly(conn, len(b"request"))
        after = conn.recv(1)  # b"": our close_notify
        conn.sendall(reply)
        conn.unwrap()
        return request, after

    async def ours(stream: tls.TLSStream) -> None:
        await stream.send_all(b"request")
        await stream.send_eof()
        assert await receive_exactly(stream, len(reply)) == reply
        assert await stream.receive_some() == b""
        assert await stream.receive_some() == b""  # and stays ended

    assert await with_stdlib_peer(ends, our_side, peer, ours, layer=layer) == (b"request", b"")


async def test_stdlib_client_gets_no_ticket_and_reads_our_first_records(ends: Ends) -> None:
    """As a server we drop the NewSessionTickets OpenSSL wrote (they name nothing we would resume): our first record
    is sequence number 0 of our application key, the client opens it (server-first protocols write at once), and
    the client never saw a ticket."""
    greeting = os.urandom(2 * records.MAX_PLAINTEXT + 7)
    first_seq: list[int] = []

    def peer(conn: ssl.SSLSocket) -> tuple[bytes, bool]:
        data = recv_exactly(conn, len(greeting))
        conn.sendall(b"thanks")
        assert conn.recv(1) == b""
        session = conn.session
        conn.unwrap()
        return data, session is not None and session.has_ticket

    async def ours(stream: tls.TLSStream) -> None:
        first_seq.append(session_of(stream)._write.seq)
        await stream.send_all(greeting)
        assert await receive_exactly(stream, len(b"thanks")) == b"thanks"
        await close_both_ways(stream)

    assert await with_stdlib_peer(ends, tls.Side.SERVER, peer, ours) == (greeting, False)
    assert first_seq == [0]


@pytest.mark.parametrize("our_side", SIDES, ids=lambda s: f"ours-{s.value}")
async def test_stdlib_peer_follows_our_write_key_rotation(ends: Ends, our_side: tls.Side) -> None:
    """With a key update every 3 records, 20 single records and one 5-record send: OpenSSL follows each of our
    KeyUpdates (the records after them decrypt only under the next key) and echoes everything intact."""
    sizes = [1 + (i * 4099) % records.MAX_PLAINTEXT for i in range(20)] + [5 * records.MAX_PLAINTEXT]
    sends = [os.urandom(n) for n in sizes]
    total = sum(sizes)
    generations: list[bytes] = []

    async def ours(stream: tls.TLSStream) -> None:
        session = session_of(stream)
        session.key_update_after = 3
        generations.append(session._write.secret)
        assert await send_and_receive_echo(stream, sends) == b"".join(sends)
        generations.append(session._write.secret)
        await close_both_ways(stream)

    assert await with_stdlib_peer(ends, our_side, echo(total), ours)
    assert generations[0] != generations[1], "our write key never moved"


@pytest.mark.parametrize("our_side", SIDES, ids=lambda s: f"ours-{s.value}")
async def test_stdlib_peer_answers_our_key_update_request(ends: Ends, our_side: tls.Side) -> None:
    """A KeyUpdate asking OpenSSL to update too: it answers with its own before its next record, which we must
    follow to read the echo; then both sides go on under the new keys."""

    async def ours(stream: tls.TLSStream) -> None:
        session = session_of(stream)
        assert await send_and_receive_echo(stream, [b"before"]) == b"before"  # the server's tickets are behind us
        read_before, write_before = session._read.secret, session._write.secret
        session.request_key_update()
        assert await send_and_receive_echo(stream, [b"after our request"]) == b"after our request"
        assert session._write.secret != write_before
        assert session._read.secret != read_before, "the peer's answering KeyUpdate was not followed"
        assert await send_and_receive_echo(stream, [b"and on"]) == b"and on"
        await close_both_ways(stream)

    total = len(b"before") + len(b"after our request") + len(b"and on")
    assert await with_stdlib_peer(ends, our_side, echo(total), ours)


# --- a corrupted record ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("our_side", SIDES, ids=lambda s: f"ours-{s.value}")
@pytest.mark.parametrize(
    ("corrupted", "our_error", "peer_reason"),
    [
        # The peer's record is damaged: we refuse it and tell the peer why with a bad_record_mac alert.
        ("to-ours", r"^record failed authentication$", "SSLV3_ALERT_BAD_RECORD_MAC"),
        # Our record is damaged: OpenSSL refuses it and its bad_record_mac alert is what we report.
        ("to-peer", r"^peer sent alert bad record mac$", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"),
    ],
)
async def test_a_corrupted_record_is_refused_and_named_on_both_ends(
    ends: Ends, our_side: tls.Side, corrupted: str, our_error: str, peer_reason: str
) -> None:
    to_ours, to_peer = Corrupter(), Corrupter()
    armed = to_ours if corrupted == "to-ours" else to_peer

    def peer(conn: ssl.SSLSocket) -> str:
        conn.sendall(b"first")
        try:
            assert recv_exactly(conn, 3) == b"ack"
            conn.sendall(b"second")
            conn.recv(100)
        except ssl.SSLError as exc:
            return str(exc.reason)
        return "no error"

    async def ours(stream: tls.TLSStream) -> None:
        assert await receive_exactly(stream, len(b"first")) == b"first"
        armed.armed = True  # the next application record in that direction: "ack" to the peer, "second" to us
        await stream.send_all(b"ack")
        with pytest.raises(trio.BrokenResourceError, match=our_error):
            await stream.receive_some()

    assert await with_stdlib_peer(ends, our_side, peer, ours, to_ours=to_ours, to_peer=to_peer) == peer_reason
    assert armed.flipped == 1


# --- the openssl command: every TLS 1.3 suite, KeyUpdates typed on its stdin -------------------------------------


@dataclass
class Tool:
    """An `openssl s_server`/`s_client` this test started: its stdin, and everything it has printed so far."""

    process: trio.Process
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    async def collect(self, stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
        assert stream is not None
        while data := await stream.receive_some(65536):
            into += data

    async def type_line(self, line: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line + b"\n")

    def said(self) -> str:
        out, err = bytes(self.stdout[-2000:]), bytes(self.stderr[-2000:])
        return f"; openssl stdout: {out!r}; stderr: {err!r}"


async def with_openssl(args: list[str], body: Callable[[Tool], Awaitable[None]]) -> Tool:
    """Start `openssl ARGS` with pipes, run `body`, and end the process by its PID if it has not ended by itself."""
    process = await trio.lowlevel.open_process(
        ["openssl", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    tool = Tool(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tool.collect, process.stdout, tool.stdout)
            nursery.start_soon(tool.collect, process.stderr, tool.stderr)
            try:
                await body(tool)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(WAIT):
            await process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()
    return tool


def credential_args(files: CredentialFiles) -> list[str]:
    return ["-cert", files.cert, "-key", files.key, "-CAfile", files.bundle, "-verify_return_error"]


@dataclass
class Inbox:
    """What our stream has received so far, read by a task of its own while the test drives the peer."""

    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    error: BaseException | None = None

    async def run(self, stream: tls.TLSStream) -> None:
        try:
            while chunk := await stream.receive_some():
                self.data += chunk
            self.ended = True
        except trio.BrokenResourceError as exc:
            self.error = exc


async def exchange(stream: tls.TLSStream, tool: Tool, inbox: Inbox, n: int) -> None:
    """One line each way, each waited for: ours shows up in the tool's stdout (it decrypted it), the line typed on
    its stdin arrives at our stream (we decrypted it). Lines start with letters neither tool takes as a command."""
    ours, theirs = b"from us %d\n" % n, b"from openssl %d" % n
    await stream.send_all(ours)
    await wait_until(lambda: ours in tool.stdout, f"line {ours!r} at openssl", tool.said)
    await tool.type_line(theirs)
    await wait_until(lambda: theirs + b"\n" in inbox.data, f"line {theirs!r} at our stream", tool.said)


async def drive_key_updates(stream: tls.TLSStream, tool: Tool, inbox: Inbox) -> None:
    """Data both ways around each kind of KeyUpdate: the tool's "K" (we must follow and answer), its "k" (we
    follow only), and our own request (it answers before its next record). With OpenSSL's record layer, whose keys
    are not ours to see, the data around the tool's two kinds."""
    if type(stream) is sslstream.OpenSSLStream:
        await exchange(stream, tool, inbox, 1)
        await tool.type_line(b"K")
        await exchange(stream, tool, inbox, 2)  # its record after "K" opens here, ours (after the answer) there
        await tool.type_line(b"k")
        await exchange(stream, tool, inbox, 3)
        assert inbox.error is None
        return
    session = session_of(stream)
    await exchange(stream, tool, inbox, 1)

    read, write = session._read.secret, session._write.secret
    await tool.type_line(b"K")
    await wait_until(
        lambda: session._read.secret != read and session._write.secret != write and not session.outgoing,
        "KeyUpdate followed and answered",
        tool.said,
    )
    await exchange(stream, tool, inbox, 2)  # its record after "K" opens here, ours after our answer opens there

    read, write = session._read.secret, session._write.secret
    await tool.type_line(b"k")
    await wait_until(lambda: session._read.secret != read, "KeyUpdate followed", tool.said)
    assert session._write.secret == write, "we answered a KeyUpdate that asked for no answer"
    await exchange(stream, tool, inbox, 3)

    read = session._read.secret
    session.request_key_update()
    await exchange(stream, tool, inbox, 4)  # our request goes out before our line; its answer before its line
    assert session._read.secret != read, "openssl did not answer our KeyUpdate request"
    assert inbox.error is None


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("suite", SUITES)
async def test_openssl_s_server_with_every_suite_and_key_update(ends: Ends, suite: str, layer: type) -> None:
    args = ["s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-tls1_3", "-ciphersuites", suite]
    args += [*credential_args(ends.peer), "-Verify", "1", "-alpn", tls.ALPN.decode()]
    inbox = Inbox()

    async def body(tool: Tool) -> None:
        accepting = re.compile(rb"^ACCEPT 127\.0\.0\.1:(\d+)$", re.MULTILINE)
        await wait_until(lambda: accepting.search(tool.stdout) is not None, "listening s_server", tool.said)
        match = accepting.search(tool.stdout)
        assert match is not None
        transport = await trio.open_tcp_stream("127.0.0.1", int(match.group(1)))
        async with await open_ours(ends, transport, tls.Side.CLIENT, layer) as stream, trio.open_nursery() as nursery:
            assert stream.negotiated[:2] == ("TLSv1.3", suite)
            nursery.start_soon(inbox.run, stream)
            await drive_key_updates(stream, tool, inbox)
            # Our close_notify: s_server reads it as the end ("DONE") and closes the connection without its own.
            await stream.send_eof()
            await wait_until(lambda: b"\nDONE\n" in tool.stdout, "end of stream at s_server", tool.said)
            await wait_until(lambda: inbox.error is not None or inbox.ended, "end of our stream", tool.said)

    with trio.fail_after(IO):
        await with_openssl(args, body)


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("suite", SUITES)
async def test_openssl_s_client_with_every_suite_and_key_update(ends: Ends, suite: str, layer: type) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ciphersuites", suite]
    args += [*credential_args(ends.peer), "-alpn", tls.ALPN.decode(), "-quiet", "-no_ign_eof"]
    inbox = Inbox()

    async def body(tool: Tool) -> None:
        transport = await listeners[0].accept()
        async with await open_ours(ends, transport, tls.Side.SERVER, layer) as stream, trio.open_nursery() as nursery:
            assert stream.negotiated[:2] == ("TLSv1.3", suite)
            nursery.start_soon(inbox.run, stream)
            await drive_key_updates(stream, tool, inbox)
            # Our close_notify: s_client reads it as the end and sends its own, which ends our stream cleanly.
            await stream.send_eof()
            await wait_until(lambda: inbox.ended or inbox.error is not None, "end of our stream", tool.said)
            assert inbox.ended, f"not a clean end: {inbox.error}"

    try:
        with trio.fail_after(IO):
            await with_openssl(args, body)
    finally:
        await trio.aclose_forcefully(listeners[0])


async def test_a_stdlib_server_refusing_our_certificate_is_heard_after_our_handshake(ends: Ends, pki: Pki) -> None:
    """In TLS 1.3 our client is done before the server has judged our certificate; OpenSSL's refusal then comes as
    an alert under its application key, which our record layer must open to give the reason."""
    stranger = Pki(pki.root / "other-ca").issue("stranger")  # the server trusts another CA only
    ctx = stdlib_context(CredentialFiles(ends.peer.cert, ends.peer.key, stranger.bundle), server=True)
    ours_sock, theirs = tcp_pair()
    refusals: list[str] = []

    def peer() -> None:
        with pytest.raises(ssl.SSLError) as caught:
            ctx.wrap_socket(theirs, server_side=True)
        theirs.close()
        refusals.append(str(caught.value.reason))

    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, peer)
            async with await open_ours(ends, trio_stream(ours_sock), tls.Side.CLIENT) as stream:
                with pytest.raises(trio.BrokenResourceError, match=r"^peer sent alert unknown ca$"):
                    await stream.receive_some()
    assert refusals == ["CERTIFICATE_VERIFY_FAILED"]
