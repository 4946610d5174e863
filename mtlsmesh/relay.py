"""The relay: two streams joined so the tunnel behaves like the TCP connection it carries (docs/ARCHITECTURE.md §6).

What it does: copies bytes both ways with backpressure (one fixed-size read at a time per direction, each written out
before the next read, so a slow reader slows the writer and nothing buffers without bound); maps a clean end of one
direction (FIN, or TLS close_notify) to `send_eof` on the other side while the other direction keeps flowing; maps a
failure on either side (an RST, a broken TLS record, a truncation) to an abortive close of both, so the far ends see a
reset too (after the alert, for a TLS peer refused for a protocol violation); enforces an optional idle timeout;
counts bytes and says why the relay ended (`outcome.Reason`: closed, idle_timeout, the alert a TLS side was refused
with, or the reset reason the caller named for the side that failed).

What it does not: open, authenticate or authorize anything (see `outbound`, `inbound`); it owns the two streams
once called and closes both before it returns.

Theory of operation: one task per direction (the forward one is the caller's own), both under one cancel scope
whose deadline is pushed forward, when an idle timeout is set, on every chunk received and every time a send that
had to wait (backpressure from a slow reader) gets more bytes out: progress either way keeps the relay up, and a
send that is merely slow is not idle (the fast path pays nothing for that: it runs only after a wait). A direction
that ends cleanly just returns. The first failure records its reason (for a TLS stream that refused a protocol
violation, the alert it sent: `ALERT_REASONS`) and cancels the scope; both streams are then closed abortively
(`netio.abort_close`: SO_LINGER 0 when a socket is underneath), except that a TLS stream which sent a fatal alert
first gets its FIN and a short linger (`tls.TLSStream.close_refused`), so that the peer reads the alert before any
reset. When both directions end cleanly
both streams are closed gracefully. Sockets and TLS streams are read and written without trio's checkpoint per
call; a pump checkpoints on the second of two rounds in a row in which neither side had to wait (a wait is a
checkpoint already, and a short exchange usually waits on its next read). Sockets are also half-closed and closed
without trio's checkpoint: the task goes through the scheduler when it ends anyway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from mtlsmesh import netio, records, sslstream, tls
from mtlsmesh.outcome import Reason

CHUNK = 256 * 1024  # bytes per read: a TLS stream decrypts every whole record it holds up to this per read
CLOSE_GRACE = 2.0  # seconds a graceful close may take (a close_notify to a peer that stopped reading) before giving up


@dataclass(frozen=True, slots=True)
class RelayResult:
    """Bytes copied each way and why the relay ended: CLOSED, IDLE_TIMEOUT, or the reset reason of the side that failed
    first, with what failed as `detail` (empty otherwise)."""

    downstream_to_upstream: int
    upstream_to_downstream: int
    reason: Reason
    detail: str
    aborted: bool


class _Pump:
    __slots__ = ("copied", "dst", "dst_reset", "src", "src_reset")

    def __init__(self, src: _End, dst: _End, src_reset: Reason, dst_reset: Reason) -> None:
        self.src, self.dst, self.src_reset, self.dst_reset = src, dst, src_reset, dst_reset
        self.copied = 0


async def relay(
    downstream: trio.abc.HalfCloseableStream,
    upstream: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float | None = None,
    downstream_reset: Reason = Reason.RESET_BY_APP,
    upstream_reset: Reason = Reason.RESET_BY_PEER,
) -> RelayResult:
    """Relay until both directions end or one fails; close both streams; return the counts and the reason.
    `downstream_reset`, `upstream_reset`: the reason when that side fails (by default the outbound sidecar's view:
    the app dialed us, the peer is upstream)."""
    failure: list[tuple[Reason, str]] = []
    # The nursery's own cancel scope is the relay's: the first failure cancels it, the idle deadline is its deadline.
    scope: trio.CancelScope  # bound before either pump runs

    touch: Callable[[], None] | None = None
    if idle_timeout is not None:
        timeout = idle_timeout

        def touch() -> None:
            scope.deadline = trio.current_time() + timeout

    down, up = _end(downstream, touch), _end(upstream, touch)
    forward = _Pump(down, up, downstream_reset, upstream_reset)
    backward = _Pump(up, down, upstream_reset, downstream_reset)

    async def pump(p: _Pump) -> None:
        src, dst = p.src, p.dst
        owed = False  # a round ended without waiting and without a checkpoint: the next such round must take one
        short = False  # the last read got less than it asked for: the source is most likely empty now
        while True:
            try:
                data, waited = await src.receive_chunk(CHUNK, short)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                failure.append((_failed(p.src, p.src_reset), _why(exc)))
                scope.cancel()
                return
            if idle_timeout is not None:
                scope.deadline = trio.current_time() + idle_timeout
            try:
                if not data:
                    # Half-close: the other direction goes on (TLS 1.3 close_notify / TCP FIN).
                    await dst.send_eof()
                    return
                if await dst.send_chunk(data):
                    waited = True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                failure.append((_failed(p.dst, p.dst_reset), _why(exc)))
                scope.cancel()
                return
            p.copied += len(data)
            short = len(data) < CHUNK
            if waited:
                owed = False
            elif owed:
                # Two rounds in a row without waiting: a checkpoint keeps the scheduler fair and cancellation live.
                # (After one such round the next receive usually waits, which is a checkpoint already: a short
                # exchange, a request or a reply, then goes through without an extra trip through the scheduler.)
                await trio.lowlevel.checkpoint()
                owed = False
            else:
                owed = True

    aborted = True
    detail = ""
    try:
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            if idle_timeout is not None:
                scope.deadline = trio.current_time() + idle_timeout
            nursery.start_soon(pump, backward)
            await pump(forward)  # in this task: one task fewer per connection
        if failure:
            reason, detail = failure[0]
        elif scope.cancelled_caught:
            reason = Reason.IDLE_TIMEOUT
        else:
            reason = Reason.CLOSED
            aborted = False
    finally:
        # Reached on every path, including an outer cancellation (drain): never leave a stream open.
        if aborted:
            await _abort(downstream, upstream)
        else:
            with trio.CancelScope(deadline=trio.current_time() + CLOSE_GRACE, shield=True) as grace:
                await down.aclose()
                await up.aclose()
            if grace.cancelled_caught:
                await _abort(downstream, upstream)
    return RelayResult(forward.copied, backward.copied, reason, detail, aborted)


class _End(Protocol):
    """How the relay reads, writes, half-closes and closes one stream: a `tls.TLSStream` itself, or the small
    adapters below (see `_end`). `receive_chunk(max_bytes, short)` answers (data, whether it waited), where `short`
    says the last read got less than it asked for; `send_chunk(data)` answers whether it waited."""

    def receive_chunk(self, max_bytes: int, short: bool, /) -> Awaitable[tuple[bytes | bytearray, bool]]: ...
    def send_chunk(self, data: bytes | bytearray, /) -> Awaitable[bool]: ...
    def send_eof(self) -> Awaitable[object]: ...
    def aclose(self) -> Awaitable[object]: ...


class _SocketEnd:
    """A socket, read and written without trio's checkpoint when no wait is needed; after a short read it is waited
    for before it is read. Half-closed and closed at once, without a checkpoint either (the pump's task ends right
    after, which is its trip through the scheduler). Its methods hand back netio's coroutines: no frame of their
    own per call, and no object per method (the pump looks them up on each use)."""

    __slots__ = ("progress", "stream")

    def __init__(self, stream: trio.SocketStream, progress: Callable[[], None] | None) -> None:
        self.stream, self.progress = stream, progress

    def receive_chunk(self, max_bytes: int, short: bool, /) -> Awaitable[tuple[bytes, bool]]:
        return netio.receive_raw(self.stream, max_bytes, short)

    def send_chunk(self, data: bytes | bytearray, /) -> Awaitable[bool]:
        return netio.send_raw(self.stream, data, self.progress)

    def send_eof(self) -> Awaitable[None]:
        return netio.send_eof_raw(self.stream)

    async def aclose(self) -> None:
        self.stream.socket.close()


class _StreamEnd:
    """Any other stream, through the Stream interface (a wait is assumed on every call)."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive_chunk(self, max_bytes: int, short: bool, /) -> tuple[bytes | bytearray, bool]:
        return await self.stream.receive_some(max_bytes), True

    async def send_chunk(self, data: bytes | bytearray, /) -> bool:
        await self.stream.send_all(data)
        return True

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):  # else the direction just ends
            await self.stream.send_eof()

    def aclose(self) -> Awaitable[None]:
        return self.stream.aclose()


def _end(stream: trio.abc.Stream, progress: Callable[[], None] | None) -> _End:
    """The one place that looks at what a stream is. `progress` is called when a send that had to wait gets more
    bytes out (sockets and TLS over sockets; other streams only report whole sends). A TLS stream is its own end
    (its `receive_chunk`/`send_chunk` skip the checkpoint when nothing waited, and it judges short reads itself)."""
    if type(stream) is trio.SocketStream:
        return _SocketEnd(stream, progress)
    if type(stream) is tls.TLSStream:
        stream.send_progress = progress
        return stream
    if type(stream) is sslstream.OpenSSLStream:  # record_layer openssl: the Stream interface, and its progress
        stream.send_progress = progress
    return _StreamEnd(stream)


# The fatal alert a TLS stream sent for a protocol violation → the reason the relay ends with (see outcome.Reason).
ALERT_REASONS: dict[int, Reason] = {
    records.BAD_RECORD_MAC: Reason.BAD_RECORD_MAC,
    records.UNEXPECTED_MESSAGE: Reason.UNEXPECTED_MESSAGE,
    records.RECORD_OVERFLOW: Reason.RECORD_OVERFLOW,
    records.DECODE_ERROR: Reason.DECODE_ERROR,
    records.ILLEGAL_PARAMETER: Reason.ILLEGAL_PARAMETER,
}


def _failed(end: _End, reset: Reason) -> Reason:
    """The reason for a failure of `end`: the violation its TLS stream refused (by the alert it sent), else `reset`."""
    if type(end) is tls.TLSStream and end.violation is not None:
        return ALERT_REASONS.get(end.violation, reset)
    if type(end) is _StreamEnd and type(end.stream) is sslstream.OpenSSLStream and end.stream.violation is not None:
        return ALERT_REASONS.get(end.stream.violation, reset)  # OpenSSL's record layer: the alert OpenSSL sent
    return reset


async def _abort(*streams: trio.abc.Stream) -> None:
    """Close abortively, except a TLS stream that refused its peer with an alert: that one gets our FIN and a short
    linger first (`tls.TLSStream.close_refused`), so the peer reads the alert before any reset; it is closed last
    and shielded (this runs on every exit, a cancellation included), bounded by tls.REFUSE_LINGER."""
    refused = [s for s in streams if isinstance(s, _TLS_STREAMS) and s.violation is not None]
    for stream in streams:
        if stream not in refused:
            await netio.abort_close(stream)
    for stream in refused:
        with trio.CancelScope(deadline=trio.current_time() + 2 * tls.REFUSE_LINGER, shield=True):
            await stream.close_refused()
        await netio.abort_close(stream)  # nothing when it is closed; the reset it would have ended in if cut short


_TLS_STREAMS = (tls.TLSStream, sslstream.OpenSSLStream)  # both record paths refuse a peer the same way


def _why(exc: BaseException) -> str:
    cause = exc.__cause__
    text = str(cause) if cause is not None and str(cause) else str(exc)
    return text[:120] or type(exc).__name__
