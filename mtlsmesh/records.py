"""The TLS 1.3 record layer after the handshake: protect and unprotect records, with no I/O (RFC 8446 §5, §7).

What it does: `Session` holds one connection's two traffic keys once OpenSSL has finished the handshake. `seal`
turns plaintext into application-data records, `alert` makes an alert record, `open_into` turns whole records into
plaintext in a caller's buffer and handles what else may arrive after a handshake: alerts, NewSessionTicket (read
and dropped: we never resume) and KeyUpdate (the read key moves on; when the peer asks, our answer is queued in
`outgoing` and the write key moves on after it, unless we have sent close_notify and will send nothing more; one
answer covers every request received before our next application data, RFC 8446 §4.6.3). Our own write key is
replaced after `KEY_UPDATE_AFTER` records, well inside the AEAD usage limits of RFC 8446 §5.5. Protocol errors
raise `RecordError` naming the alert to send.

Bounded work for a peer: the 33rd record in a row without application data is refused (`MAX_IDLE_RECORDS`), one
`open_into` call opens at most `OPEN_BUDGET` records without data (the caller checkpoints between calls), `queued`
counts the bytes waiting in `outgoing` (the caller stops reading above its limit), and `wipe` forgets both secrets
once the connection is refused or closed.

What it does not: the handshake, certificates or any I/O. `tls.TLSStream` runs the handshake with OpenSSL, takes
the two traffic secrets from OpenSSL's key log callback and the two sequence numbers from the records it moved, then
frees the OpenSSL connection and hands the bytes to a `Session`.

Why our own: an OpenSSL connection keeps about 40 KiB after the handshake (certificates, the key shares, the
session and its tickets, buffers) for as long as the connection lives; a `Session` keeps two AEAD contexts, two
secrets and two counters. The AEAD itself is OpenSSL's, through `cryptography`, sealing into and opening from
caller buffers with no allocation per record.

The record format (RFC 8446 §5.2): a 5-byte header (type 23, version 0x0303, length) then AEAD ciphertext of
content || content type || zero padding, with the header as additional data and the nonce the write IV xor the
64-bit sequence number. Keys and IVs come from a traffic secret by HKDF-Expand-Label (§7.1, §7.3).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

# Content types (RFC 8446 §5.1)
CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23

# Post-handshake handshake messages (§4)
NEW_SESSION_TICKET = 4
KEY_UPDATE = 24

HEADER_SIZE = 5
TAG_SIZE = 16
MAX_PLAINTEXT = 1 << 14  # content bytes per record
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256  # the largest record body a peer may send (§5.2)
MAX_RECORD = HEADER_SIZE + MAX_CIPHERTEXT
# What one full record of ours costs on the wire beyond its content: header, content type, tag.
OVERHEAD = HEADER_SIZE + 1 + TAG_SIZE
MAX_HANDSHAKE_MESSAGE = 1 << 16  # a NewSessionTicket or KeyUpdate larger than this is an attack, not a message
# Records in a row that carry no application data (KeyUpdate, NewSessionTicket, user_canceled, empty or all-padding
# records): the 33rd is refused with unexpected_message, as BoringSSL, rustls and OpenSSL refuse it. Each one costs an
# AEAD open (and a KeyUpdate a key derivation) and gives the app nothing: without a cap a peer could keep us busy for
# free.
MAX_IDLE_RECORDS = 32
# Records without application data one `open_into` call opens at most before it returns (what it has so far): the
# work one call does for a peer is bounded in records, not in bytes, so that the caller can take a checkpoint between
# calls (a KeyUpdate costs a key derivation; a socket read can hold thousands of them).
OPEN_BUDGET = 64

# Replace our write key after this many records: AES-GCM's limit is 2^24.5 full records per key (§5.5).
KEY_UPDATE_AFTER = 1 << 24
SEQUENCE_LIMIT = (1 << 64) - 1

ALERT_NAMES = {
    0: "close notify",
    10: "unexpected message",
    20: "bad record mac",
    22: "record overflow",
    40: "handshake failure",
    42: "bad certificate",
    43: "unsupported certificate",
    44: "certificate revoked",
    45: "certificate expired",
    46: "certificate unknown",
    47: "illegal parameter",
    48: "unknown ca",
    49: "access denied",
    50: "decode error",
    51: "decrypt error",
    70: "protocol version",
    71: "insufficient security",
    80: "internal error",
    86: "inappropriate fallback",
    90: "user canceled",
    109: "missing extension",
    110: "unsupported extension",
    112: "unrecognized name",
    113: "bad certificate status response",
    115: "unknown psk identity",
    116: "certificate required",
    120: "no application protocol",
}
CLOSE_NOTIFY = 0
UNEXPECTED_MESSAGE = 10
BAD_RECORD_MAC = 20
RECORD_OVERFLOW = 22
ILLEGAL_PARAMETER = 47
BAD_CERTIFICATE = 42
ACCESS_DENIED = 49
DECODE_ERROR = 50
INTERNAL_ERROR = 80
USER_CANCELED = 90


class RecordError(Exception):
    """The peer broke the record protocol: `alert` is the fatal alert to send it, `reason` says what happened."""

    def __init__(self, alert: int, reason: str) -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason


class PeerAlert(Exception):
    """The peer sent a fatal alert (anything but close_notify and user_canceled)."""

    def __init__(self, description: int) -> None:
        name = ALERT_NAMES.get(description, f"number {description}")
        super().__init__(f"peer sent alert {name}")
        self.description = description


_Bytes = bytes | memoryview


class _Aead(Protocol):
    def encrypt_into(self, nonce: bytes, data: memoryview, associated_data: _Bytes, buf: memoryview) -> int: ...
    def decrypt_into(self, nonce: bytes, data: memoryview, associated_data: _Bytes, buf: memoryview) -> int: ...


def _one_block(length: int, label: bytes) -> bytes:
    """HKDF-Expand's input for T(1) of HKDF-Expand-Label(secret, label, "", length): a key, an IV or the next secret
    are all at most one hash long, so one HMAC each with this precomputed input (the same as `hkdf_expand_label`)."""
    full = b"tls13 " + label
    return length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00\x01"


@dataclass(frozen=True, slots=True)
class Suite:
    """A TLS 1.3 cipher suite: its AEAD, key length and HKDF hash."""

    name: str
    aead: Callable[[bytes], _Aead]
    key_size: int
    hash_name: str
    hash_size: int
    key_info: bytes  # HKDF-Expand inputs for its key and its next secret (see _one_block)
    update_info: bytes


def _suite(name: str, aead: Callable[[bytes], _Aead], key_size: int, hash_name: str, hash_size: int) -> Suite:
    return Suite(
        name, aead, key_size, hash_name, hash_size, _one_block(key_size, b"key"), _one_block(hash_size, b"traffic upd")
    )


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        _suite("TLS_AES_256_GCM_SHA384", AESGCM, 32, "sha384", 48),
        _suite("TLS_AES_128_GCM_SHA256", AESGCM, 16, "sha256", 32),
        _suite("TLS_CHACHA20_POLY1305_SHA256", ChaCha20Poly1305, 32, "sha256", 32),
    )
}
# What build_context offers: exactly the suites this module can carry on with (OpenSSL's own order).
CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"


def hkdf_expand_label(hash_name: str, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1) over HKDF-Expand (RFC 5869 §2.3)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes([counter]), hash_name)
        out += block
        counter += 1
    return out[:length]


_IV_INFO = _one_block(12, b"iv")


class _Direction:
    """One direction's protection: the traffic secret, the AEAD keyed from it, the IV and the sequence number."""

    __slots__ = ("aead", "iv", "secret", "seq", "suite")

    def __init__(self, suite: Suite, secret: bytes, seq: int = 0) -> None:
        self.suite = suite
        self._install(secret)
        self.seq = seq

    def _install(self, secret: bytes) -> None:
        suite = self.suite
        self.secret = secret
        key = hmac.digest(secret, suite.key_info, suite.hash_name)[: suite.key_size]
        self.aead = suite.aead(key)
        self.iv = int.from_bytes(hmac.digest(secret, _IV_INFO, suite.hash_name)[:12], "big")
        self.seq = 0

    def update(self) -> None:
        """The next generation of this direction's secret (§7.2), sequence number back to 0."""
        suite = self.suite
        self._install(hmac.digest(self.secret, suite.update_info, suite.hash_name)[: suite.hash_size])

    def wipe(self) -> None:
        self.secret = b""
        self.aead = _WIPED
        self.iv = 0

    def nonce(self) -> bytes:
        seq = self.seq
        if seq >= SEQUENCE_LIMIT:  # pragma: no cover - 2^64 records
            raise RecordError(INTERNAL_ERROR, "record sequence number exhausted")
        self.seq = seq + 1
        return (self.iv ^ seq).to_bytes(12, "big")


class _Wiped:
    """The AEAD of a wiped direction: refuses every use."""

    def encrypt_into(self, nonce: bytes, data: memoryview, associated_data: _Bytes, buf: memoryview) -> int:
        raise RecordError(INTERNAL_ERROR, "the traffic keys were wiped")

    decrypt_into = encrypt_into


_WIPED = _Wiped()


def _header(length: int) -> bytes:
    return bytes((APPLICATION_DATA, 3, 3, length >> 8, length & 0xFF))


class Session:
    """A TLS 1.3 connection's record protection after its handshake; see the module docstring.

    `is_client`: which end we are (only a client may be sent NewSessionTicket). `write_seq`/`read_seq`: how many
    records under the application traffic keys each side has already sent when we take over.
    """

    __slots__ = (
        "_answered",
        "_error",
        "_hs_in",
        "_idle",
        "_read",
        "_write",
        "_write_closed",
        "closed",
        "is_client",
        "key_update_after",
        "outgoing",
        "queued",
    )

    def __init__(
        self,
        suite: Suite,
        read_secret: bytes,
        write_secret: bytes,
        *,
        is_client: bool,
        read_seq: int = 0,
        write_seq: int = 0,
    ) -> None:
        self._read = _Direction(suite, read_secret, read_seq)
        self._write = _Direction(suite, write_secret, write_seq)
        self.is_client = is_client
        self._hs_in: bytes = b""  # a handshake message split over records, until its last part arrives
        # Records to send, oldest first: what we sealed, alerts, KeyUpdates (ours and answers to the peer's).
        self.outgoing: list[bytes | bytearray] = []
        self.queued = 0  # bytes in `outgoing`
        self._idle = 0  # records in a row without application data (see MAX_IDLE_RECORDS)
        self._answered = False  # an answer to a KeyUpdate request is queued and no application data sent since
        self.closed = False  # close_notify received: nothing after it is read
        self._write_closed = False  # an alert of ours is queued (close_notify or fatal): nothing more is sent
        self._error: RecordError | PeerAlert | None = None  # found after good records: raised by the next call
        self.key_update_after = KEY_UPDATE_AFTER

    # --- writing -----------------------------------------------------------------------------------------------

    def seal(self, data: memoryview, scratch: bytearray) -> None:
        """Queue application-data records carrying `data` in `outgoing`, MAX_PLAINTEXT per record. `scratch` (at
        least MAX_PLAINTEXT + 1 bytes) holds each record's inner plaintext while it is sealed: the caller's, so
        nothing is allocated per record. Empty data makes no record."""
        n_records = -(-len(data) // MAX_PLAINTEXT)
        if not n_records:
            return
        self._answered = False  # a KeyUpdate request received after this data needs an answer of its own
        if self._write.seq + n_records > self.key_update_after:
            self._update_write_key(requested=False)  # before these records, so the KeyUpdate goes out first
        out = bytearray(len(data) + n_records * OVERHEAD)
        view, inner, pos = memoryview(out), memoryview(scratch), 0
        for start in range(0, len(data), MAX_PLAINTEXT):
            piece = data[start : start + MAX_PLAINTEXT]
            n = len(piece)
            scratch[:n] = piece
            scratch[n] = APPLICATION_DATA
            pos += self._seal_into(view[pos:], inner[: n + 1])
        self.outgoing.append(out)
        self.queued += len(out)

    def _seal_into(self, out: memoryview, inner: memoryview) -> int:
        write = self._write
        length = len(inner) + TAG_SIZE
        header = _header(length)
        out[:HEADER_SIZE] = header
        write.aead.encrypt_into(write.nonce(), inner, header, out[HEADER_SIZE : HEADER_SIZE + length])
        return HEADER_SIZE + length

    def _seal_message(self, content: bytes, content_type: int) -> None:
        inner = memoryview(content + bytes([content_type]))
        out = bytearray(HEADER_SIZE + len(inner) + TAG_SIZE)
        self._seal_into(memoryview(out), inner)
        self.outgoing.append(out)
        self.queued += len(out)

    def _update_write_key(self, *, requested: bool) -> None:
        # KeyUpdate goes out under the old key; everything after it under the new one (§4.6.3).
        self._seal_message(bytes((KEY_UPDATE, 0, 0, 1, 1 if requested else 0)), HANDSHAKE)
        self._write.update()

    def alert(self, description: int) -> None:
        """Queue an alert record: close_notify is a warning, everything else fatal (§6)."""
        level = 1 if description in (CLOSE_NOTIFY, USER_CANCELED) else 2
        self._seal_message(bytes((level, description)), ALERT)
        if description != USER_CANCELED:
            self._write_closed = True

    def take(self) -> bytes | bytearray:
        """The oldest queued records (b"" when none), to be sent before anything queued after them."""
        if not self.outgoing:
            return b""
        out = self.outgoing.pop(0)
        self.queued -= len(out)
        return out

    def wipe(self) -> None:
        """Forget both traffic secrets and the keys made from them (after a refusal, at close): nothing can be
        sealed or opened afterwards (RecordError internal_error), and no secret outlives its use."""
        for direction in (self._read, self._write):
            direction.wipe()
        self._hs_in = b""

    def request_key_update(self) -> None:
        """Queue a KeyUpdate that also asks the peer to update (in `outgoing`), and move our write key on."""
        self._update_write_key(requested=True)

    # --- reading -----------------------------------------------------------------------------------------------

    def open_into(self, data: memoryview, out: memoryview) -> tuple[int, int]:
        """Open the whole records at the start of `data` into `out`: (bytes of `data` used, bytes of application
        data written to `out`). Stops at a partial record, when `out` has no room for the next record, after
        close_notify (then `closed` is set) and after OPEN_BUDGET records without application data. Raises
        `RecordError` or `PeerAlert`; when good records came before the bad one, their data is returned first and
        the error raised by the next call, as a reader that takes one record at a time would see it."""
        if self._error is not None:
            raise self._error
        used = produced = idle = 0
        while not self.closed and len(data) > used and idle < OPEN_BUDGET:
            try:
                if len(data) - used < HEADER_SIZE:  # a partial header is judged by its first byte already
                    if data[used] != APPLICATION_DATA:
                        raise RecordError(
                            UNEXPECTED_MESSAGE, f"unexpected record type {data[used]} after the handshake"
                        )
                    break
                step = self._open_one(data, used, out, produced)
            except (RecordError, PeerAlert) as exc:
                self._error = exc  # a failed session stays failed: every later call raises it again
                if not produced:
                    raise
                break
            if step is None:
                break
            if step[1] == produced:
                idle += 1
            used, produced = step
        return used, produced

    def _open_one(self, data: memoryview, used: int, out: memoryview, produced: int) -> tuple[int, int] | None:
        """Open the record at data[used:] into out[produced:]: the new (used, produced), or None when the record is
        not all there yet or `out` has no room for it."""
        content_type, length = data[used], (data[used + 3] << 8) | data[used + 4]
        if content_type != APPLICATION_DATA:
            raise RecordError(UNEXPECTED_MESSAGE, f"unexpected record type {content_type} after the handshake")
        if length > MAX_CIPHERTEXT:
            raise RecordError(RECORD_OVERFLOW, f"record of {length} bytes is over the limit")
        if length < TAG_SIZE + 1:
            raise RecordError(DECODE_ERROR, f"record of {length} bytes is too short")
        if len(data) - used < HEADER_SIZE + length:
            return None
        size = length - TAG_SIZE
        if len(out) - produced < size:
            return None
        read = self._read
        body = used + HEADER_SIZE
        target = out[produced : produced + size]
        try:
            # The header is the additional data, read in place (no copy of it per record).
            read.aead.decrypt_into(read.nonce(), data[body : body + length], data[used:body], target)
        except RecordError:  # the keys were wiped
            raise
        except Exception as exc:  # cryptography's InvalidTag: forged, corrupted or out of order
            raise RecordError(BAD_RECORD_MAC, "record failed authentication") from exc
        used += HEADER_SIZE + length
        if size > MAX_PLAINTEXT + 1:  # content, content type and padding: at most 2^14 + 1 bytes (§5.4)
            raise RecordError(RECORD_OVERFLOW, f"record inner plaintext of {size} bytes is over the limit")
        # Content type: the last non-zero byte; zeros after it are padding (§5.4).
        inner_type = target[size - 1]
        content_size = size - 1
        if inner_type == 0:
            content_size = len(bytes(target).rstrip(b"\x00")) - 1
            if content_size < 0:
                raise RecordError(UNEXPECTED_MESSAGE, "record has no content type")
            inner_type = target[content_size]
        if inner_type == APPLICATION_DATA:
            if self._hs_in:
                raise RecordError(UNEXPECTED_MESSAGE, "application data inside a handshake message")
            if content_size:
                self._idle = 0
                return used, produced + content_size
        self._idle += 1
        if self._idle > MAX_IDLE_RECORDS:
            raise RecordError(UNEXPECTED_MESSAGE, f"more than {MAX_IDLE_RECORDS} records in a row without data")
        if inner_type == APPLICATION_DATA:
            return used, produced
        if inner_type == ALERT:
            self._alert(bytes(target[:content_size]))
        elif inner_type == HANDSHAKE:
            if content_size == 0:
                raise RecordError(UNEXPECTED_MESSAGE, "empty handshake record")
            self._handshake(bytes(target[:content_size]))
        else:
            raise RecordError(UNEXPECTED_MESSAGE, f"unexpected content type {inner_type} after the handshake")
        return used, produced

    def _alert(self, content: bytes) -> None:
        # One whole alert per record, never inside a handshake message (§5.1): anything else is unexpected_message.
        if len(content) != 2 or self._hs_in:
            raise RecordError(UNEXPECTED_MESSAGE, "malformed alert")
        description = content[1]
        if description == CLOSE_NOTIFY:
            self.closed = True
        elif description != USER_CANCELED:
            raise PeerAlert(description)

    def _handshake(self, content: bytes) -> None:
        buf = self._hs_in + content
        pos = 0
        while len(buf) - pos >= 4:
            msg_type = buf[pos]
            size = int.from_bytes(buf[pos + 1 : pos + 4], "big")
            if size > MAX_HANDSHAKE_MESSAGE:
                raise RecordError(UNEXPECTED_MESSAGE, f"handshake message of {size} bytes after the handshake")
            if len(buf) - pos - 4 < size:
                break
            body = buf[pos + 4 : pos + 4 + size]
            pos += 4 + size
            if msg_type == NEW_SESSION_TICKET and self.is_client:
                continue  # we never resume: the ticket is dropped
            if msg_type == KEY_UPDATE:
                if size != 1 or body[0] not in (0, 1):
                    raise RecordError(DECODE_ERROR if size != 1 else ILLEGAL_PARAMETER, "malformed KeyUpdate")
                if pos != len(buf):  # a key change must end its record (§5.1)
                    raise RecordError(UNEXPECTED_MESSAGE, "KeyUpdate not at the end of its record")
                self._read.update()
                # The answer is owed before our next application data (§4.6.3); after our close_notify there is
                # none, and the peer may go on sending (§6.1): no answer then, which the transport, shut for
                # writing after close_notify, could not carry anyway.
                # One answer covers every request received before our next application data (§4.6.3): a peer
                # asking again and again, while we send nothing, gets one.
                if body[0] == 1 and not self._write_closed and not self._answered:
                    self._update_write_key(requested=False)
                    self._answered = True
                continue
            raise RecordError(UNEXPECTED_MESSAGE, f"unexpected handshake message {msg_type} after the handshake")
        rest = buf[pos:]
        if len(rest) >= 4 and int.from_bytes(rest[1:4], "big") > MAX_HANDSHAKE_MESSAGE:  # pragma: no cover
            raise RecordError(UNEXPECTED_MESSAGE, "handshake message too large")
        self._hs_in = rest
