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
memory BIO we fill (`bio_write`) and writes ciphertext to a memory BIO we drain (`bio_read`). OpenSSL never does
I/O itself; it only says "I need more input" (`WantReadError`). Everything that calls into the connection goes
through `_retry`, the only place that talks to OpenSSL:

    call fn (do_handshake / recv / send)  →  drain the outgoing BIO to the transport  →  if OpenSSL wanted input,
    read one chunk from the transport into the incoming BIO and call fn again.

Two tasks may use the stream at once (one sending, one receiving, as the relay does). Writes to the transport are
serialised by `_send_lock`, and the outgoing BIO is drained only while holding it, so ciphertext leaves in the order
OpenSSL produced it whichever task drains it. Reads from the transport are serialised by `_recv_lock`; a task that
needs input while another task is already reading waits for that read and retries instead of reading twice. In
TLS 1.3 a `send` never needs input after the handshake, so in practice only `receive_some` reads. The receive path
never waits for `_send_lock`: whoever holds it drains the BIO before letting go, and waiting would deadlock a
full-duplex relay whose send is blocked on a peer that is itself blocked sending to us.

Throughput notes (measured): pyOpenSSL's `recv` returns at most one record (16 KiB) whatever we ask, but allocates
the whole requested size each call, so we ask for `RECORD_SIZE`. Outgoing data is written into OpenSSL in chunks of
`SEND_CHUNK` and the BIO is then drained in large pieces, so one transport write carries many records.

Half-close: `send_eof` sends close_notify (and a FIN when the transport can half-close); TLS 1.3 lets the peer go on
sending (RFC 8446 §6.1). Receiving close_notify makes `receive_some` return b"". A transport EOF without close_notify
is a truncation and raises `trio.BrokenResourceError`.

Errors are translated in one place (`_translate`): an OpenSSL error during the handshake becomes `HandshakeError`,
afterwards `trio.BrokenResourceError`.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from cryptography import x509
from OpenSSL import SSL, crypto

from mtlsmesh import svid
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

RECORD_SIZE = 16384  # TLS max plaintext record (RFC 8446 §5.1); pyOpenSSL recv returns at most one record
SEND_CHUNK = 256 * 1024  # plaintext handed to OpenSSL per call: bounds the outgoing BIO per stream
BIO_DRAIN = 256 * 1024  # ciphertext taken from the outgoing BIO per transport write
TRANSPORT_READ = 65536  # ciphertext read from the transport per call (several records at once)

T = TypeVar("T")


def _probe_groups() -> bytes | None:
    """The groups list this OpenSSL accepts, or None when setting groups is not possible at all."""
    try:
        from OpenSSL._util import lib  # pyOpenSSL exposes no groups setter; its cffi binding does
    except ImportError:  # pragma: no cover - depends on the installed pyOpenSSL
        return None
    setter = getattr(lib, "SSL_CTX_set1_curves_list", None)  # "curves" is OpenSSL's older name for groups
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
        from OpenSSL._util import lib

        lib.SSL_CTX_set1_curves_list(ctx._context, GROUPS)
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


class _Busy:
    """Raises `trio.BusyResourceError` when two tasks use the same direction at once (the Stream contract)."""

    __slots__ = ("_held", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already in {self._what}")
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over `transport_stream`; see the module docstring for how it works.

    `peer` labels the other end in errors. `peer_id` is set by `open_mtls` once the peer's SVID is checked.
    """

    def __init__(self, transport_stream: trio.abc.Stream, context: SSL.Context, side: Side, peer: str = "peer"):
        self.transport_stream = transport_stream
        self.peer = peer
        self.peer_id: SpiffeId | None = None
        self._conn = SSL.Connection(context, None)
        if side is Side.SERVER:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._handshake_lock = trio.Lock()
        self._handshake_done = False
        self._eof_sent = False
        self._eof_received = False
        self._closed = False
        self._broken: str | None = None
        self._sending = _Busy("send_all/send_eof")
        self._receiving = _Busy("receive_some")

    # --- the one place that talks to OpenSSL -------------------------------------------------------------------

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """OpenSSL and transport failures → HandshakeError (during the handshake) or BrokenResourceError."""
        try:
            yield
        except (SSL.Error, trio.BrokenResourceError) as exc:
            reason = _openssl_reason(exc) if isinstance(exc, SSL.Error) else f"transport broken: {exc}"
            self._broken = reason
            if not self._handshake_done:
                raise HandshakeError(self.peer, reason) from exc
            raise trio.BrokenResourceError(reason) from exc

    async def _retry(self, fn: Callable[..., T], *args: Any, wait_to_flush: bool = True) -> T:
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        yielded = False
        with self._translate():
            while True:
                want_read = False
                try:
                    result = fn(*args)
                except SSL.WantReadError:
                    want_read = True
                except SSL.Error:
                    # OpenSSL queued an alert saying why: send it so the peer fails now, not at its timeout.
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._flush()
                    raise
                if await self._flush(wait=wait_to_flush):
                    yielded = True
                if not want_read:
                    if not yielded:
                        await trio.lowlevel.checkpoint()
                    return result
                await self._fill()
                yielded = True

    async def _flush(self, *, wait: bool = True) -> bool:
        """Send whatever OpenSSL wrote to the outgoing BIO, in order. True when it awaited.

        With `wait=False` (the receive path) a held lock means another task is draining the BIO and will take
        what we added before it lets go (it releases only after finding the BIO empty), so we need not wait.
        Waiting there would deadlock a full-duplex relay: our receive would wait behind our own blocked send
        while the peer's send waits for our receive."""
        if self._send_lock.locked():
            if not wait:
                return False
            await self._send_lock.acquire()
            awaited = True
        else:
            self._send_lock.acquire_nowait()
            awaited = False
        try:
            while True:
                try:
                    data = self._conn.bio_read(BIO_DRAIN)
                except SSL.WantReadError:
                    return awaited
                try:
                    await self.transport_stream.send_all(data)
                except trio.Cancelled:
                    # Part of a record may be out: the TLS stream can no longer be trusted.
                    self._broken = "cancelled while sending"
                    raise
                awaited = True
        finally:
            self._send_lock.release()

    async def _fill(self) -> None:
        """Read one chunk of ciphertext from the transport into OpenSSL (or wait for another task's read)."""
        if self._recv_lock.locked():
            # Another task is reading; its data will feed OpenSSL too. Wait for it, then the caller retries.
            async with self._recv_lock:
                return
        async with self._recv_lock:
            data = await self.transport_stream.receive_some(TRANSPORT_READ)
            if data:
                self._conn.bio_write(data)
            else:
                self._conn.bio_shutdown()

    # --- handshake ---------------------------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake (once; concurrent callers wait for it). Raises `HandshakeError`."""
        if self._handshake_done:
            return
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        async with self._handshake_lock:
            if self._handshake_done:
                return
            try:
                await self._retry(self._conn.do_handshake)
            except trio.BrokenResourceError as exc:  # broken before: report as a handshake failure
                raise HandshakeError(self.peer, str(exc)) from exc
            self._handshake_done = True

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

    def alpn(self) -> bytes | None:
        return self._conn.get_alpn_proto_negotiated() or None

    # --- the Stream interface ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof was already called")
            await self._ensure_handshake()
            view = memoryview(data)
            if not view:
                await trio.lowlevel.checkpoint()
                return
            while view:
                sent = await self._retry(self._conn.send, view[:SEND_CHUNK])
                view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            self._check_open()
            await self.transport_stream.wait_send_all_might_not_block()

    def _read(self, max_bytes: int) -> bytes:
        try:
            return self._conn.recv(max_bytes)
        except SSL.ZeroReturnError:  # close_notify: the peer will send no more
            return b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receiving:
            self._check_open()
            if max_bytes is None:
                max_bytes = RECORD_SIZE
            elif max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            await self._ensure_handshake()
            if self._eof_received:
                await trio.lowlevel.checkpoint()
                return b""
            data = await self._retry(self._read, min(max_bytes, RECORD_SIZE), wait_to_flush=False)
            if not data:
                self._eof_received = True
            return data

    async def send_eof(self) -> None:
        """Send close_notify (and a FIN when the transport half-closes); receiving goes on."""
        with self._sending:
            self._check_open()
            await self._ensure_handshake()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            self._eof_sent = True
            await self._retry(self._conn.shutdown)
            if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
                await self.transport_stream.send_eof()

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


def check_peer(stream: TLSStream, trust_domain: TrustDomain, expected: Sequence[SpiffeId] = ()) -> SpiffeId:
    """After the handshake: the peer's leaf obeys the SVID rules, is in our trust domain and, when `expected` names
    identities (secure naming), is one of them. Returns its SPIFFE ID; raises `HandshakeError` with the reason."""
    if stream.alpn() != ALPN:
        raise HandshakeError(stream.peer, "peer did not negotiate ALPN mtlsmesh")
    cert = stream.peer_certificate()
    if cert is None:
        raise HandshakeError(stream.peer, "peer presented no certificate")
    try:
        spiffe_id = svid.leaf_spiffe_id(cert)
    except CertificateError as exc:
        raise HandshakeError(stream.peer, f"peer certificate is not a valid SVID: {exc.message}") from exc
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
    await stream.do_handshake()
    check_peer(stream, trust_domain, expected)
    return stream
