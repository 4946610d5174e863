"""Classify the first bytes of an inbound connection: a TLS ClientHello (and what it offers), or not TLS at all.

`Sniffer` is fed the bytes as they arrive and answers, after each feed, one of three things: NEED_MORE (they are a
valid prefix of a ClientHello), NOT_TLS (they cannot be the start of one) or CLIENT_HELLO (a complete, well-formed
ClientHello, with the ALPN protocols, SNI host name and TLS versions it offers). `parse_client_hello(data)` is the
same answer for bytes at hand. `is_mesh` says whether it is the mesh's own mTLS. Both are pure (no I/O) and never
raise, whatever the bytes: it sits in front of every inbound
connection, so a hostile peer must not be able to make it do anything but answer.

What this module does not do: read from sockets, time out, or verify anything cryptographic. It does not consume
bytes either; the caller keeps everything it read and replays it to whoever handles the connection next.

Theory of operation
-------------------
A ClientHello is one handshake message (RFC 8446 §4: type 1, a 24-bit length, the body) carried by one or more
TLS plaintext records (RFC 8446 §5.1, RFC 5246 §6.2.1: type 22, a version, a 16-bit length of at most 2^14, the
fragment). Clients with post-quantum key shares (X25519MLKEM768) send 1.3-1.8 KB ClientHellos and some split the
message across several records, so the parser first walks the record headers and joins the handshake fragments,
then parses the handshake message from the joined bytes.

Both stages check the bytes as they come and stop at the first one that no ClientHello could carry: a record type
other than handshake, a version whose major byte is not 3, a zero-length or oversized record, more than
`MAX_RECORDS` records, a handshake type other than 1, or a length that disagrees with the lengths enclosing it.

Incremental, so that a peer dribbling its ClientHello costs work in proportion to its bytes, not to their square:
the record walk keeps its place (it looks at each byte once); the body parser runs again only when the message has
doubled since its last run, when the message is complete, or when `MAX_CLIENT_HELLO` bytes are in, so its total
work is linear too. Its answer for a prefix never changes once it is not NEED_MORE (the parser reads forward and
stops at the first bad byte), so deferring a run only delays a refusal; `Sniffer.finish` gives the answer a full
run would give now. The body parser reads
through a cursor that knows two ends: the declared end of the message and the end of the bytes received so far.
Reading past the declared end means the lengths are inconsistent (NOT_TLS); reading past what has arrived means
the answer depends on bytes not yet read (NEED_MORE). One parser thus gives both the early rejection and the final
answer, and can never index out of range. Anything after the ClientHello (more records, early data) is ignored.

`MAX_CLIENT_HELLO` bounds the wait: with that many bytes the answer is never NEED_MORE. A client that stops
sending (EOF, or the sniff timeout) while the answer is still NEED_MORE is, for the caller, not TLS either.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mtlsmesh.conventions import MESH_ALPN

# Enough for any real ClientHello (post-quantum ones are under 2 KB) with room for fragmentation overhead; the
# largest Envoy's tls_inspector waits for is of the same order. A longer one is treated as not TLS.
MAX_CLIENT_HELLO = 32 * 1024
# Records one ClientHello may take: real clients use one, or a few when it is over 2^14 bytes; a ClientHello cut into
# tiny records only costs the sniffer work (and is a known way to evade inspection). More is not TLS.
MAX_RECORDS = 64

_RECORD_HEADER = 5  # type(1) version(2) length(2), RFC 8446 §5.1
_HANDSHAKE_HEADER = 4  # msg_type(1) length(3), RFC 8446 §4
_MAX_FRAGMENT = 2**14  # RFC 8446 §5.1: a plaintext record's length MUST NOT exceed 2^14
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0  # RFC 6066 §3
_EXT_ALPN = 16  # RFC 7301 §3.1
_EXT_SUPPORTED_VERSIONS = 43  # RFC 8446 §4.2.1
_SNI_HOST_NAME = 0
# legacy_version(2) random(32) session_id length(1) one cipher suite with its length(4) one compression method
# with its length(2): the smallest ClientHello body there is.
_MIN_BODY = 2 + 32 + 1 + 4 + 2


class SniffState(enum.Enum):
    NEED_MORE = "need-more"  # a valid prefix of a ClientHello: read more (up to MAX_CLIENT_HELLO) and ask again
    NOT_TLS = "not-tls"  # cannot be a ClientHello: plaintext, another protocol, or malformed TLS
    CLIENT_HELLO = "client-hello"  # a complete, well-formed ClientHello


@dataclass(frozen=True, slots=True)
class Sniff:
    """The answer for the bytes read so far. `alpn`, `sni` and `versions` are set only for CLIENT_HELLO."""

    state: SniffState
    alpn: tuple[str, ...] = ()  # offered ALPN protocols in the client's order (bytes decoded as latin-1, 1:1)
    sni: str | None = None  # the host_name of the server_name extension
    versions: tuple[int, ...] = ()  # supported_versions without GREASE (0x0304 = TLS 1.3), else (legacy_version,)
    reason: str = ""  # for NOT_TLS: why, in a few words for the connection log


def is_mesh(sniff: Sniff) -> bool:
    """A complete ClientHello offering the mesh's ALPN protocol: mesh mTLS, not the app's own TLS."""
    return sniff.state is SniffState.CLIENT_HELLO and MESH_ALPN in sniff.alpn


class _NeedMore(Exception):
    pass


class _NotTls(Exception):
    pass


def parse_client_hello(data: bytes | bytearray | memoryview) -> Sniff:
    """Classify `data`, the first bytes a client sent. Pure; never raises."""
    return Sniffer().feed(data)


class Sniffer:
    """The sniff of one connection, fed its bytes as they arrive (see the module docstring). `feed` answers for
    everything fed so far; once the answer is not NEED_MORE it stays."""

    __slots__ = ("_declared", "_header", "_left", "_message", "_parsed", "_received", "_records", "_verdict")

    def __init__(self) -> None:
        self._received = 0  # bytes fed
        self._header = bytearray()  # the record header being read (when _left is 0)
        self._left = 0  # bytes of the current record's fragment still to come
        self._records = 0  # records whose header is whole
        self._message = bytearray()  # the handshake bytes joined so far
        self._declared: int | None = None  # the ClientHello body's declared length, once its header is in
        self._parsed = 0  # the message's length at the body parser's last run
        self._verdict: Sniff | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> Sniff:
        if self._verdict is not None:
            return self._verdict
        try:
            view = memoryview(data).cast("B")
            self._received += len(view)
            self._walk(view)
            verdict = self._judge(force=False)
        except _NotTls as exc:
            verdict = Sniff(SniffState.NOT_TLS, reason=str(exc))
        except Exception as exc:  # a bug in this parser must not become a bug on the data path
            verdict = Sniff(SniffState.NOT_TLS, reason=f"unparseable ({type(exc).__name__})")
        if verdict.state is not SniffState.NEED_MORE:
            self._verdict = verdict
        return verdict

    def finish(self) -> Sniff:
        """The answer for what was fed, with the body parser run on all of it (what `parse_client_hello` says)."""
        if self._verdict is not None:
            return self._verdict
        try:
            return self._judge(force=True)
        except _NotTls as exc:
            return Sniff(SniffState.NOT_TLS, reason=str(exc))
        except Exception as exc:  # pragma: no cover - as in feed
            return Sniff(SniffState.NOT_TLS, reason=f"unparseable ({type(exc).__name__})")

    def _complete(self) -> bool:
        return self._declared is not None and len(self._message) >= _HANDSHAKE_HEADER + self._declared

    def _walk(self, data: memoryview) -> None:
        """Walk the records in `data`, from where the last feed stopped; join their fragments into the message.
        Stops once the message is complete: what follows it is not the sniffer's."""
        pos, end = 0, len(data)
        header = self._header
        while pos < end and not self._complete():
            if not self._left:
                take = min(_RECORD_HEADER - len(header), end - pos)
                header += data[pos : pos + take]
                pos += take
                self._check_header(header)
                if len(header) < _RECORD_HEADER:
                    return
                length = int.from_bytes(header[3:5], "big")
                if length == 0:
                    raise _NotTls("empty handshake record")  # RFC 8446 §5.1 forbids zero-length handshake fragments
                if length > _MAX_FRAGMENT:
                    raise _NotTls(f"record length {length} exceeds 2^14")
                self._records += 1
                if self._records > MAX_RECORDS:
                    raise _NotTls(f"ClientHello in more than {MAX_RECORDS} records")
                self._left = length
                header.clear()
                continue
            take = min(self._left, end - pos)
            self._add(data[pos : pos + take])
            pos += take
            self._left -= take

    def _check_header(self, header: bytearray) -> None:
        if header[:1] and header[0] != _CONTENT_HANDSHAKE:
            if not self._records:
                raise _NotTls(f"first byte 0x{header[0]:02x} is not a TLS handshake record")
            raise _NotTls(f"record type {header[0]} inside the ClientHello")
        if len(header) >= 2 and header[1] != 3:
            raise _NotTls(f"record version major byte 0x{header[1]:02x} is not 3")
        if len(header) >= 3 and header[2] > 4:
            raise _NotTls(f"record version 0x03{header[2]:02x} is unknown")

    def _add(self, fragment: memoryview) -> None:
        message = self._message
        message += fragment
        if message[0] != _HANDSHAKE_CLIENT_HELLO:
            raise _NotTls(f"handshake type {message[0]} is not ClientHello")
        if self._declared is None and len(message) >= _HANDSHAKE_HEADER:
            declared = int.from_bytes(message[1:4], "big")
            if declared < _MIN_BODY:
                raise _NotTls(f"ClientHello length {declared} is too short")
            if declared > MAX_CLIENT_HELLO - _RECORD_HEADER - _HANDSHAKE_HEADER:
                raise _NotTls(f"ClientHello length {declared} exceeds {MAX_CLIENT_HELLO} bytes")
            self._declared = declared

    def _judge(self, *, force: bool) -> Sniff:
        """Run the body parser when it is due (see the module docstring) and answer."""
        declared = self._declared
        full = self._received >= MAX_CLIENT_HELLO
        if declared is not None:
            size = len(self._message)
            due = force or full or self._complete() or size >= 2 * self._parsed
            if (due and size > self._parsed) or force:
                self._parsed = size
                end = _HANDSHAKE_HEADER + declared
                try:
                    return _parse_body(_Cursor(bytes(self._message[:end]), _HANDSHAKE_HEADER, end))
                except _NeedMore:
                    pass
        if full:
            return Sniff(SniffState.NOT_TLS, reason=f"no complete ClientHello in {MAX_CLIENT_HELLO} bytes")
        return _NEED_MORE


_NEED_MORE = Sniff(SniffState.NEED_MORE)


class _Cursor:
    """Reads forward through `data[pos:end]`, where `end` is declared and `data` may stop short of it."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise _NotTls(f"{what} overruns its enclosing length")
        if self.pos + n > len(self.data):
            raise _NeedMore
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, length_bytes: int, what: str, minimum: int = 0, maximum: int | None = None) -> _Cursor:
        """A length-prefixed vector (RFC 8446 §3.4) as a sub-cursor; the caller must consume it all."""
        length = self.uint(length_bytes, f"{what} length")
        if length < minimum or (maximum is not None and length > maximum):
            raise _NotTls(f"{what} length {length} is out of range")
        inner = _Cursor(self.data, self.pos, self.pos + length)
        if inner.end > self.end:
            raise _NotTls(f"{what} overruns its enclosing length")
        self.pos = inner.end
        return inner

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def complete(self) -> bool:
        """Whether every declared byte of this cursor's range has arrived."""
        return self.end <= len(self.data)


def _parse_body(body: _Cursor) -> Sniff:
    """RFC 8446 §4.1.2 (and RFC 5246 §7.4.1.2, whose ClientHello may omit the extensions)."""
    legacy_version = body.uint(2, "legacy_version")
    if legacy_version >> 8 != 3 or legacy_version & 0xFF > 4:
        raise _NotTls(f"ClientHello version 0x{legacy_version:04x} is not TLS")
    body.take(32, "random")
    session_id = body.vector(1, "legacy_session_id", maximum=32)
    session_id.take(session_id.remaining, "legacy_session_id")
    cipher_suites = body.vector(2, "cipher_suites", minimum=2)
    if cipher_suites.remaining % 2:
        raise _NotTls("cipher_suites length is odd")
    cipher_suites.take(cipher_suites.remaining, "cipher_suites")
    compression = body.vector(1, "legacy_compression_methods", minimum=1)
    compression.take(compression.remaining, "legacy_compression_methods")
    alpn: tuple[str, ...] = ()
    sni: str | None = None
    versions: tuple[int, ...] = (legacy_version,)
    if body.remaining:
        block = body.vector(2, "extensions")
        if block.end != body.end:
            raise _NotTls("extensions length disagrees with the ClientHello length")
        seen: set[int] = set()
        while block.remaining:
            ext_type = block.uint(2, "extension type")
            ext = block.vector(2, f"extension {ext_type}")
            if ext_type in seen:
                raise _NotTls(f"extension {ext_type} appears twice")  # RFC 8446 §4.2
            seen.add(ext_type)
            # The extensions we read are parsed from the cursor itself, so they too are judged as their bytes arrive.
            if ext_type == _EXT_ALPN:
                alpn = _parse_alpn(ext)
            elif ext_type == _EXT_SERVER_NAME:
                sni = _parse_server_name(ext)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(ext)
            else:
                ext.take(ext.remaining, f"extension {ext_type}")
    if not body.complete():  # unreachable: the parse above read to the end, but be explicit
        raise _NeedMore
    return Sniff(SniffState.CLIENT_HELLO, alpn=alpn, sni=sni, versions=versions)


def _parse_alpn(ext: _Cursor) -> tuple[str, ...]:
    """RFC 7301 §3.1: ProtocolName protocol_name_list<2..2^16-1>, each ProtocolName<1..2^8-1>."""
    names = ext.vector(2, "ALPN list", minimum=2)
    if ext.remaining:
        raise _NotTls("trailing bytes after the ALPN list")
    protocols = []
    while names.remaining:
        name = names.vector(1, "ALPN protocol", minimum=1)
        protocols.append(name.take(name.remaining, "ALPN protocol").decode("latin-1"))
    return tuple(protocols)


def _parse_server_name(ext: _Cursor) -> str | None:
    """RFC 6066 §3: ServerName server_name_list<1..2^16-1>; the host_name entry, ASCII."""
    entries = ext.vector(2, "server_name list", minimum=1)
    if ext.remaining:
        raise _NotTls("trailing bytes after the server_name list")
    host: str | None = None
    while entries.remaining:
        name_type = entries.uint(1, "server_name type")
        value = entries.vector(2, "server_name", minimum=1)
        raw = value.take(value.remaining, "server_name")
        if name_type != _SNI_HOST_NAME:
            continue  # RFC 6066 defines only host_name; skip the others
        if host is not None:
            raise _NotTls("two host_name entries in server_name")  # RFC 6066 §3: at most one per type
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _NotTls("server_name host_name is not ASCII") from None
    return host


def _parse_supported_versions(ext: _Cursor) -> tuple[int, ...]:
    """RFC 8446 §4.2.1: ProtocolVersion versions<2..254> in a ClientHello; GREASE (RFC 8701) dropped."""
    listed = ext.vector(1, "supported_versions", minimum=2, maximum=254)
    if ext.remaining:
        raise _NotTls("trailing bytes after supported_versions")
    if listed.remaining % 2:
        raise _NotTls("supported_versions length is odd")
    versions = []
    while listed.remaining:
        version = listed.uint(2, "supported version")
        if not _is_grease(version):
            versions.append(version)
    return tuple(versions)


def _is_grease(value: int) -> bool:
    """RFC 8701 §2: 0x0A0A, 0x1A1A, ... 0xFAFA."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF
