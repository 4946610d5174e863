"""Socket-level pieces of the sidecar: the original destination, dialing, abortive close, raw reads and writes.

What it does: reads the address a connection was sent to before iptables redirected it (`original_dst`, or with
TPROXY `transparent_dst`), makes sockets transparent (`set_transparent`), dials with a connect timeout and an
optional source address, a foreign one with TPROXY (`dial`, `TransparentSource`), turns TCP keepalive on
(`set_keepalive`: dialed sockets and the listeners, whose accepted sockets inherit it), closes a connection with an
RST (`abort_close`), and reads and writes sockets without trio's checkpoint when no wait is needed (the data path's
raw calls).

What it does not: decide anything (see `outbound`, `inbound`), or speak TLS (see `tls`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from mtlsmesh.addresses import IPAddress, ipv6_twin, unmapped

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, at level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, at level SOL_IPV6
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
IPV6_FREEBIND = 78  # linux/in6.h: bind to an address not (yet) configured on an interface
IP_TRANSPARENT = 19  # linux/in.h, at SOL_IP: accept TPROXY'd connections, bind an address that is not ours
IPV6_TRANSPARENT = 75  # linux/in6.h, at SOL_IPV6: the same for IPv6 (both set the same flag on the socket)
SO_MARK = getattr(socket, "SO_MARK", 36)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, IPv4 address, padding
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, IPv6 address, scope id
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on with a zero timeout: close() sends RST, drops unsent data

# TCP keepalive on every socket the sidecar accepts or dials. The idle timeout is off by default, and a peer that
# vanished (its node died, a NAT or conntrack entry expired) sends no RST: without probes both ends of the relay
# would be held forever. After 60 s of silence the kernel probes every 10 s and resets the connection after 6
# unanswered probes: a dead peer is found within about 2 minutes, at the cost of one tiny packet a minute on an
# otherwise idle but healthy connection (and well under the usual 5-minute idle cut of cloud load balancers/NATs).
KEEPALIVE_IDLE = 60  # seconds of silence before the first probe (TCP_KEEPIDLE)
KEEPALIVE_INTERVAL = 10  # seconds between unanswered probes (TCP_KEEPINTVL)
KEEPALIVE_COUNT = 6  # unanswered probes before the connection is reset (TCP_KEEPCNT)


def local_ip(sock: trio.socket.SocketType) -> IPAddress:
    """The socket's own address as the family it really is: `::ffff:a.b.c.d` on a dual-stack socket is IPv4."""
    return unmapped(ipaddress.ip_address(sock.getsockname()[0]))


def set_keepalive(sock: trio.socket.SocketType | socket.socket) -> None:
    """Turn TCP keepalive on with the KEEPALIVE_* settings. On a listening socket Linux hands them down to every
    connection it accepts, so the accept loop pays nothing per connection."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


@dataclass(frozen=True, slots=True)
class TransparentSource:
    """Dial from `ip`, an address that is not this host's (TPROXY: the caller's), with IP_TRANSPARENT, and mark
    the socket with `mark` so that policy routing keeps its packets, and the capture rules the replies, local."""

    ip: IPAddress
    mark: int


def set_transparent(sock: trio.socket.SocketType | socket.socket) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT on an IPv6 socket, which covers its IPv4-mapped side too): a listener then
    takes the connections TPROXY hands it, and a dialing socket may bind a foreign address. Needs CAP_NET_ADMIN
    (or CAP_NET_RAW); raises PermissionError without it."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def transparent_dst(stream: trio.SocketStream) -> tuple[IPAddress, int]:
    """Where a TPROXY'd client was going: TPROXY does not rewrite the packet, so it is the accepted socket's own
    address. A connection the nat rules REDIRECTed to the listener (the outbound sidecar calling its own pod) is
    the exception: its local port is the listener's, and its original destination is in conntrack as usual."""
    host, port = stream.socket.getsockname()[:2]
    return unmapped(ipaddress.ip_address(host)), int(port)


def original_dst(stream: trio.SocketStream) -> tuple[IPAddress, int]:
    """The destination the client dialed before a REDIRECT/DNAT rule sent it to us. Raises OSError when the kernel
    has none (no conntrack entry, not a redirected connection)."""
    sock = stream.socket
    # The family of the *connection*, not of the socket: a v6 socket accepting an IPv4 client (a mapped address)
    # has its NAT entry in the IPv4 table.
    if local_ip(sock).version == 4:
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
        port, packed = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
        return ipaddress.IPv4Address(packed), port
    raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
    port, _flow, packed6, _scope = _SOCKADDR_IN6.unpack(raw[: _SOCKADDR_IN6.size])
    return ipaddress.IPv6Address(packed6), port


@functools.lru_cache(maxsize=1024)
def _literal_target(host: str) -> tuple[int, str] | None:
    """(family, address text) when `host` is an IP address literal, None when it is a name. Cached: the same few
    destinations are dialed over and over, and the answer depends on the text alone."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))


async def dial(
    host: str, port: int, *, timeout: float, source: IPAddress | TransparentSource | None = None
) -> trio.SocketStream:
    """Connect to `host`:`port` within `timeout` seconds, from `source` when given (port chosen by the kernel);
    a `TransparentSource` binds its foreign address with IP_TRANSPARENT and marks the socket.

    Raises OSError (refused, unreachable, bad source) or trio.TooSlowError (connect timeout)."""
    # What trio.fail_after does, without its generator-based context manager (once per connection).
    with trio.CancelScope(deadline=trio.current_time() + timeout):
        literal = _literal_target(host)
        if literal is not None:
            targets = [literal]
        else:  # a name (explicit forward_to): resolve it, first answer that connects wins
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            targets = [(int(info[0]), str(info[4][0])) for info in infos]
            if not targets:
                raise OSError(f"{host} resolves to no address") from None
        last_error: OSError | None = None
        for family, address in targets:
            try:
                return await _connect(family, address, port, source)
            except OSError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error
    raise trio.TooSlowError  # the scope can only have ended early by its deadline


async def _connect(
    family: int, address: str, port: int, source: IPAddress | TransparentSource | None
) -> trio.SocketStream:
    """One non-blocking connect to a numeric address, as trio's `connect` does it but on the plain socket: the
    address needs no resolving and the options no async wrappers."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        set_keepalive(sock)
        if isinstance(source, TransparentSource):
            _bind_transparent(sock, family, source)
        elif source is not None:
            _bind_source(sock, family, source)
        err = sock.connect_ex((address, port))  # an errno, not an exception: EINPROGRESS is the usual answer
        if err == errno.EINPROGRESS:  # writable once the TCP handshake is over, either way
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Error connecting to {(address, port)!r}: {os.strerror(err)}")
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))  # sets TCP_NODELAY


def _bind_transparent(sock: socket.socket, family: int, source: TransparentSource) -> None:
    ip = unmapped(source.ip)
    if (ip.version == 6) != (family == socket.AF_INET6):
        raise OSError(errno.EAFNOSUPPORT, f"cannot dial an IPv{6 if family == socket.AF_INET6 else 4} app from {ip}")
    set_transparent(sock)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, source.mark)
    sock.bind((str(ip), 0))


def _bind_source(sock: socket.socket, family: int, source: IPAddress) -> None:
    if family == socket.AF_INET6:
        # 127.0.0.6 has an IPv6 twin, ::6 (docs/ARCHITECTURE.md §3); it sits on no interface, hence FREEBIND.
        twin = ipv6_twin(source)
        if twin is None:
            return  # no sensible IPv6 source for this IPv4 address: let the kernel pick
        source = twin
    if family == socket.AF_INET and source.version == 6:
        return
    if source.version == 6:
        sock.setsockopt(SOL_IPV6, IPV6_FREEBIND, 1)
    # 127.0.0.6 needs no FREEBIND: all of 127/8 is local on lo. A numeric address: bind() does not block.
    sock.bind((str(source), 0))


def describe_error(exc: OSError) -> str:
    """`Connection refused`, not trio's `Error connecting to ('1.2.3.4', 80): Connection refused`."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a stack of wrapping streams (each exposing `transport_stream`), if there is one."""
    seen = 0
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "transport_stream", None)
        if inner is None or seen > 8:
            return None
        stream, seen = inner, seen + 1
    return stream.socket


async def abort_close(stream: trio.abc.Stream) -> None:
    """Close at once; when a socket is underneath, with an RST (SO_LINGER 0) so the peer sees the abort."""
    sock = socket_of(stream)
    if sock is not None and sock.fileno() == -1 and isinstance(stream, trio.SocketStream):
        return  # closed already (the usual case for the accept loop's final clean-up)
    if sock is not None:
        # Already closed or never connected: a plain close is all there is.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    if sock is not None and isinstance(stream, trio.SocketStream):
        await trio.aclose_forcefully(stream)
        return
    # A wrapper (TLS): don't let it try a graceful close_notify; close the socket directly, then the wrapper.
    if sock is not None:
        sock.close()
    await trio.aclose_forcefully(stream)


# Errors accept() reports for a connection that died while it waited in the backlog (accept(2), "Error handling":
# Linux passes pending network errors on; EPERM: a firewall rule refused it): skip it and take the next one, as
# trio's SocketListener does (the same list).
_ACCEPT_SKIP = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
                 "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET")
    if hasattr(errno, name)
)  # fmt: skip


def listening_socket(listener: trio.SocketListener) -> socket.socket:
    """A plain socket object over `listener`'s own descriptor, for `accept_ready`. It does not own the descriptor
    (the listener does): let go of it with `.detach()`, never `.close()`."""
    raw = socket.socket(fileno=listener.socket.fileno())
    raw.setblocking(False)
    return raw


def accept_ready(raw: socket.socket) -> tuple[trio.SocketStream, tuple[str, int]] | None:
    """A connection waiting in the backlog and the peer's (host, port), or None when there is none (wait with
    `trio.lowlevel.wait_readable`). Unlike trio's accept this takes no checkpoint: a loop that accepts many in a row
    must checkpoint itself. Raises OSError (EMFILE and friends) or trio.ClosedResourceError, as
    `trio.SocketListener.accept` does."""
    while True:
        try:
            sock, peer = raw.accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _ACCEPT_SKIP:
                continue
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the listener was closed") from None
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock)), (str(peer[0]), int(peer[1]))


def stream_error(exc: OSError) -> Exception:
    """A socket error as trio.SocketStream reports it."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def read_ready(stream: trio.SocketStream, max_bytes: int) -> bytes | None:
    """What the socket already holds (up to `max_bytes`; b"" at EOF), or None when nothing has arrived yet. Never
    waits; errors as `receive_raw`."""
    try:
        return os.read(stream.socket.fileno(), max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise stream_error(exc) from exc


async def receive_raw(stream: trio.SocketStream, max_bytes: int, wait_first: bool = False) -> tuple[bytes, bool]:
    """`stream.receive_some(max_bytes)` without its checkpoint when data is already there: (data, whether it waited).
    A caller that loops must checkpoint itself when nothing waited (the relay does). `wait_first`: wait for the
    socket to be readable before trying (the caller's last read was short, so the socket is most likely empty: this
    saves the read that would find nothing)."""
    fd = stream.socket.fileno()
    waited = False
    if wait_first:
        if fd < 0:  # closed under us: what the read below would say (trio's wait would refuse -1 with a ValueError)
            raise trio.ClosedResourceError("this socket was already closed")
        await trio.lowlevel.wait_readable(fd)
        waited = True
    while True:
        try:
            return os.read(fd, max_bytes), waited
        except BlockingIOError:
            pass  # wait outside the except clause: a parked task must not keep the exception alive
        except OSError as exc:
            raise stream_error(exc) from exc
        await trio.lowlevel.wait_readable(fd)
        waited = True


async def send_raw(
    stream: trio.SocketStream, data: bytes | bytearray | memoryview, progress: Callable[[], object] | None = None
) -> bool:
    """`stream.send_all(data)` without its checkpoint when the socket takes everything at once; True when it waited.
    A caller that loops must checkpoint itself when nothing waited. `progress` is called each time the socket takes
    more after a wait (the peer is reading, however slowly): the relay's idle timer."""
    fd = stream.socket.fileno()
    waited = False
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            waited = True
            if progress is not None:
                progress()  # writable again: the peer acknowledged bytes, room was made
        except OSError as exc:
            raise stream_error(exc) from exc
    return waited


async def send_eof_raw(stream: trio.SocketStream) -> None:
    """`stream.send_eof()` without its checkpoint: shut the socket down for writing (a FIN), once. A caller that
    loops must checkpoint itself."""
    sock = stream.socket
    if sock.did_shutdown_SHUT_WR:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise stream_error(exc) from exc
