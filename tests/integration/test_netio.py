"""The socket layer on real loopback sockets: the original destination, dialing, keepalive, the abortive close, the
plain accept, and the raw reads and writes the data path makes without trio's checkpoint.

The raw calls promise two things the relay's fairness is built on: they take no checkpoint when the socket is
ready (so no other task runs meanwhile), and they say whether they waited. `yielded_during` checks the first.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import TypeVar

import pytest
import trio
from trio.testing import memory_stream_pair

from mtlsmesh import ca, handshake, netio, tls
from mtlsmesh.identity import workload_id
from tests.pki import TD, material_for

LOOPBACK = "127.0.0.1"
IO = 10.0
HAVE_IPV6 = socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")
IPV6_ONLY = pytest.mark.skipif(not HAVE_IPV6, reason="needs IPv6 on loopback")


def _local_ipv6() -> set[str]:
    """The IPv6 addresses configured here, as the 32 hex digits of /proc/net/if_inet6."""
    if not HAVE_IPV6:
        return set()
    with open("/proc/net/if_inet6") as table:
        return {line.split()[0] for line in table if line.strip()}


ADDRESS_6_IS_LOCAL = f"{6:032x}" in _local_ipv6()  # ::6 on lo: the capture's set-up adds it

T = TypeVar("T")


class _Steps(trio.abc.Instrument):
    """Counts the ends of one task's steps: a task's step ends exactly when it yields to the scheduler."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.ended = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.ended += 1


async def yielded_during(call: Awaitable[T]) -> tuple[T, bool]:
    """Await `call`; also say whether it went through the scheduler (False: it took no checkpoint, so no other task
    ran meanwhile)."""
    steps = _Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        result = await call
    finally:
        trio.lowlevel.remove_instrument(steps)
    return result, steps.ended > 0


async def plain_recv(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """A stdlib recv() on `stream`'s socket once it is readable: what a peer that is no trio stream sees (an RST is a
    ConnectionResetError, not trio's BrokenResourceError)."""
    await trio.lowlevel.wait_readable(stream.socket)
    with socket.socket(fileno=os.dup(stream.socket.fileno())) as sock:
        return sock.recv(max_bytes)


async def tcp_pair(
    family: socket.AddressFamily = socket.AF_INET, *, buffer: int | None = None
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection (dialer, accepted); `buffer`: small kernel buffers on both."""
    host = LOOPBACK if family == socket.AF_INET else "::1"
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    dialer = trio.socket.socket(family, socket.SOCK_STREAM)
    with listener:
        for sock in (listener, dialer):
            if buffer is not None:  # before connect: the window is agreed on at the handshake
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        await listener.bind((host, 0))
        listener.listen(1)
        await dialer.connect(listener.getsockname()[:2])
        accepted, _ = await listener.accept()
    return trio.SocketStream(dialer), trio.SocketStream(accepted)


@asynccontextmanager
async def pair(
    family: socket.AddressFamily = socket.AF_INET, *, buffer: int | None = None
) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """`tcp_pair`, closed at the end; what the test does with it must be over within IO seconds."""
    a, b = await tcp_pair(family, buffer=buffer)
    try:
        with trio.fail_after(IO):
            yield a, b
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)


@contextmanager
def listening(host: str = LOOPBACK, backlog: int = 8) -> Iterator[socket.socket]:
    """A plain listening socket that accepts only when the test says so."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        sock.listen(backlog)
        yield sock


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the original destination -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "client"),
    [
        ("127.0.0.1", "127.0.0.1"),
        pytest.param("::1", "::1", marks=IPV6_ONLY),
        # A dual-stack listener accepting an IPv4 client: the connection's NAT entry is in the IPv4 table.
        pytest.param("::", "127.0.0.1", marks=IPV6_ONLY, id="ipv4-on-dual-stack"),
    ],
)
async def test_original_dst_of_a_connection_no_rule_redirected(listen: str, client: str) -> None:
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    if listen == "::":
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    with listener:
        await listener.bind((listen, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        dialed = await trio.open_tcp_stream(client, port)
        accepted, _ = await listener.accept()
    async with trio.SocketStream(accepted) as stream, dialed:
        assert netio.local_ip(stream.socket) == ipaddress.ip_address(client)  # ::ffff:127.0.0.1 is IPv4
        try:
            got = netio.original_dst(stream)
        except OSError as exc:  # no conntrack entry: the usual answer on a host with no NAT rules loaded
            assert exc.errno in (errno.ENOENT, errno.ENOPROTOOPT), exc
        else:  # conntrack tracks the connection: its "original" destination is where it really went
            assert got == (ipaddress.ip_address(client), port)


# --- dial ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host"),
    [("127.0.0.1", "127.0.0.1"), pytest.param("::1", "::1", marks=IPV6_ONLY), ("127.0.0.1", "localhost")],
)
async def test_dial_connects_to_a_literal_or_a_name(listen: str, host: str) -> None:
    with listening(listen) as server:
        with trio.fail_after(IO):
            stream = await netio.dial(host, server.getsockname()[1], timeout=IO)
        accepted, peer = server.accept()
        with accepted:
            async with stream:
                assert stream.socket.getpeername()[:2] == server.getsockname()[:2]
                assert peer[:2] == stream.socket.getsockname()[:2]
                assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                await stream.send_all(b"hello")
                assert accepted.recv(16) == b"hello"


async def test_dial_to_a_port_nobody_listens_on_is_refused_and_leaks_nothing() -> None:
    # A bound socket that does not listen holds the port: a connection to it is answered with an RST.
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        port = holder.getsockname()[1]
        before = open_fds()
        refused = rf"connecting to \('127.0.0.1', {port}\): Connection refused"
        with trio.fail_after(IO), pytest.raises(ConnectionRefusedError, match=refused):
            await netio.dial(LOOPBACK, port, timeout=IO)
        assert open_fds() == before
        with pytest.raises(ConnectionRefusedError) as caught:
            await netio.dial(LOOPBACK, port, timeout=IO)
    assert netio.describe_error(caught.value) == "Connection refused"


@pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN")
async def test_a_transparent_dial_binds_the_callers_address_and_carries_the_mark() -> None:
    # 127.0.0.9 stands for the caller: a TPROXY dial binds an address of the caller's, marked for policy routing.
    with listening(LOOPBACK) as server:
        source = netio.TransparentSource(ipaddress.ip_address("127.0.0.9"), 1337)
        with trio.fail_after(IO):
            stream = await netio.dial(LOOPBACK, server.getsockname()[1], timeout=IO, source=source)
        accepted, peer = server.accept()
        with accepted:
            async with stream:
                assert peer[0] == "127.0.0.9"
                assert stream.socket.getsockopt(socket.SOL_SOCKET, netio.SO_MARK) == 1337
                assert stream.socket.getsockopt(netio.SOL_IP, netio.IP_TRANSPARENT) == 1
                assert netio.transparent_dst(stream) == (ipaddress.ip_address("127.0.0.9"), peer[1])
    before = open_fds()
    v6_source = netio.TransparentSource(ipaddress.ip_address("2001:db8::1"), 1337)
    with pytest.raises(OSError, match="cannot dial an IPv4 app from 2001:db8::1"):
        await netio.dial(LOOPBACK, 9, timeout=IO, source=v6_source)
    assert open_fds() == before  # the refused socket was closed


async def test_dial_gives_up_after_its_timeout() -> None:
    # A listener with backlog 0 takes one connection that nobody accepts; after that the kernel drops every SYN,
    # so a connect neither succeeds nor fails: it waits for the dial's own deadline.
    with listening(backlog=0) as server:
        port = server.getsockname()[1]
        filled: list[trio.SocketStream] = []
        try:
            with trio.fail_after(IO):
                for _ in range(4):
                    try:
                        filled.append(await netio.dial(LOOPBACK, port, timeout=0.3))
                    except trio.TooSlowError:
                        break
                else:
                    pytest.fail("the full backlog kept accepting connections")
                before = open_fds()
                started = trio.current_time()
                with pytest.raises(trio.TooSlowError):
                    await netio.dial(LOOPBACK, port, timeout=0.3)
                elapsed = trio.current_time() - started
            assert 0.25 < elapsed < 2.0
            assert open_fds() == before  # the half-open socket was closed
        finally:
            for stream in filled:
                await trio.aclose_forcefully(stream)


async def test_a_cancelled_dial_is_a_cancellation_not_a_timeout() -> None:
    with listening(backlog=0) as server:
        port = server.getsockname()[1]
        first = await netio.dial(LOOPBACK, port, timeout=IO)  # fills the backlog: the next connect hangs
        try:
            with trio.move_on_after(0.2) as outer:
                await netio.dial(LOOPBACK, port, timeout=IO)  # the outer scope ends first
            assert outer.cancelled_caught
        finally:
            await trio.aclose_forcefully(first)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("127.0.0.6", "127.0.0.6"),  # all of 127/8 is on lo
        ("127.0.0.7", "127.0.0.7"),
        ("::6", "127.0.0.1"),  # an IPv6 source for an IPv4 destination: the kernel picks
    ],
)
async def test_dial_binds_the_source_address(source: str, expected: str) -> None:
    with listening() as server:
        port = server.getsockname()[1]
        with trio.fail_after(IO):
            stream = await netio.dial(LOOPBACK, port, timeout=IO, source=ipaddress.ip_address(source))
        accepted, peer = server.accept()
        accepted.close()
        async with stream:
            assert stream.socket.getsockname()[0] == expected
            assert peer[0] == expected
            assert stream.socket.getsockname()[1] not in (0, port)  # the port is the kernel's


@IPV6_ONLY
async def test_dial_to_ipv6_from_127_0_0_6_uses_its_twin_6() -> None:
    """::6 sits on no interface unless the capture set-up added it to lo: the bind needs FREEBIND, which a plain
    bind shows. Without ::6 on lo the SYN leaves from ::6 and the answer has nowhere to go (the kernel never
    sends a loopback source out of another interface), so the dial times out rather than failing to bind."""
    with listening("::1") as server:
        port = server.getsockname()[1]
        source = ipaddress.IPv4Address("127.0.0.6")
        if ADDRESS_6_IS_LOCAL:
            stream = await netio.dial("::1", port, timeout=IO, source=source)
            accepted, peer = server.accept()
            accepted.close()
            async with stream:
                assert stream.socket.getsockname()[0] == peer[0] == "::6"
            return
        with socket.socket(socket.AF_INET6) as plain, pytest.raises(OSError) as refused:
            plain.bind(("::6", 0))
        assert refused.value.errno == errno.EADDRNOTAVAIL
        with trio.fail_after(IO), pytest.raises(trio.TooSlowError):
            await netio.dial("::1", port, timeout=0.3, source=source)


def _nonlocal_bind() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as flag:
            return flag.read().strip() != "0"
    except OSError:
        return False


@pytest.mark.skipif(_nonlocal_bind(), reason="ip_nonlocal_bind is on: any source address binds")
async def test_dial_from_an_address_this_host_does_not_have_fails_to_bind() -> None:
    source = ipaddress.ip_address("203.0.113.77")  # TEST-NET-3: on no interface; bind() refuses it, nothing is sent
    with (
        listening() as server,
        trio.fail_after(IO),
        pytest.raises(OSError, match="Cannot assign requested address") as caught,
    ):
        await netio.dial(LOOPBACK, server.getsockname()[1], timeout=IO, source=source)
    assert caught.value.errno == errno.EADDRNOTAVAIL


# --- keepalive and the abortive close -----------------------------------------------------------------------

KEEPALIVE = {
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): 1,
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): netio.KEEPALIVE_IDLE,
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): netio.KEEPALIVE_INTERVAL,
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): netio.KEEPALIVE_COUNT,
}


@pytest.mark.parametrize("kind", ["stdlib", "trio"])
async def test_set_keepalive_values_read_back(kind: str) -> None:
    sock = socket.socket() if kind == "stdlib" else trio.socket.socket()
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0  # off until asked
        netio.set_keepalive(sock)
        assert {key: sock.getsockopt(*key) for key in KEEPALIVE} == KEEPALIVE
    # a dead peer is found within about two minutes
    assert netio.KEEPALIVE_IDLE + netio.KEEPALIVE_INTERVAL * netio.KEEPALIVE_COUNT <= 120


async def test_abort_close_sends_a_reset() -> None:
    async with pair() as (ours, theirs):
        await ours.send_all(b"before")
        assert await plain_recv(theirs, 100) == b"before"
        await netio.abort_close(ours)
        assert ours.socket.fileno() == -1
        with pytest.raises(ConnectionResetError):
            await plain_recv(theirs, 100)  # a graceful close would read b"" here
        await netio.abort_close(ours)  # closed already: nothing to do, no error


async def tls_over(a: trio.SocketStream, b: trio.SocketStream) -> tuple[tls.TLSStream, tls.TLSStream]:
    """A TLS client over `a` and server over `b`, both handshaken, SVIDs from a fresh CA."""
    authority = ca.create_ca(TD, now=datetime.now(UTC))
    client_ctx = handshake.build_context(material_for(authority, workload_id(TD, "default", "c")), tls.Side.CLIENT)
    server_ctx = handshake.build_context(material_for(authority, workload_id(TD, "default", "s")), tls.Side.SERVER)
    client = tls.TLSStream(a, client_ctx, tls.Side.CLIENT)
    server = tls.TLSStream(b, server_ctx, tls.Side.SERVER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def test_abort_close_of_a_tls_stream_resets_without_a_close_notify() -> None:
    async with pair() as (a, b):
        client, _server = await tls_over(a, b)
        assert netio.socket_of(client) is a.socket
        await netio.abort_close(client)
        assert a.socket.fileno() == -1
        with pytest.raises(ConnectionResetError):
            await plain_recv(b, 100)  # no close_notify record came first: the reset is all the peer sees


async def test_abort_close_without_a_socket_underneath_just_closes() -> None:
    ours, theirs = memory_stream_pair()
    assert netio.socket_of(ours) is None
    await netio.abort_close(ours)
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")
    await theirs.aclose()


async def test_abort_close_of_a_socket_that_never_connected() -> None:
    stream = trio.SocketStream(trio.socket.socket())
    await netio.abort_close(stream)
    assert stream.socket.fileno() == -1


class Wrapper(trio.abc.Stream):
    """A stream over another one (as TLS is), exposing it as `transport_stream`."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.transport_stream = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


async def test_socket_of_looks_through_wrappers_but_not_forever() -> None:
    async with pair() as (a, _b):
        stream: trio.abc.Stream = a
        for _ in range(5):
            stream = Wrapper(stream)
        assert netio.socket_of(stream) is a.socket
        looped = Wrapper(a)
        looped.transport_stream = looped  # a wrapper around itself: no socket, and no endless walk
        assert netio.socket_of(looped) is None


# --- accepting without trio's checkpoint --------------------------------------------------------------------


async def test_accept_ready_on_a_closed_listener_is_a_closed_resource() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    raw = netio.listening_socket(listener)
    try:
        await listener.aclose()
        with pytest.raises(trio.ClosedResourceError, match="the listener was closed"):
            netio.accept_ready(raw)
    finally:
        raw.detach()


async def test_accept_ready_reports_running_out_of_descriptors_and_keeps_the_connection() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    raw = netio.listening_socket(listener)
    client = socket.socket()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        client.connect(listener.socket.getsockname())  # waits in the backlog
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no descriptor left for accept()
        try:
            with pytest.raises(OSError, match="Too many open files") as caught:
                netio.accept_ready(raw)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert caught.value.errno == errno.EMFILE
        ready = netio.accept_ready(raw)  # still there, taken as soon as a descriptor is free
        assert ready is not None
        stream, peer = ready
        assert peer == client.getsockname()
        await stream.aclose()
    finally:
        client.close()
        raw.detach()
        await listener.aclose()


# --- raw reads and writes -----------------------------------------------------------------------------------


async def test_read_ready_never_waits() -> None:
    async with pair() as (a, b):
        assert netio.read_ready(b, 100) is None  # nothing has arrived yet
        await a.send_all(b"0123456789")
        await trio.lowlevel.wait_readable(b.socket)
        assert netio.read_ready(b, 4) == b"0123"  # up to max_bytes; the rest stays for the next read
        assert netio.read_ready(b, 100) == b"456789"
        assert netio.read_ready(b, 100) is None
        await a.send_eof()
        await trio.lowlevel.wait_readable(b.socket)
        assert netio.read_ready(b, 100) == b""  # EOF


async def test_receive_raw_takes_what_is_there_without_a_checkpoint() -> None:
    async with pair() as (a, b):
        await a.send_all(b"ready")
        await trio.lowlevel.wait_readable(b.socket)
        (data, waited), yielded = await yielded_during(netio.receive_raw(b, 100))
        assert (data, waited, yielded) == (b"ready", False, False)

        await a.send_all(b"ready again")
        await trio.lowlevel.wait_readable(b.socket)
        # After a short read the caller asks to wait first: a trip through the scheduler even with data there.
        (data, waited), yielded = await yielded_during(netio.receive_raw(b, 100, wait_first=True))
        assert (data, waited, yielded) == (b"ready again", True, True)

        await a.send_eof()
        await trio.lowlevel.wait_readable(b.socket)
        assert await netio.receive_raw(b, 100) == (b"", False)


async def test_receive_raw_waits_when_nothing_has_arrived() -> None:
    async with pair() as (a, b), trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.sleep(0.05)
            await a.send_all(b"late")

        nursery.start_soon(later)
        assert await netio.receive_raw(b, 100) == (b"late", True)


async def test_send_raw_takes_no_checkpoint_when_the_socket_takes_everything() -> None:
    async with pair() as (a, b):
        calls: list[None] = []
        waited, yielded = await yielded_during(netio.send_raw(a, b"fits at once", lambda: calls.append(None)))
        assert (waited, yielded, calls) == (False, False, [])  # progress is reported only after a wait
        assert await b.receive_some(100) == b"fits at once"


async def test_send_raw_waits_for_a_slow_reader_and_reports_progress() -> None:
    payload = os.urandom(512 * 1024)
    async with pair(buffer=4096) as (a, b):
        calls: list[float] = []
        received = bytearray()

        async def slow_reader() -> None:
            while len(received) < len(payload):
                received.extend(await b.receive_some(16384))
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            waited = await netio.send_raw(a, payload, lambda: calls.append(trio.current_time()))
    assert waited
    assert len(calls) >= 2  # once per wait that ended with room: the reader is alive, however slow
    assert bytes(received) == payload


async def test_send_eof_raw_half_closes_once() -> None:
    async with pair() as (a, b):
        _, yielded = await yielded_during(netio.send_eof_raw(a))
        assert not yielded
        assert await b.receive_some(100) == b""  # the FIN
        await netio.send_eof_raw(a)  # once is enough; a second call does nothing
        await a.send_eof()  # and trio's own send_eof agrees it was done
        await b.send_all(b"the other way still flows")
        assert await a.receive_some(100) == b"the other way still flows"


async def test_the_raw_calls_on_a_closed_stream_raise_closed_resource() -> None:
    async with pair() as (a, _b):
        a.socket.close()
        with pytest.raises(trio.ClosedResourceError, match="already closed"):
            netio.read_ready(a, 100)
        with pytest.raises(trio.ClosedResourceError, match="already closed"):
            await netio.receive_raw(a, 100)
        with pytest.raises(trio.ClosedResourceError, match="already closed"):
            await netio.send_raw(a, b"x")
        with pytest.raises(trio.ClosedResourceError, match="already closed"):
            await netio.send_eof_raw(a)


async def test_the_raw_calls_on_a_reset_connection_raise_broken_resource() -> None:
    async with pair() as (a, b):
        await netio.abort_close(b)
        await trio.lowlevel.wait_readable(a.socket)
        with pytest.raises(trio.BrokenResourceError, match=r"socket connection broken: \[Errno 104\] Connection reset"):
            netio.read_ready(a, 100)
        # The reset is reported once; what follows writes into a connection that is gone.
        with pytest.raises(trio.BrokenResourceError, match=r"socket connection broken: \[Errno 32\] Broken pipe"):
            await netio.send_raw(a, b"x")


@pytest.mark.parametrize(
    ("code", "kind", "match"),
    [
        (errno.EBADF, trio.ClosedResourceError, "^this socket was already closed$"),
        (
            errno.ECONNRESET,
            trio.BrokenResourceError,
            r"^socket connection broken: \[Errno 104\] Connection reset by peer$",
        ),
        (errno.EPIPE, trio.BrokenResourceError, r"^socket connection broken: \[Errno 32\] Broken pipe$"),
        (errno.ETIMEDOUT, trio.BrokenResourceError, r"^socket connection broken: \[Errno 110\] Connection timed out$"),
    ],
)
def test_stream_error_translates_like_trio(code: int, kind: type[Exception], match: str) -> None:
    translated = netio.stream_error(OSError(code, os.strerror(code)))
    assert type(translated) is kind
    with pytest.raises(kind, match=match):
        raise translated


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Error connecting to ('1.2.3.4', 80): Connection refused"),
         "Connection refused"),
        (OSError(errno.ENETUNREACH, "whatever trio said"), "Network is unreachable"),
        (OSError("example.test resolves to no address"), "example.test resolves to no address"),
    ],
)  # fmt: skip
def test_describe_error_is_the_errno_text_alone(error: OSError, text: str) -> None:
    assert netio.describe_error(error) == text


async def test_a_socket_closed_under_a_read_that_waits_first_is_closed_not_a_value_error() -> None:
    async with pair() as (ours, _theirs):
        ours.socket.close()
        with pytest.raises(trio.ClosedResourceError, match="already closed"):
            await netio.receive_raw(ours, 10)
        with pytest.raises(trio.ClosedResourceError, match="already closed"):
            await netio.receive_raw(ours, 10, wait_first=True)  # trio's wait_readable(-1) raised ValueError here


async def test_a_tls_stream_whose_socket_closed_after_a_short_read_says_closed() -> None:
    async with pair() as (a, b):
        client, server = await tls_over(a, b)
        await server.send_all(b"hi")
        assert await client.receive_some(10) == b"hi"  # a short read: the next one waits for the socket first
        a.socket.close()
        with pytest.raises(trio.ClosedResourceError, match="already closed"):
            await client.receive_some(10)
