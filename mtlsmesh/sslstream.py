"""TLS with OpenSSL's own record layer: `OpenSSLStream`, the same surface as `tls.TLSStream`.

What it does: the handshake is `handshake.Handshake` over memory BIOs, as in `tls`; when it is done the connection
stays in OpenSSL (`handshake.OpenSSLRecords`) instead of moving to `records`: OpenSSL seals, opens, follows
KeyUpdate and answers bad records with its alerts. It is the `record_layer: openssl` setting, and the path every
TLS 1.2 connection takes (an explicit listener with `min_tls_version: "1.2"`): `records` speaks TLS 1.3 only.
`open_mtls` is `tls.open_mtls` for this stream, with the same peer check (`tls.check_peer`).

What it does not: build contexts (see `handshake`), judge identities itself (see `tls.judge_leaf`, which
`open_mtls` runs inside the handshake, where OpenSSL's alert tells the peer), or read the socket directly: it reads
and writes its transport through the trio Stream interface (one checkpoint per call).

Refusing: a record OpenSSL refuses is answered with OpenSSL's alert, which `violation` then names (the relay ends
the connection after it and gives the peer `close_refused`'s linger to read it); a policy denial right after the
handshake (TLS 1.3 or 1.2) is told with the alert `refuse` seals itself after OpenSSL's records (see
`handshake.OpenSSLRecords.refusal_alert`).

Theory of operation: like `tls.TLSStream`, two tasks may use it at once, one sending and one receiving. Each call
into OpenSSL is synchronous, so they never interleave inside it. What OpenSSL writes (records, alerts, the answer to
a KeyUpdate) is drained from its outgoing BIO by one task at a time, in order (`_flush`); the receive path never
waits for a drain in progress, whose task takes what was added before it ends (see `tls` for why waiting there
would deadlock a full-duplex relay). Errors: during the handshake `HandshakeError`, afterwards
`trio.BrokenResourceError`; a transport EOF without close_notify is a truncation.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence

import trio
from OpenSSL import SSL

from mtlsmesh import handshake, netio, tls
from mtlsmesh.errors import HandshakeError
from mtlsmesh.handshake import Side
from mtlsmesh.identity import SpiffeId, TrustDomain
from mtlsmesh.records import ALERT_NAMES

TRANSPORT_READ = 64 * 1024  # ciphertext read from the transport per call
SEND_CHUNK = 64 * 1024  # plaintext sealed per round of send_all, then sent before the next
SEND_PIECE = 16 * 1024  # with `send_progress` set, ciphertext is sent in pieces this big, progress after each


def _transport_failure(exc: BaseException) -> str:
    closed = isinstance(exc, trio.ClosedResourceError)  # closed under us (another task, a drain): a failure too
    return f"transport {'closed' if closed else 'broken'}: {exc}"


class OpenSSLStream(trio.abc.HalfCloseableStream):
    """TLS over `transport_stream` with OpenSSL's record layer; see the module docstring.

    `peer` labels the other end in errors. `peer_id` is set by `open_mtls` once the peer's SVID is checked.
    `prefix`: bytes already read from the transport (the start of the peer's first flight)."""

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: SSL.Context,
        side: Side,
        peer: str = "peer",
        *,
        prefix: bytes = b"",
    ) -> None:
        self.transport_stream = transport_stream
        self.peer = peer
        self.peer_id: SpiffeId | None = None
        self._side = side
        self._hs: handshake.Handshake | None = handshake.Handshake(context, side)
        if prefix:
            self._hs.feed(prefix)
        self._records: handshake.OpenSSLRecords | None = None
        self._handshake_lock = trio.Lock()
        self._handshake_done = False
        self._draining = False
        self._drain_done = trio.lowlevel.ParkingLot()
        self._eof_fed = False
        self._eof_sent = False
        self._eof_received = False
        self._closed = False
        self._broken: str | None = None
        self._sending = False
        self._receiving = False
        # Called after each piece of a send that had to be cut (see `_flush`): the relay's idle timer, so a send
        # held back by a slow reader counts as progress.
        self.send_progress: Callable[[], object] | None = None
        # The fatal alert sent to the peer (OpenSSL's, for a record it refused; ours, for a refusal after the
        # handshake), else None: what the relay names the end after, as `tls.TLSStream.violation`.
        self.violation: int | None = None

    # --- output ----------------------------------------------------------------------------------------------

    def _take(self) -> bytes:
        if self._records is not None:
            return self._records.take()
        return b"" if self._hs is None else self._hs.take_output()

    async def _flush(self, *, wait: bool = True) -> None:
        """Send what OpenSSL wrote, in order (see the module docstring for `wait=False`)."""
        if self._draining:
            if not wait:
                return
            while self._draining:
                await self._drain_done.park()
        data = self._take()
        if not data:
            return
        self._draining = True
        try:
            while data:
                try:
                    progress = self.send_progress
                    if progress is None or len(data) <= SEND_PIECE:
                        await self.transport_stream.send_all(data)
                    else:
                        view = memoryview(data)
                        for start in range(0, len(view), SEND_PIECE):
                            await self.transport_stream.send_all(view[start : start + SEND_PIECE])
                            progress()
                except trio.Cancelled:
                    self._broken = "cancelled while sending"  # part of a record may be out
                    raise
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    if self._closed:  # this stream was closed under us: the Stream contract's error
                        raise trio.ClosedResourceError("the TLS stream is closed") from exc
                    self._broken = self._broken or _transport_failure(exc)
                    raise trio.BrokenResourceError(self._broken) from exc
                data = self._take()
        finally:
            self._draining = False
            self._drain_done.unpark_all()

    async def _read_transport(self) -> bytes:
        try:
            return bytes(await self.transport_stream.receive_some(TRANSPORT_READ))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self._closed:
                raise trio.ClosedResourceError("the TLS stream is closed") from exc
            self._broken = _transport_failure(exc)
            raise trio.BrokenResourceError(self._broken) from exc

    # --- handshake -------------------------------------------------------------------------------------------

    async def do_handshake(self, verify: Callable[[], object] | None = None, *, send_last: bool = True) -> None:
        """Run the handshake once (concurrent callers wait for it); `verify` runs when OpenSSL is done, before our
        last flight leaves. A client's Finished leaves here unless `send_last=False` (it then goes with the first
        records, or before this stream first waits to receive). Raises `HandshakeError`."""
        if self._handshake_done:
            return
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        async with self._handshake_lock:
            if self._handshake_done:
                return
            if self._broken is not None or self._hs is None:
                raise HandshakeError(self.peer, self._broken or "the handshake failed")
            hs = self._hs
            try:
                while True:
                    try:
                        done = hs.step()
                    except handshake.HandshakeFailure as exc:
                        self._broken = exc.reason
                        with contextlib.suppress(trio.BrokenResourceError):
                            await self._flush()  # the alert, so the peer fails now
                        raise HandshakeError(self.peer, exc.reason) from exc
                    if done:
                        break
                    await self._flush()
                    data = await self._read_transport()
                    if data:
                        hs.feed(data)
                    else:
                        hs.feed_eof()
                if verify is not None:
                    verify()
                self._records = hs.keep_records()
                self._hs = None
                # A server's last flight (TLS 1.2: its Finished, which the client waits for) leaves now.
                if self._side is Side.SERVER or send_last:
                    await self._flush()
            except trio.BrokenResourceError as exc:
                raise HandshakeError(self.peer, self._broken or str(exc)) from exc
            except HandshakeError as exc:
                self._broken = exc.reason
                raise
            self._handshake_done = True

    async def _ensure_handshake(self) -> None:
        if self._handshake_done:
            return
        try:
            await self.do_handshake()
        except HandshakeError as exc:
            raise trio.BrokenResourceError(exc.reason) from exc

    @property
    def negotiated(self) -> tuple[str | None, str | None, str | None]:
        """(protocol version, cipher suite, key exchange group)."""
        if self._records is not None:
            return self._records.negotiated
        return (None, None, None) if self._hs is None else self._hs.negotiated()

    def peer_certificate_der(self) -> bytes | None:
        if self._records is not None:
            return self._records.peer_certificate_der()
        return None if self._hs is None else self._hs.peer_certificate_der()

    def alpn(self) -> bytes | None:
        if self._records is not None:
            return self._records.alpn()
        return None if self._hs is None else self._hs.alpn()

    # --- the Stream interface --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already in send_all/send_eof")
        self._sending = True
        try:
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof was already called")
            await self._ensure_handshake()
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            records = self._records
            assert records is not None
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
            for start in range(0, len(view), SEND_CHUNK):
                try:
                    records.seal(view[start : start + SEND_CHUNK])
                except handshake.RecordFailure as exc:
                    self._broken = exc.reason
                    raise trio.BrokenResourceError(exc.reason) from exc
                await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already in send_all/send_eof")
        self._sending = True
        try:
            self._check_open()
            await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already in receive_some")
        self._receiving = True
        try:
            self._check_open()
            max_bytes = tls.RECORD_SIZE if max_bytes is None else operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            await self._ensure_handshake()
            if self._eof_received:
                await trio.lowlevel.checkpoint()
                return b""
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            records = self._records
            assert records is not None
            awaited = False
            while True:
                try:
                    data = records.open(max_bytes)
                except handshake.RecordFailure as exc:
                    self._broken = exc.reason
                    self.violation = records.sent_alert  # the alert OpenSSL answers a bad record with
                    with contextlib.suppress(trio.BrokenResourceError):
                        await self._flush()  # OpenSSL's alert (whoever closes the stream then: close_refused)
                    raise trio.BrokenResourceError(exc.reason) from exc
                # What OpenSSL owes the peer goes out first: a held Finished, the answer to a KeyUpdate.
                await self._flush(wait=False)
                if data is not None:
                    break
                if self._eof_fed:  # pragma: no cover - OpenSSL fails a read after the end of its input
                    self._broken = "connection closed by peer"
                    raise trio.BrokenResourceError(self._broken)
                chunk = await self._read_transport()
                awaited = True
                if chunk:
                    records.feed(chunk)
                else:
                    records.feed_eof()
                    self._eof_fed = True
            if not awaited:
                await trio.lowlevel.checkpoint()
            if not data:
                self._eof_received = True
            return data
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        """Send close_notify (and a FIN when the transport half-closes); receiving goes on."""
        if self._sending:
            raise trio.BusyResourceError("another task is already in send_all/send_eof")
        self._sending = True
        try:
            self._check_open()
            await self._ensure_handshake()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            self._eof_sent = True
            assert self._records is not None
            self._records.close_notify()
            await self._flush()
            if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
                await self.transport_stream.send_eof()
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    # --- refusing the peer -----------------------------------------------------------------------------------

    async def _send_fin(self) -> None:
        if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
            await self.transport_stream.send_eof()

    async def refuse(self, alert: int) -> None:
        """Refuse the peer after the handshake (a policy denial): the fatal `alert`, then `close_refused`. Only a
        server that has neither sealed nor opened a record yet can still seal an alert of its own after OpenSSL's
        records (`handshake.OpenSSLRecords.refusal_alert`); any other stream is reset without one."""
        records = self._records
        refusal = None
        if records is not None and self._broken is None and not self._closed and not self._sending:
            refusal = records.refusal_alert(alert)
        if refusal is None:
            await netio.abort_close(self)
            return
        self.violation = alert
        self._broken = f"refused with alert {ALERT_NAMES.get(alert, alert)}"
        self._eof_sent = True  # nothing of ours follows the alert, close_notify included
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()  # what OpenSSL wrote before (its session tickets) goes first
            await self.transport_stream.send_all(refusal)
        await self.close_refused()

    async def close_refused(self) -> None:
        """Close a stream whose peer was sent a fatal alert: our FIN, then up to `tls.REFUSE_LINGER` for the peer
        to read it and close (what it still sends, up to `tls.REFUSE_LINGER_BYTES`, is read and dropped), then a
        plain close when it did and a reset when it did not, as `tls.TLSStream.close_refused`."""
        closed = False
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._send_fin()
            budget = tls.REFUSE_LINGER_BYTES
            with trio.move_on_after(tls.REFUSE_LINGER):
                while budget > 0:
                    data = await self.transport_stream.receive_some(TRANSPORT_READ)
                    if not data:
                        closed = True
                        break
                    budget -= len(data)
        if closed:
            self._closed = True
            if self._hs is not None:
                self._hs.free()
                self._hs = None
            await trio.aclose_forcefully(self.transport_stream)
        else:
            await netio.abort_close(self)

    async def aclose(self) -> None:
        """Close: send close_notify when nothing went wrong and it is not sent yet, then close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._records is not None and not self._eof_sent and self._broken is None and not self._draining:
                self._eof_sent = True
                self._records.close_notify()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._flush()
        finally:
            if self._hs is not None:
                self._hs.free()
                self._hs = None
            await self.transport_stream.aclose()


async def open_mtls(
    transport: trio.abc.Stream,
    context: SSL.Context,
    side: Side,
    trust_domain: TrustDomain,
    *,
    expected: Sequence[SpiffeId] = (),
    peer: str = "peer",
    send_last: bool = True,
    prefix: bytes = b"",
    require_alpn: bool = True,
) -> OpenSSLStream:
    """`tls.open_mtls` with OpenSSL's record layer: handshake over `transport`, then `tls.check_peer`. The caller
    bounds it in time and closes `transport` on error. Raises `HandshakeError`."""
    stream = OpenSSLStream(transport, context, side, peer, prefix=prefix)
    if stream._hs is not None:
        # The peer's SVID is refused inside OpenSSL's handshake, with OpenSSL's alert (bad_certificate), and
        # `tls.check_peer` looks again after it; a policy denial after the handshake is sealed by `refuse`.
        stream._hs.check_leaf(tls.leaf_check(trust_domain, expected))
    await stream.do_handshake(
        lambda: tls.check_peer(stream, trust_domain, expected, require_alpn=require_alpn), send_last=send_last
    )
    return stream
