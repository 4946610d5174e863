"""Mutual TLS between sidecars: a TLS stream over any trio stream, and the check of the peer's SVID.

What it does: `TLSStream` runs TLS over any `trio.abc.Stream` (a socket, a memory pair) and is itself a
`trio.abc.HalfCloseableStream`. `open_mtls` does the handshake and then checks the peer's SPIFFE ID (the SVID leaf
rules, our trust domain, the expected identities) before anyone sends an application byte.

What it does not: build TLS contexts or talk to OpenSSL (see `handshake`, the one seam to it), pick identities or
decide policy (see `policy`), load or reload files (see `credentials`), or speak any TLS version but 1.3 (a TLS 1.2
peer fails the handshake with "unsupported protocol"; an explicit listener that allows 1.2 uses `sslstream`).

Theory of operation
-------------------
The handshake is OpenSSL's, driven through `handshake.Handshake` with no socket: OpenSSL reads ciphertext we feed it
and writes ciphertext we take; it never does I/O itself, it only says "I need more input". `_run_handshake` drives
it:

    step  →  send what it wrote  →  if it wanted input, read one chunk from the transport, feed it and step again.

Bytes already read from the transport before the stream was made (the inbound sniffer's ClientHello) are fed to
the handshake first: the stream takes them as `prefix`, so nothing wraps the transport to replay them.

The records after the handshake are ours (`records.Session`). When OpenSSL is done, `Handshake.hand_over` gives us
the session (built from the two application traffic secrets), the records its last step wrote (held back, not yet
sent) and the ciphertext it has not read, and frees the OpenSSL connection: an idle connection keeps two AEAD
contexts instead of OpenSSL's ~40 KiB.

The data path (`send_all`, `receive_some`) is straight-line code. `send_all` seals up to `SEND_CHUNK` of plaintext
into one buffer of records queued on the session (its own: a send may have to wait for the socket) and sends the
queue; `receive_some` reads the transport once (a socket: straight into a per-thread scratch buffer, after the
partial record left from last time), opens every whole record into another and returns a copy, so one socket read
or write carries many records. Our last handshake records wait in `_held` to go out with the next write (see
`do_handshake`). Whether the transport is a socket (read and written directly, without trio's checkpoint when no
wait is needed) is decided once, when the stream is made.

Two tasks may use the stream at once (one sending, one receiving, as the relay does). Records are queued in the
order they are sealed; the queue is drained by one task at a time (`_draining`; a task that must wait parks), and the
draining task goes on until the queue is empty, so ciphertext leaves in sequence-number order whichever task drains
it. The receive path queues records too (the answer to a peer's KeyUpdate, an alert) and never waits for a drain: the
draining task takes what we added, and waiting would deadlock a full-duplex relay whose send is blocked on a peer that
is itself blocked sending to us. During the handshake, reads from the transport are made by one task at a time
(`_reading`).

Half-close: `send_eof` sends close_notify (and a FIN when the transport can half-close); TLS 1.3 lets the peer go on
sending (RFC 8446 §6.1). Receiving close_notify makes `receive_some` return b"". A transport EOF without close_notify
is a truncation and raises `trio.BrokenResourceError`.

Fairness: a receive whose read brought no application data, and did not wait, takes a checkpoint before it reads
again (the session opens at most `records.OPEN_BUDGET` records without data per call), so a peer that keeps the
socket full of KeyUpdates or empty records gets one bounded slice of the loop per round; the handshake's reads
checkpoint the same way. The receive path stops reading while more than `OUTGOING_LIMIT` bytes wait to be sent.

Refusing: a record error is answered with its alert and a FIN (`violation` names the alert); whoever closes the
stream then calls `close_refused`, which gives the peer `REFUSE_LINGER` to read the alert and close before any reset
(the relay does, `steps.refuse` through `refuse` for a policy denial). Both traffic secrets are wiped at close.

Errors are translated by `_fail`: a handshake or transport error (broken or closed) during the handshake becomes
`HandshakeError`, afterwards `trio.BrokenResourceError`; a record the peer got wrong is answered with the alert
`records` names before the stream breaks. `open_mtls` checks the peer before our last handshake flight leaves.
"""

from __future__ import annotations

import contextlib
import operator
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import trio
from cryptography import x509
from OpenSSL import SSL

from mtlsmesh import handshake, netio, records, svid
from mtlsmesh.errors import CertificateError, HandshakeError
from mtlsmesh.handshake import ALPN, Side
from mtlsmesh.identity import SpiffeId, TrustDomain

__all__ = ["ALPN", "RECORD_SIZE", "PeerRefused", "PeerStream", "Side", "TLSStream", "check_peer", "open_mtls"]

# What two sidecars negotiate with the OpenSSL that pyOpenSSL bundles here (checked by tests/integration/test_tls):
# TLS 1.3, cipher suite TLS_AES_256_GCM_SHA384 (OpenSSL's default TLS 1.3 order), key exchange X25519MLKEM768,
# signature ECDSA P-256/SHA-256 with the default SVID key type. With an OpenSSL older than 3.5: X25519.
NEGOTIATED_VERSION = "TLSv1.3"
NEGOTIATED_CIPHER = "TLS_AES_256_GCM_SHA384"
NEGOTIATED_GROUP_PQ = "X25519MLKEM768"

RECORD_SIZE = 16384  # TLS max plaintext record (RFC 8446 §5.1): what receive_some returns when not told a size
SEND_CHUNK = 64 * 1024  # plaintext sealed per round of send_all (four records), then sent before the next
TRANSPORT_READ = 64 * 1024  # ciphertext read from the transport per call (several records at once)
RECV_SCRATCH_SIZE = 128 * 1024  # room for the plaintext of every whole record one read can hold
# Ciphertext queued to send above which the receive path stops reading until the queue drains: what a peer that
# does not read can make us hold (a send round queues at most SEND_CHUNK and its records, the receive path one
# KeyUpdate answer and one alert, so only a misbehaving peer gets near it).
OUTGOING_LIMIT = 4 * SEND_CHUNK
# A refused peer (a fatal alert sent, then our FIN) has this long to read the alert and close before it is reset, and
# may send this much meanwhile (read and dropped); a peer that keeps talking past either is reset then.
REFUSE_LINGER = 1.0
REFUSE_LINGER_BYTES = 256 * 1024


class PeerRefused(HandshakeError):
    """`check_peer`'s refusal of a peer whose handshake succeeded: `alert` is the fatal alert that tells it why
    (bad_certificate for a leaf the SVID rules or the trust domain refuse, access_denied for an identity that is not
    expected)."""

    def __init__(self, peer: str, reason: str, alert: int) -> None:
        super().__init__(peer, reason)
        self.alert = alert


# Scratch buffers shared by every stream of a thread: the data path reads, seals and opens through them instead of
# allocating per call. Sharing is safe because each use is synchronous (filled and copied out with no await in
# between) and trio runs one task at a time per thread; they are per thread because cffi calls let other threads
# run.
class _Scratch(threading.local):
    def __init__(self) -> None:
        # Ciphertext: what is left of a partial record, then what one read brings.
        self.read = bytearray(records.MAX_RECORD + TRANSPORT_READ)
        self.read_view = memoryview(self.read)
        self.plain = bytearray(RECV_SCRATCH_SIZE)
        self.plain_view = memoryview(self.plain)
        self.inner = bytearray(records.MAX_PLAINTEXT + 1)  # one record's content and content type, to be sealed


_SCRATCH = _Scratch()


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over `transport_stream`; see the module docstring for how it works.

    `peer` labels the other end in errors. `peer_id` is set by `open_mtls` once the peer's SVID is checked.
    """

    # Slotted: a sidecar keeps one per connection, and the data path reads these on every call.
    __slots__ = (
        "__weakref__",
        "_alpn",
        "_broken",
        "_cin",
        "_closed",
        "_drain_done",
        "_drained",
        "_draining",
        "_eof_received",
        "_eof_sent",
        "_handshake_done",
        "_handshake_waiters",
        "_held",
        "_held_before_read",
        "_hs",
        "_negotiated",
        "_plain_left",
        "_read_done",
        "_reading",
        "_receiving",
        "_sending",
        "_session",
        "_side",
        "_socket",
        "peer",
        "peer_id",
        "send_progress",
        "transport_stream",
        "violation",
    )

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: SSL.Context,
        side: Side,
        peer: str = "peer",
        *,
        prefix: bytes = b"",
    ) -> None:
        """`context` comes from `handshake.build_context`; `prefix`: bytes already read from `transport_stream`
        (the start of the peer's first flight), handed to the handshake before anything is read."""
        self.transport_stream = transport_stream
        # The one place that looks at what the transport is: a socket is read and written directly.
        self._socket = transport_stream if type(transport_stream) is trio.SocketStream else None
        self.peer = peer
        self.peer_id: SpiffeId | None = None
        self._side = side
        self._hs: handshake.Handshake | None = handshake.Handshake(context, side)  # until the hand-over
        if prefix:
            self._hs.feed(prefix)
        # After the handshake: the record layer, what is left of the ciphertext read (a partial record, or whole
        # records there was no room to open yet) and plaintext opened beyond what the last receive wanted.
        self._session: records.Session | None = None
        self._cin: bytes = b""
        self._plain_left: bytes = b""
        self._drained = False  # the last socket read got less than it asked for: wait before the next one
        self._negotiated: tuple[str | None, str | None, str | None] = (None, None, None)
        self._alpn: bytes | None = None
        self._draining = False  # a task is moving queued ciphertext to the transport (see _flush)
        self._drain_done: trio.lowlevel.ParkingLot | None = None  # tasks waiting for that drain to end
        self._reading = False  # a task is reading the transport into the incoming BIO (see _fill)
        self._read_done: trio.lowlevel.ParkingLot | None = None
        self._handshake_waiters: trio.lowlevel.ParkingLot | None = None  # set while a task runs the handshake
        # Our last handshake records, when they wait to leave in one write with the first records after them (see
        # do_handshake); `_held_before_read`: they must also be out before we wait for the peer.
        self._held: bytes = b""
        self._held_before_read = False
        self._handshake_done = False
        self._eof_sent = False
        self._eof_received = False
        self._closed = False
        self._broken: str | None = None
        self._sending = False  # the Stream contract: one task per direction (BusyResourceError otherwise)
        # Called when a socket transport takes more ciphertext after waiting (see netio.send_raw): the relay's idle
        # timer, so a send held back by a slow reader counts as progress.
        self.send_progress: Callable[[], object] | None = None
        self._receiving = False
        # The fatal alert we sent the peer for a protocol violation or a refusal (records.ALERT_NAMES), else None:
        # what the relay names the connection's end after, and the sign that the close must give the peer time to
        # read it (see close_refused).
        self.violation: int | None = None

    # --- errors ------------------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> BaseException:
        """OpenSSL and transport failures → HandshakeError (during the handshake) or BrokenResourceError. A
        transport closed under us (ClosedResourceError: closed by another task, a drain) is a failure too: during the
        handshake it is a refusal like any other, not an error the caller does not expect. (When this stream itself
        was closed, its callers re-raise ClosedResourceError instead, as trio's Stream contract wants.)"""
        if isinstance(exc, handshake.HandshakeFailure):
            reason = exc.reason
        elif isinstance(exc, trio.ClosedResourceError):
            reason = f"transport closed: {exc}"
        elif isinstance(exc, (records.RecordError, records.PeerAlert)):
            reason = str(exc)
        else:
            reason = f"transport broken: {exc}"
        self._broken = reason
        if not self._handshake_done:
            return HandshakeError(self.peer, reason)
        return trio.BrokenResourceError(reason)

    async def _alert_and_fail(self, exc: BaseException) -> BaseException:
        # An alert saying why is queued (by OpenSSL, or by us for a record error): send it, and a FIN after it, so
        # the peer fails now and reads why, not at its timeout. The stream is broken first: nothing of ours may
        # follow the alert (another task's send finds it broken). During the handshake the peer is also given
        # REFUSE_LINGER to read it before our caller resets the connection; afterwards that is close_refused's.
        failure = self._fail(exc)
        if isinstance(exc, records.RecordError) and self._session is not None and self.violation is None:
            self.violation = exc.alert
            with contextlib.suppress(records.RecordError):  # keys wiped: nothing can be sent any more
                self._session.alert(exc.alert)
        if isinstance(exc, (handshake.HandshakeFailure, records.RecordError)):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._flush()
                self._shut_write()
                if not self._handshake_done:
                    await self._linger()
        return failure

    def _shut_write(self) -> None:
        """Our FIN after a fatal alert, on a socket transport (other transports are closed by the caller)."""
        sock = self._socket
        if sock is not None and not sock.socket.did_shutdown_SHUT_WR and sock.socket.fileno() >= 0:
            with contextlib.suppress(OSError):
                sock.socket.shutdown(socket.SHUT_WR)

    async def _linger(self) -> bool:
        """After our fatal alert and FIN: wait up to REFUSE_LINGER for the peer to close, reading and dropping up to
        REFUSE_LINGER_BYTES of what it still sends, so that its writes meanwhile do not meet a reset before it has
        read the alert. True when the peer closed (or reset) within that; False when it kept talking or stayed."""
        sock = self._socket
        if sock is None:
            return False
        fd = sock.socket.fileno()
        if fd < 0:
            return True
        budget = REFUSE_LINGER_BYTES
        with trio.move_on_after(REFUSE_LINGER):
            while budget > 0:
                await trio.lowlevel.wait_readable(fd)  # a checkpoint per read: a talkative peer cannot hold the loop
                try:
                    data = os.read(fd, min(budget, TRANSPORT_READ))
                except BlockingIOError:
                    continue
                except OSError:
                    return True  # reset by the peer: nothing left to protect
                if not data:
                    return True
                budget -= len(data)
        return False

    async def close_refused(self) -> None:
        """Close a stream whose peer we refused with a fatal alert (already sent): our FIN, then the linger (see
        `_linger`), then a plain close when the peer closed meanwhile or an RST when it did not. The traffic secrets
        are wiped. Bounded by REFUSE_LINGER; any failure just ends in the reset."""
        self._shut_write()
        closed = False
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            closed = await self._linger()
        self._broken = self._broken or "refused"
        if closed and self._socket is not None:
            self._closed = True
            self._wipe()
            self._socket.socket.close()
        else:
            await netio.abort_close(self)

    async def refuse(self, alert: int) -> None:
        """Refuse the peer after the handshake (a policy denial): send the fatal `alert`, then `close_refused`."""
        if self._session is not None and self._broken is None and not self._closed:
            self.violation = alert
            self._broken = f"refused with alert {records.ALERT_NAMES.get(alert, alert)}"
            with contextlib.suppress(records.RecordError, trio.BrokenResourceError, trio.ClosedResourceError):
                self._session.alert(alert)
                await self._flush()
            await self.close_refused()
        else:
            await netio.abort_close(self)

    def _wipe(self) -> None:
        # L2: both traffic secrets go with the connection (refused or closed), not with the object's last reference.
        if self._session is not None:
            self._session.wipe()

    # --- the handshake path: `handshake.Handshake` stepped until done ---------------------------------------------

    async def _run_handshake(self) -> None:
        """Step the handshake until OpenSSL needs no more input, sending what it writes and reading what it asks
        for. The output of the final, successful step stays with OpenSSL (it goes to the record layer with the
        connection)."""
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        hs = self._hs
        assert hs is not None
        yielded = False
        while True:
            try:
                done = hs.step()
            except handshake.HandshakeFailure as exc:
                raise await self._alert_and_fail(exc) from exc
            try:
                if not done and await self._flush():
                    yielded = True
                if done:
                    if not yielded:
                        await trio.lowlevel.checkpoint()
                    return
                if not await self._fill(hs):
                    await trio.lowlevel.checkpoint()  # a peer that keeps the socket full gets one step per round
            except trio.ClosedResourceError as exc:
                if self._closed:
                    raise  # this stream was closed (aclose in another task): the Stream contract's error
                raise self._fail(exc) from exc
            except trio.BrokenResourceError as exc:
                raise self._fail(exc) from exc
            yielded = True

    async def _fill(self, hs: handshake.Handshake) -> bool:
        """During the handshake: read one chunk of ciphertext from the transport and feed it to OpenSSL (or wait
        for another task's read, then the caller retries). Returns whether it awaited."""
        if self._reading:
            if self._read_done is None:
                self._read_done = trio.lowlevel.ParkingLot()
            await self._read_done.park()
            return True
        self._reading = True
        awaited = False
        try:
            if self._socket is not None:
                fd = self._socket.socket.fileno()
                while True:
                    try:
                        data = os.read(fd, TRANSPORT_READ)
                        break
                    except BlockingIOError:
                        pass  # wait outside the except clause: a parked task must not keep the exception alive
                    except OSError as exc:
                        raise netio.stream_error(exc) from exc
                    await trio.lowlevel.wait_readable(fd)
                    awaited = True
            else:
                data = bytes(await self.transport_stream.receive_some(TRANSPORT_READ))
                awaited = True
            if data:
                hs.feed(data)
            else:
                hs.feed_eof()
            return awaited
        finally:
            self._reading = False
            if self._read_done is not None:
                self._read_done.unpark_all()

    # --- sending: OpenSSL's outgoing BIO during the handshake, the record layer's queue after it -----------------

    def _take_output(self) -> bytes | bytearray:
        """The oldest ciphertext waiting to be sent, b"" when nothing."""
        session = self._session
        if session is not None:
            if self._held:
                held, self._held = self._held, b""
                return held + session.take()
            return session.take() if session.outgoing else b""
        return b"" if self._hs is None else self._hs.take_output()

    async def _flush(self, *, wait: bool = True) -> bool:
        """Send all waiting ciphertext, in order. True when it awaited (a socket transport is written without a
        checkpoint when it takes everything at once).

        With `wait=False` (the receive path) a drain in progress in another task will take what we added before it
        ends (it ends only after finding nothing left), so we need not wait. Waiting there would deadlock a
        full-duplex relay: our receive would wait behind our own blocked send while the peer's send waits for our
        receive."""
        awaited = False
        if self._draining:
            if not wait:
                return False
            if self._drain_done is None:
                self._drain_done = trio.lowlevel.ParkingLot()
            while self._draining:
                await self._drain_done.park()
            awaited = True
        data = self._take_output()
        if not data:
            return awaited
        self._draining = True
        try:
            sock = self._socket
            while data:
                try:
                    if sock is not None:
                        # One write usually takes it all: netio.send_raw (its coroutine, its view) only for the
                        # rest, which may have to wait.
                        try:
                            sent = os.write(sock.socket.fileno(), data)
                        except BlockingIOError:
                            sent = 0
                        except OSError as exc:
                            raise netio.stream_error(exc) from exc
                        if sent < len(data) and await netio.send_raw(sock, memoryview(data)[sent:], self.send_progress):
                            awaited = True
                    else:
                        await self.transport_stream.send_all(data)
                        awaited = True
                except trio.Cancelled:
                    # Part of a record may be out: the TLS stream can no longer be trusted.
                    self._broken = "cancelled while sending"
                    raise
                data = self._take_output()
            return awaited
        finally:
            self._draining = False
            if self._drain_done is not None:
                self._drain_done.unpark_all()

    # --- handshake ---------------------------------------------------------------------------------------------

    async def do_handshake(self, verify: Callable[[], object] | None = None, *, send_last: bool = True) -> None:
        """Run the TLS handshake (once; concurrent callers wait for it). Raises `HandshakeError`.

        `verify` runs once OpenSSL has finished, before our last flight leaves: a client that refuses the server
        (by raising `HandshakeError`) never sends its Finished, so the server never completes a handshake with it
        and never reaches its app. Then the connection moves to the record layer (`_hand_over`).

        What OpenSSL wrote last is held to leave in one write with our first records (one segment, one read for
        the peer) or with close_notify. A server's last records are its session tickets, which nobody waits for.
        A client's are its Finished, which the server does wait for: it leaves here, unless `send_last=False` (a
        client about to send), and then at the latest when this stream first waits to receive."""
        if self._handshake_done:
            return
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._handshake_waiters is not None:  # another task is running it: wait for its outcome
            await self._handshake_waiters.park()
            if self._handshake_done:
                return
            raise HandshakeError(self.peer, self._broken or "the handshake failed")
        self._handshake_waiters = trio.lowlevel.ParkingLot()
        try:
            try:
                await self._run_handshake()
            except trio.BrokenResourceError as exc:  # broken before: report as a handshake failure
                raise HandshakeError(self.peer, str(exc)) from exc
            try:
                if verify is not None:
                    verify()
                self._hand_over()
            except HandshakeError as exc:
                self._broken = exc.reason
                if isinstance(exc, PeerRefused) and self._side is Side.SERVER:
                    await self._refuse_after_handshake(exc.alert)
                raise
            try:
                if self._side is Side.CLIENT and send_last:
                    await self._flush()
            except trio.ClosedResourceError as exc:
                if self._closed:
                    raise
                raise self._fail(exc) from exc
            except trio.BrokenResourceError as exc:
                raise self._fail(exc) from exc
            self._handshake_done = True
        finally:
            # Waiters wake to the outcome; after a failure or a cancellation a later call starts afresh (and finds
            # the stream broken when it is).
            self._handshake_waiters.unpark_all()
            self._handshake_waiters = None

    async def _refuse_after_handshake(self, alert: int) -> None:
        """A server refusing a client whose handshake succeeded (see `check_peer`): the client's Finished is in, so
        the alert goes under our application traffic key, through the record layer, after our held records (the
        sequence numbers count them). Then our FIN and the linger; the caller resets."""
        try:
            self._hand_over()
        except HandshakeError:
            return  # no record layer to say it with: the caller's reset says it
        session = self._session
        assert session is not None
        self.violation = alert
        with contextlib.suppress(records.RecordError, trio.BrokenResourceError, trio.ClosedResourceError):
            session.alert(alert)
            await self._flush()
            self._shut_write()
            await self._linger()
        self._wipe()

    def _hand_over(self) -> None:
        """Take the connection over from OpenSSL (see `handshake.Handshake.hand_over`). Raises `HandshakeError`."""
        assert self._hs is not None
        try:
            handed = self._hs.hand_over()
        except handshake.HandshakeFailure as exc:
            raise HandshakeError(self.peer, exc.reason) from exc
        self._hs = None
        self._held = handed.held
        self._held_before_read = self._side is Side.CLIENT
        self._negotiated = handed.negotiated
        self._alpn = handed.alpn
        self._cin = handed.unread
        self._session = handed.session

    async def _ensure_handshake(self) -> None:
        """The implicit handshake of send_all/receive_some/send_eof: failures are a broken stream there."""
        if self._handshake_done:
            return
        try:
            await self.do_handshake()
        except HandshakeError as exc:
            raise trio.BrokenResourceError(exc.reason) from exc

    @property
    def negotiated(self) -> tuple[str | None, str | None, str | None]:
        """(protocol version, cipher suite, key exchange group) after the handshake."""
        return self._negotiated if self._hs is None else self._hs.negotiated()

    def peer_certificate_der(self) -> bytes | None:
        """The peer's leaf in DER, without parsing it; None once the handshake is over (it is not kept)."""
        return None if self._hs is None else self._hs.peer_certificate_der()

    def alpn(self) -> bytes | None:
        return self._alpn if self._hs is None else self._hs.alpn()

    # --- the Stream interface ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not await self.send_chunk(data):
            await trio.lowlevel.checkpoint()

    async def send_chunk(self, data: bytes | bytearray | memoryview) -> bool:
        """`send_all` without its checkpoint when nothing had to wait; returns whether it waited. For loops that
        checkpoint once per round themselves (the relay)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already in send_all/send_eof")
        self._sending = True
        try:
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof was already called")
            yielded = False
            if not self._handshake_done:
                await self._ensure_handshake()
                yielded = True
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            session = self._session
            assert session is not None
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            inner = _SCRATCH.inner
            size = len(view)
            for start in range(0, size, SEND_CHUNK):
                session.seal(view[start : start + SEND_CHUNK] if size > SEND_CHUNK else view, inner)
                try:
                    if await self._flush():
                        yielded = True
                except trio.BrokenResourceError as exc:
                    raise self._fail(exc) from exc
            return yielded
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

    def _open(self, ciphertext: memoryview, max_bytes: int) -> bytes | None:
        """Open the whole records of `ciphertext`, keep what follows them in `_cin`: up to `max_bytes` of
        plaintext (the rest is kept for the next call), b"" at close_notify, None when there was no application
        data. Raises `records.RecordError`/`PeerAlert` (after delivering any good records before the bad one)."""
        session = self._session
        assert session is not None
        plain = _SCRATCH.plain_view
        used, produced = session.open_into(ciphertext, plain)
        self._cin = bytes(ciphertext[used:]) if used < len(ciphertext) else b""
        if produced:
            if produced > max_bytes:
                self._plain_left = bytes(plain[max_bytes:produced])
                produced = max_bytes
            return bytes(plain[:produced])
        if session.closed:
            return b""
        return None

    async def _read_records(self, max_bytes: int) -> tuple[bytes | None, bool]:
        """Read the transport once and open what came (see `_open`): (data or None, whether it awaited)."""
        awaited = False
        if self._socket is not None:
            fd = self._socket.socket.fileno()
            view = _SCRATCH.read_view
            if self._drained:  # the socket is most likely empty: wait, rather than make a read that finds nothing
                if fd < 0:  # closed under us (trio's wait would refuse -1 with a ValueError)
                    raise trio.ClosedResourceError("this socket was already closed")
                await trio.lowlevel.wait_readable(fd)
                awaited = True
            while True:
                # What is left of a partial record goes first; no await between this copy and the opening below.
                cin = self._cin
                left = len(cin)
                if left:
                    view[:left] = cin
                try:
                    n = os.readv(fd, [view[left : left + TRANSPORT_READ]])
                    break
                except BlockingIOError:
                    pass  # wait outside the except clause: an idle connection must not keep the exception alive
                except OSError as exc:
                    raise netio.stream_error(exc) from exc
                await trio.lowlevel.wait_readable(fd)
                awaited = True
            if not n:
                raise self._truncated()
            self._drained = n < TRANSPORT_READ
            return self._open(view[: left + n], max_bytes), awaited
        data = await self.transport_stream.receive_some(TRANSPORT_READ)
        if not data:
            raise self._truncated()
        return self._open(memoryview(self._cin + data), max_bytes), True

    def _truncated(self) -> trio.BrokenResourceError:
        # No close_notify: a truncation, not an end (RFC 8446 §6.1).
        reason = "in a record, connection closed by peer" if self._cin else "connection closed by peer"
        self._broken = reason
        return trio.BrokenResourceError(reason)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data, yielded = await self.receive_chunk(RECORD_SIZE if max_bytes is None else max_bytes)
        if not yielded:
            await trio.lowlevel.checkpoint()
        return data

    async def receive_chunk(self, max_bytes: int, _short: bool = False) -> tuple[bytes, bool]:
        """`receive_some` without its checkpoint when nothing had to wait: (data, whether it waited). For loops
        that checkpoint once per round themselves (the relay)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already in receive_some")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the TLS stream is closed")
            if type(max_bytes) is not int:
                max_bytes = operator.index(max_bytes)  # TypeError for anything but an integer
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            yielded = False
            if not self._handshake_done:
                await self._ensure_handshake()
                yielded = True
            if self._plain_left:
                left = self._plain_left
                self._plain_left = left[max_bytes:]
                return left[:max_bytes], yielded
            if self._eof_received:
                return b"", yielded
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            session = self._session
            assert session is not None
            data: bytes | None = None
            try:
                while True:
                    # What we owe the peer goes out first: a held Finished, before we wait for the answer to it,
                    # and, after a read, the answer to a KeyUpdate it sent.
                    owed = session.outgoing or (self._held_before_read and self._held)
                    if owed and await self._flush(wait=False):
                        yielded = True
                    if data is not None:
                        break
                    if session.queued > OUTGOING_LIMIT:
                        # A peer that makes us owe it more than it reads: stop reading it until our queue drains.
                        await self._flush()
                        yielded = True
                        continue
                    awaited = False
                    if session.closed:
                        data = b""
                    elif self._cin and _ready(self._cin):
                        data = self._open(memoryview(self._cin), max_bytes)
                    else:
                        data, awaited = await self._read_records(max_bytes)
                        yielded = yielded or awaited
                    if data is None and not awaited:
                        # Records without application data (at most records.MAX_IDLE_RECORDS in a row, each read
                        # at most TRANSPORT_READ): one read's worth per trip through the scheduler, so a peer that
                        # keeps the socket full of them cannot hold the loop.
                        await trio.lowlevel.checkpoint()
                        yielded = True
            except (records.RecordError, records.PeerAlert) as exc:
                raise await self._alert_and_fail(exc) from exc
            except trio.BrokenResourceError as exc:
                raise self._fail(exc) from exc
            if not data:
                self._eof_received = True
            return data, yielded
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        """Send close_notify (and a FIN when the transport half-closes); receiving goes on."""
        if not await self._send_eof():
            await trio.lowlevel.checkpoint()

    async def _send_eof(self) -> bool:
        if self._sending:
            raise trio.BusyResourceError("another task is already in send_all/send_eof")
        self._sending = True
        try:
            self._check_open()
            awaited = False
            if not self._handshake_done:
                await self._ensure_handshake()
                awaited = True
            if self._eof_sent:
                return awaited
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            self._eof_sent = True
            assert self._session is not None
            self._session.alert(records.CLOSE_NOTIFY)
            try:
                if await self._flush():
                    awaited = True
            except trio.BrokenResourceError as exc:
                raise self._fail(exc) from exc
            transport = self._socket
            if transport is not None:
                await netio.send_eof_raw(transport)  # a FIN, at once
            elif isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
                await self.transport_stream.send_eof()
                awaited = True
            return awaited
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Close: send close_notify when nothing went wrong and it is not sent yet, then close the transport."""
        if not await self._close():
            await trio.lowlevel.checkpoint()

    async def _close(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        awaited = False
        try:
            if self._session is not None and not self._eof_sent and self._broken is None:
                self._eof_sent = True
                self._session.alert(records.CLOSE_NOTIFY)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    awaited = await self._flush()
        finally:
            if self._hs is not None:  # a connection never handed over
                self._hs.free()
                self._hs = None
            self._wipe()
            transport = self._socket
            if transport is not None:
                transport.socket.close()
            else:
                await self.transport_stream.aclose()
                awaited = True
        return awaited


def _ready(data: bytes) -> bool:
    """Whether `data` (ciphertext kept from the last read, or left behind the handshake) is to be opened now: it
    holds a whole record, or a header no record may have, which is judged at once rather than when more comes."""
    if not data:
        return False
    if data[0] != records.APPLICATION_DATA:
        return True
    if len(data) < records.HEADER_SIZE:
        return False
    length = (data[3] << 8) | data[4]
    return len(data) >= records.HEADER_SIZE + length or not records.TAG_SIZE < length <= records.MAX_CIPHERTEXT


# The SVID leaf rules depend on nothing but the certificate's bytes (OpenSSL checks the chain and the validity period
# on every handshake), and a peer presents the same leaf on every connection until it rotates: their verdict is
# remembered per leaf instead of parsing it again each time. Bounded: emptied when full.
LEAF_VERDICTS_MAX = 1024
_LEAF_VERDICTS: dict[bytes, SpiffeId | str] = {}
PeerVerdict = tuple[str, int]  # a refused leaf: the reason, and the fatal alert that tells the peer (records)


class PeerStream(Protocol):
    """What `check_peer` reads of a TLS stream: `TLSStream`, or `sslstream.OpenSSLStream`."""

    peer: str
    peer_id: SpiffeId | None

    def alpn(self) -> bytes | None: ...
    def peer_certificate_der(self) -> bytes | None: ...


def judge_leaf(der: bytes, trust_domain: TrustDomain, expected: Sequence[SpiffeId] = ()) -> SpiffeId | PeerVerdict:
    """The pure checks of a peer's leaf (DER): the SVID rules, our trust domain and, when `expected` names
    identities, one of them. Returns its SPIFFE ID, or the refusal: (reason, the alert that says it)."""
    verdict = _LEAF_VERDICTS.get(der)
    if verdict is None:
        try:
            verdict = svid.leaf_spiffe_id(x509.load_der_x509_certificate(der))
        except CertificateError as exc:
            verdict = f"peer certificate is not a valid SVID: {exc.message}"
        if len(_LEAF_VERDICTS) >= LEAF_VERDICTS_MAX:
            _LEAF_VERDICTS.clear()
        _LEAF_VERDICTS[der] = verdict
    if isinstance(verdict, str):
        return verdict, records.BAD_CERTIFICATE
    if verdict.trust_domain != trust_domain:
        return f"peer {verdict} is not in trust domain {trust_domain}", records.BAD_CERTIFICATE
    if expected and verdict not in expected:
        shown = ", ".join(str(e) for e in expected)
        return f"peer {verdict} is not an expected identity ({shown})", records.ACCESS_DENIED
    return verdict


def leaf_check(trust_domain: TrustDomain, expected: Sequence[SpiffeId] = ()) -> handshake.LeafCheck:
    """`judge_leaf` as a connection's check inside the handshake (`handshake.Handshake.check_leaf`): None to accept,
    else the refusal's reason (the same text `check_peer` gives)."""

    def check(der: bytes) -> str | None:
        verdict = judge_leaf(der, trust_domain, expected)
        return verdict[0] if isinstance(verdict, tuple) else None

    return check


def check_peer(
    stream: PeerStream, trust_domain: TrustDomain, expected: Sequence[SpiffeId] = (), *, require_alpn: bool = True
) -> SpiffeId:
    """After the handshake: the peer's leaf obeys the SVID rules, is in our trust domain and, when `expected` names
    identities (secure naming), is one of them (`judge_leaf`). Returns its SPIFFE ID; raises `HandshakeError` with
    the reason. `require_alpn=False` (explicit listeners, which serve any standard TLS peer): whatever ALPN was
    negotiated, or none; the capture listeners require `mtlsmesh`, their marker of mesh traffic.

    Where the connection checked the leaf inside the handshake already (`leaf_check`: every client, and every
    connection with OpenSSL's record layer), this is a second look at the same leaf, from the verdict cache."""
    if require_alpn and stream.alpn() != ALPN:
        raise HandshakeError(stream.peer, "peer did not negotiate ALPN mtlsmesh")
    der = stream.peer_certificate_der()
    if der is None:
        raise HandshakeError(stream.peer, "peer presented no certificate")
    verdict = judge_leaf(der, trust_domain, expected)
    if isinstance(verdict, tuple):
        raise PeerRefused(stream.peer, *verdict)
    stream.peer_id = verdict
    return verdict


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
) -> TLSStream:
    """Handshake over `transport` and check the peer's SVID. The caller bounds it in time and closes `transport`
    on error. Raises `HandshakeError`. `send_last`: see `TLSStream.do_handshake`; `prefix`: see `TLSStream`;
    `require_alpn`: see `check_peer`."""
    stream = TLSStream(transport, context, side, peer, prefix=prefix)
    if side is Side.CLIENT and stream._hs is not None:
        # A client refuses the server inside the handshake, so that OpenSSL's alert tells it why (our Finished is
        # not sent yet when we judge it, so no record of ours could). A server judges its client after the
        # handshake (check_peer) and says why with bad_certificate or access_denied under its application key.
        stream._hs.check_leaf(leaf_check(trust_domain, expected))
    await stream.do_handshake(
        lambda: check_peer(stream, trust_domain, expected, require_alpn=require_alpn), send_last=send_last
    )
    return stream
