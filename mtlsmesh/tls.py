"""Mutual TLS between sidecars: pyOpenSSL contexts and a TLS stream over any trio stream.

What it does: `build_context` turns an SVID (chain + key) and a trust bundle into a TLS 1.3-only pyOpenSSL
context that presents the SVID, requires the peer's certificate and lets OpenSSL validate the peer's chain against
the bundle. `TLSStream` runs TLS over any `trio.abc.Stream` (a socket, a memory pair, a replaying wrapper) and is
itself a `trio.abc.HalfCloseableStream`. `open_mtls` does the handshake and then checks the peer's SPIFFE ID
(the SVID leaf rules, our trust domain, the expected identities) before anyone sends an application byte.

What it does not: pick identities or decide policy (see `policy`), load or reload files (see `credentials`), or
speak any TLS version but 1.3 (a TLS 1.2 peer fails the handshake with "unsupported protocol").

Theory of operation
-------------------
The `SSL.Connection` is built with no socket (`SSL.Connection(ctx, None)`), so OpenSSL reads ciphertext from a
memory BIO we fill and writes ciphertext to a memory BIO we drain. OpenSSL never does I/O itself; it only says "I
need more input" (WANT_READ). The handshake and the shutdown go through `_retry` with pyOpenSSL's calls:

    call fn (do_handshake / shutdown)  →  drain the outgoing BIO to the transport  →  if OpenSSL wanted input,
    read one chunk from the transport into the incoming BIO and call fn again.

The data path (`send_all`, `receive_some`) is straight-line code over the raw binding (`SSL_write`, `SSL_read`,
`BIO_read`/`BIO_write` on pyOpenSSL's own `SSL*` and BIOs): no exception for "no data yet", no lock objects. Errors
still go through pyOpenSSL's `_raise_ssl_error`, so they are the same `SSL.Error`s. Partial writes are off, so one
`SSL_write` encrypts a whole `SEND_CHUNK`; `receive_some` decrypts every whole record OpenSSL holds, up to
`max_bytes`, and reads the transport only when OpenSSL holds none (`_starved`), so one socket write or read carries
many records. Ciphertext and plaintext pass through per-thread scratch buffers, never a fresh buffer per call.

Two tasks may use the stream at once (one sending, one receiving, as the relay does). The outgoing BIO is drained
by one task at a time (`_draining`; a task that must wait parks), and the draining task goes on until the BIO is
empty, so ciphertext leaves in the order OpenSSL produced it whichever task drains it. Reads from the transport are
made by one task at a time (`_reading`); a task that needs input while another task is already reading waits for
that read and retries instead of reading twice. In TLS 1.3 a `send` never needs input after the handshake, so in
practice only `receive_some` reads. The receive path never waits for a drain: the draining task takes what we
added, and waiting would deadlock a full-duplex relay whose send is blocked on a peer that is itself blocked sending
to us.

Half-close: `send_eof` sends close_notify (and a FIN when the transport can half-close); TLS 1.3 lets the peer go on
sending (RFC 8446 §6.1). Receiving close_notify makes `receive_some` return b"". A transport EOF without close_notify
is a truncation and raises `trio.BrokenResourceError`.

Errors are translated by `_fail`: an OpenSSL or transport error (broken or closed) during the handshake becomes
`HandshakeError`, afterwards `trio.BrokenResourceError`. `open_mtls` checks the peer before our last handshake
flight leaves.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtlsmesh import netio, svid
from mtlsmesh.errors import CertificateError, HandshakeError
from mtlsmesh.identity import SpiffeId, TrustDomain
from mtlsmesh.pem import PrivateKey

ALPN = b"mtlsmesh"  # DESIGN.md §1: the ALPN that marks mesh traffic for the inbound sniffer

# Key exchange groups offered between sidecars, most preferred first. X25519MLKEM768 is the hybrid post-quantum
# group (OpenSSL >= 3.5 names it so); older OpenSSL builds refuse the list and we fall back to the classic pair.
PQ_GROUPS = b"X25519MLKEM768:X25519:P-256"
CLASSIC_GROUPS = b"X25519:P-256"

# What two sidecars negotiate with the OpenSSL that pyOpenSSL bundles here (checked by tests/integration/test_tls):
# TLS 1.3, cipher suite TLS_AES_256_GCM_SHA384 (OpenSSL's default TLS 1.3 order), key exchange X25519MLKEM768,
# signature ECDSA P-256/SHA-256 with the default SVID key type. With an OpenSSL older than 3.5: X25519.
NEGOTIATED_VERSION = "TLSv1.3"
NEGOTIATED_CIPHER = "TLS_AES_256_GCM_SHA384"
NEGOTIATED_GROUP_PQ = "X25519MLKEM768"

RECORD_SIZE = 16384  # TLS max plaintext record (RFC 8446 §5.1): what receive_some returns when not told a size
# OpenSSL's memory BIOs never give back what they grew to, so these two also bound what a connection keeps after a
# bulk transfer (about 90 KiB per direction). 64 KiB used less CPU per GB than 256 KiB (measured) and 4x fewer
# Python rounds than one record.
SEND_CHUNK = 64 * 1024  # plaintext handed to OpenSSL per SSL_write
BIO_DRAIN = SEND_CHUNK + 16 * 1024  # ciphertext taken from the outgoing BIO per transport write (a chunk + overhead)
TRANSPORT_READ = 64 * 1024  # ciphertext read from the transport per call (several records at once)
RECV_SCRATCH_SIZE = 256 * 1024  # plaintext decrypted per receive_some at most


# Scratch buffers shared by every stream of a thread: the data path copies through them instead of allocating a
# buffer of the requested size per call as pyOpenSSL's recv/bio_read do. Sharing is safe because each use is
# synchronous (filled and copied out with no await in between) and trio runs one task at a time per thread; they
# are per thread because cffi calls let other threads run.
class _Scratch(threading.local):
    def __init__(self) -> None:
        self.drain = _ffi.new("char[]", BIO_DRAIN)
        self.plain = _ffi.new("char[]", RECV_SCRATCH_SIZE)
        read = bytearray(TRANSPORT_READ)
        self.read_c = _ffi.from_buffer(read)
        self.read_list = [read]


_SCRATCH = _Scratch()
_PTR = _ffi.new("char **")  # BIO_get_mem_data's out-parameter, never read

T = TypeVar("T")


def _probe_groups() -> bytes | None:
    """The groups list this OpenSSL accepts, or None when setting groups is not possible at all."""
    # pyOpenSSL exposes no groups setter; its cffi binding does.
    setter = getattr(_lib, "SSL_CTX_set1_curves_list", None)  # "curves" is OpenSSL's older name for groups
    if setter is None:  # pragma: no cover
        return None
    probe = SSL.Context(SSL.TLS_METHOD)
    for groups in (PQ_GROUPS, CLASSIC_GROUPS):
        if setter(probe._context, groups) == 1:
            return groups
    return None  # pragma: no cover


GROUPS = _probe_groups()  # what build_context sets; None: OpenSSL's defaults


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Material:
    """An SVID and a trust bundle, already parsed: `chain` is the leaf first, then intermediates."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    roots: tuple[x509.Certificate, ...]


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    # A peer that does not offer our ALPN is not a sidecar: fail the handshake with no_application_protocol.
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


def build_context(material: Material, side: Side) -> SSL.Context:
    """A fresh TLS 1.3-only context presenting `material`'s SVID and trusting its roots.

    A new context per credential reload: adding roots to a live context's store only ever grows it.
    Raises `CertificateError` when OpenSSL refuses the key or a certificate.
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if side is Side.SERVER else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # No resumption: a resumed session would skip the client certificate check we rely on. OP_NO_TICKET turns off
    # stateless tickets and, with the session cache off, the stateful ones OpenSSL still sends after a TLS 1.3
    # handshake name nothing it could resume (pyOpenSSL cannot set their number to 0). Our clients never offer one.
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # pyOpenSSL turns partial writes on; over a memory BIO, which never blocks, they only cut every SSL_write to one
    # record. Off, one SSL_write encrypts a whole SEND_CHUNK. Released buffers: an idle connection hands its record
    # buffers back to malloc instead of keeping them for the next record.
    _lib.SSL_CTX_clear_mode(ctx._context, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    ctx.set_mode(_lib.SSL_MODE_RELEASE_BUFFERS)
    try:
        ctx.use_certificate(material.chain[0])
        for intermediate in material.chain[1:]:
            ctx.add_extra_chain_cert(intermediate)
        ctx.use_privatekey(material.key)
        ctx.check_privatekey()
        store = ctx.get_cert_store()
        if store is None:  # pragma: no cover - a fresh context always has a store
            raise CertificateError("", "OpenSSL gave no certificate store")
        for root in material.roots:
            store.add_cert(crypto.X509.from_cryptography(root))
    except (SSL.Error, crypto.Error) as exc:
        raise CertificateError("", f"OpenSSL refused the credential: {_openssl_reason(exc)}") from exc
    # OpenSSL validates the peer's chain against the bundle (no callback: its verdict stands); the SPIFFE rules are
    # checked after the handshake by `check_peer`.
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if GROUPS is not None:
        _lib.SSL_CTX_set1_curves_list(ctx._context, GROUPS)
    if side is Side.SERVER:
        ctx.set_alpn_select_callback(_select_alpn)
        ctx.set_session_id(b"mtlsmesh")
    else:
        ctx.set_alpn_protos([ALPN])
    return ctx


def _openssl_reason(exc: BaseException) -> str:
    """The most useful line of an OpenSSL error: the last reason string of its error queue."""
    args = exc.args
    if args and isinstance(args[0], list) and args[0]:
        entry = args[0][-1]
        if isinstance(entry, tuple) and entry:
            return str(entry[-1])
    if isinstance(exc, SSL.SysCallError):
        return "connection closed by peer"
    return str(exc) or type(exc).__name__


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over `transport_stream`; see the module docstring for how it works.

    `peer` labels the other end in errors. `peer_id` is set by `open_mtls` once the peer's SVID is checked.
    """

    def __init__(self, transport_stream: trio.abc.Stream, context: SSL.Context, side: Side, peer: str = "peer"):
        self.transport_stream = transport_stream
        self.peer = peer
        self.peer_id: SpiffeId | None = None
        conn = self._conn = SSL.Connection(context, None)
        if side is Side.SERVER:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        self._ssl = conn._ssl  # the raw SSL* and the two memory BIOs, for the data path (see _lib)
        self._out_bio = conn._from_ssl
        self._in_bio = conn._into_ssl
        self._draining = False  # a task is moving the outgoing BIO to the transport (see _flush)
        self._drain_done: trio.lowlevel.ParkingLot | None = None  # tasks waiting for that drain to end
        self._reading = False  # a task is reading the transport into the incoming BIO (see _fill)
        self._read_done: trio.lowlevel.ParkingLot | None = None
        self._starved = True  # OpenSSL holds no whole record: the next read must go to the transport first
        self._read_error: SSL.Error | None = None  # an error found after good records, raised at the next read
        self._handshake_lock: trio.Lock | None = None
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

    # --- errors ------------------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> BaseException:
        """OpenSSL and transport failures → HandshakeError (during the handshake) or BrokenResourceError. A
        transport closed under us (ClosedResourceError: closed by another task, a drain) is a failure too: during the
        handshake it is a refusal like any other, not an error the caller does not expect. (When this stream itself
        was closed, its callers re-raise ClosedResourceError instead, as trio's Stream contract wants.)"""
        if isinstance(exc, SSL.Error):
            reason = _openssl_reason(exc)
        elif isinstance(exc, trio.ClosedResourceError):
            reason = f"transport closed: {exc}"
        else:
            reason = f"transport broken: {exc}"
        self._broken = reason
        if not self._handshake_done:
            return HandshakeError(self.peer, reason)
        return trio.BrokenResourceError(reason)

    async def _alert_and_fail(self, exc: BaseException) -> BaseException:
        # OpenSSL queued an alert saying why: send it so the peer fails now, not at its timeout.
        if isinstance(exc, SSL.Error):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._flush()
        return self._fail(exc)

    # --- the handshake and shutdown path: pyOpenSSL calls, retried on WantReadError ------------------------------

    async def _retry(self, fn: Callable[..., T], *args: Any, hold_last: bool = False) -> T:
        """Call `fn` until OpenSSL needs no more input, sending what it writes. `hold_last`: leave the output of the
        final, successful call in the BIO (the client's Finished, until the caller has judged the server)."""
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        yielded = False
        while True:
            want_read = False
            try:
                result = fn(*args)
            except SSL.WantReadError:
                want_read = True
            except SSL.Error as exc:
                raise await self._alert_and_fail(exc) from exc
            try:
                if (want_read or not hold_last) and await self._flush():
                    yielded = True
                if not want_read:
                    if not yielded:
                        await trio.lowlevel.checkpoint()
                    return result
                await self._fill()
            except trio.ClosedResourceError as exc:
                if self._closed:
                    raise  # this stream was closed (aclose in another task): the Stream contract's error
                raise self._fail(exc) from exc
            except trio.BrokenResourceError as exc:
                raise self._fail(exc) from exc
            yielded = True

    # --- moving ciphertext between OpenSSL's memory BIOs and the transport --------------------------------------

    def _take_output(self) -> bytes:
        """What OpenSSL wrote to the outgoing BIO (up to BIO_DRAIN bytes), b"" when nothing."""
        buffer = _SCRATCH.drain
        n = _lib.BIO_read(self._out_bio, buffer, BIO_DRAIN)
        return _ffi.buffer(buffer, n)[:] if n > 0 else b""

    async def _flush(self, *, wait: bool = True) -> bool:
        """Send whatever OpenSSL wrote to the outgoing BIO, in order. True when it awaited (a socket transport is
        written without a checkpoint when it takes everything at once).

        With `wait=False` (the receive path) a drain in progress in another task will take what we added before it
        ends (it ends only after finding the BIO empty), so we need not wait. Waiting there would deadlock a
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
            transport = self.transport_stream
            if type(transport) is netio.ReplayStream:
                transport = transport.transport_stream  # it replays what was read; what we send goes straight through
            while data:
                try:
                    if type(transport) is trio.SocketStream:
                        if await netio.send_raw(transport, data, self.send_progress):
                            awaited = True
                    else:
                        await transport.send_all(data)
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

    async def _read_socket(self, fd: int) -> bool:
        """Read what the socket has (up to TRANSPORT_READ) into the incoming BIO, waiting for it when there is none.
        True when it awaited.

        The read goes through the thread's scratch buffer, with no allocation per read: safe because the bytes
        are copied into the BIO before anything can await (trio's recv_into checkpoints after reading, so it is
        not used here)."""
        awaited = False
        scratch = _SCRATCH
        while True:
            try:
                n = os.readv(fd, scratch.read_list)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                awaited = True
            except OSError as exc:  # as trio.SocketStream translates them
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("this socket was already closed") from None
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        if n:
            _lib.BIO_write(self._in_bio, scratch.read_c, n)
        else:
            self._conn.bio_shutdown()
        return awaited

    async def _fill(self) -> bool:
        """Read one chunk of ciphertext from the transport into OpenSSL (or wait for another task's read). True when
        it awaited."""
        if self._reading:
            # Another task is reading; its data will feed OpenSSL too. Wait for it, then the caller retries.
            if self._read_done is None:
                self._read_done = trio.lowlevel.ParkingLot()
            await self._read_done.park()
            return True
        self._reading = True
        try:
            transport = self.transport_stream
            if type(transport) is netio.ReplayStream and transport.replayed:
                # The sniffed prefix is consumed: read the socket underneath from now on.
                transport = self.transport_stream = transport.transport_stream
            if type(transport) is trio.SocketStream:
                awaited = await self._read_socket(transport.socket.fileno())
            else:
                data = await transport.receive_some(TRANSPORT_READ)
                awaited = True
                if data:
                    self._conn.bio_write(data)
                else:
                    self._conn.bio_shutdown()
            self._starved = False
            return awaited
        finally:
            self._reading = False
            if self._read_done is not None:
                self._read_done.unpark_all()

    # --- handshake ---------------------------------------------------------------------------------------------

    async def do_handshake(self, verify: Callable[[], object] | None = None) -> None:
        """Run the TLS handshake (once; concurrent callers wait for it). Raises `HandshakeError`.

        `verify` runs once OpenSSL has finished, before our last flight leaves: a client that refuses the server
        (by raising `HandshakeError`) never sends its Finished, so the server never completes a handshake with it
        and never reaches its app."""
        if self._handshake_done:
            return
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._handshake_lock is None:
            self._handshake_lock = trio.Lock()
        async with self._handshake_lock:
            if self._handshake_done:
                return
            try:
                await self._retry(self._conn.do_handshake, hold_last=verify is not None)
            except trio.BrokenResourceError as exc:  # broken before: report as a handshake failure
                raise HandshakeError(self.peer, str(exc)) from exc
            if verify is not None:
                try:
                    verify()
                except HandshakeError as exc:
                    self._broken = exc.reason
                    raise
                try:
                    await self._flush()
                except trio.ClosedResourceError as exc:
                    if self._closed:
                        raise
                    raise self._fail(exc) from exc
                except trio.BrokenResourceError as exc:
                    raise self._fail(exc) from exc
            self._handshake_done = True
            self._fresh_bios()

    def _fresh_bios(self) -> None:
        """Swap each empty memory BIO for a new one: they never shrink, and after the handshake they still hold
        what the largest flight needed (about 5 KiB per connection)."""
        if _lib.BIO_get_mem_data(self._in_bio, _PTR) == 0:
            bio = _lib.BIO_new(_lib.BIO_s_mem())
            if bio != _ffi.NULL:
                _lib.SSL_set_bio(self._ssl, bio, self._out_bio)  # frees the old one
                self._in_bio = self._conn._into_ssl = bio
        if _lib.BIO_get_mem_data(self._out_bio, _PTR) == 0:
            bio = _lib.BIO_new(_lib.BIO_s_mem())
            if bio != _ffi.NULL:
                _lib.SSL_set_bio(self._ssl, self._in_bio, bio)
                self._out_bio = self._conn._from_ssl = bio

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
        return (self._conn.get_protocol_version_name(), self._conn.get_cipher_name(), self._conn.get_group_name())

    def peer_certificate(self) -> x509.Certificate | None:
        return self._conn.get_peer_certificate(as_cryptography=True)

    def peer_certificate_der(self) -> bytes | None:
        """The peer's leaf in DER, without parsing it."""
        cert = self._conn.get_peer_certificate()
        return None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)

    def alpn(self) -> bytes | None:
        return self._conn.get_alpn_proto_negotiated() or None

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
            view = memoryview(data)
            for start in range(0, len(view), SEND_CHUNK):
                chunk = view[start : start + SEND_CHUNK]
                # Partial writes are off and the BIO is memory: one SSL_write encrypts the whole chunk.
                result = _lib.SSL_write(self._ssl, _ffi.from_buffer(chunk), len(chunk))
                if result <= 0:
                    try:
                        self._conn._raise_ssl_error(self._ssl, result)
                    except SSL.Error as exc:  # WantReadError included: TLS 1.3 never needs input to send
                        raise await self._alert_and_fail(exc) from exc
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

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """Plaintext of the whole records OpenSSL holds, up to `max_bytes`: b"" at close_notify, None when it needs
        more ciphertext first. Errors raise SSL.Error."""
        ssl, got, limit, buffer = self._ssl, 0, min(max_bytes, RECV_SCRATCH_SIZE), _SCRATCH.plain
        while got < limit:
            result = _lib.SSL_read(ssl, buffer + got, limit - got)
            if result > 0:
                got += result
                continue
            error = _lib.SSL_get_error(ssl, result)
            if error == _lib.SSL_ERROR_WANT_READ:
                self._starved = True
                if got:
                    break
                return None
            if error == _lib.SSL_ERROR_ZERO_RETURN:  # close_notify: the peer will send no more
                if got:
                    break  # hand over what came before it; the next call sees the close_notify again
                return b""
            try:
                self._conn._raise_ssl_error(ssl, result)
                raise SSL.Error([("", "", "SSL_read failed")])  # pragma: no cover - _raise_ssl_error always raises
            except SSL.Error as exc:
                if not got:
                    raise
                # Deliver the good records that came first, as a record-at-a-time reader would; fail next time.
                self._read_error = exc
                break
        data: bytes = _ffi.buffer(buffer, got)[:]
        return data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data, yielded = await self.receive_chunk(RECORD_SIZE if max_bytes is None else max_bytes)
        if not yielded:
            await trio.lowlevel.checkpoint()
        return data

    async def receive_chunk(self, max_bytes: int) -> tuple[bytes, bool]:
        """`receive_some` without its checkpoint when nothing had to wait: (data, whether it waited). For loops
        that checkpoint once per round themselves (the relay)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already in receive_some")
        self._receiving = True
        try:
            self._check_open()
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            yielded = False
            if not self._handshake_done:
                await self._ensure_handshake()
                yielded = True
            if self._eof_received:
                return b"", yielded
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            try:
                while True:
                    if self._read_error is not None:
                        raise self._read_error
                    data = None if self._starved else self._decrypt(max_bytes)
                    # Anything OpenSSL answered while reading (an alert, a KeyUpdate) goes out now.
                    if await self._flush(wait=False):
                        yielded = True
                    if data is not None:
                        break
                    if await self._fill():
                        yielded = True
            except SSL.Error as exc:
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
        if self._sending:
            raise trio.BusyResourceError("another task is already in send_all/send_eof")
        self._sending = True
        try:
            self._check_open()
            await self._ensure_handshake()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            self._eof_sent = True
            await self._retry(self._conn.shutdown)
            if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
                await self.transport_stream.send_eof()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Close: send close_notify when nothing went wrong and it is not sent yet, then close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshake_done and not self._eof_sent and self._broken is None:
                self._eof_sent = True
                try:
                    self._conn.shutdown()
                    await self._flush()
                except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the peer is gone already; nothing more to tell it
        finally:
            await self.transport_stream.aclose()


# The SVID leaf rules depend on nothing but the certificate's bytes (OpenSSL checks the chain and the validity period
# on every handshake), and a peer presents the same leaf on every connection until it rotates: their verdict is
# remembered per leaf instead of parsing it again each time. Bounded: emptied when full.
LEAF_VERDICTS_MAX = 1024
_LEAF_VERDICTS: dict[bytes, SpiffeId | str] = {}


def check_peer(stream: TLSStream, trust_domain: TrustDomain, expected: Sequence[SpiffeId] = ()) -> SpiffeId:
    """After the handshake: the peer's leaf obeys the SVID rules, is in our trust domain and, when `expected` names
    identities (secure naming), is one of them. Returns its SPIFFE ID; raises `HandshakeError` with the reason."""
    if stream.alpn() != ALPN:
        raise HandshakeError(stream.peer, "peer did not negotiate ALPN mtlsmesh")
    der = stream.peer_certificate_der()
    if der is None:
        raise HandshakeError(stream.peer, "peer presented no certificate")
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
        raise HandshakeError(stream.peer, verdict)
    spiffe_id = verdict
    if spiffe_id.trust_domain != trust_domain:
        raise HandshakeError(stream.peer, f"peer {spiffe_id} is not in trust domain {trust_domain}")
    if expected and spiffe_id not in expected:
        shown = ", ".join(str(e) for e in expected)
        raise HandshakeError(stream.peer, f"peer {spiffe_id} is not an expected identity ({shown})")
    stream.peer_id = spiffe_id
    return spiffe_id


async def open_mtls(
    transport: trio.abc.Stream,
    context: SSL.Context,
    side: Side,
    trust_domain: TrustDomain,
    *,
    expected: Sequence[SpiffeId] = (),
    peer: str = "peer",
) -> TLSStream:
    """Handshake over `transport` and check the peer's SVID. The caller bounds it in time and closes `transport`
    on error. Raises `HandshakeError`."""
    stream = TLSStream(transport, context, side, peer)
    await stream.do_handshake(lambda: check_peer(stream, trust_domain, expected))
    return stream
