"""The record layer against the RFC's own numbers and an independent key schedule: what two `Session`s facing each
other cannot see (both would agree on a wrong constant), checked here with literals from RFC 8446 and RFC 8448 and
with `cryptography`'s HKDF; and the exact bounds of every size check."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from mtlsmesh import records
from mtlsmesh.records import RecordError, Session
from tests.unit.test_records import forge, pair, receive, send, split_records, wire

# RFC 8446 §6: every alert the module names, by number.
RFC_ALERTS = {
    0: "close notify", 10: "unexpected message", 20: "bad record mac", 22: "record overflow", 40: "handshake failure",
    42: "bad certificate", 43: "unsupported certificate", 44: "certificate revoked", 45: "certificate expired",
    46: "certificate unknown", 47: "illegal parameter", 48: "unknown ca", 49: "access denied", 50: "decode error",
    51: "decrypt error", 70: "protocol version", 71: "insufficient security", 80: "internal error",
    86: "inappropriate fallback", 90: "user canceled", 109: "missing extension", 110: "unsupported extension",
    112: "unrecognized name", 113: "bad certificate status response", 115: "unknown psk identity",
    116: "certificate required", 120: "no application protocol",
}  # fmt: skip


def test_the_alert_names_are_rfc_8446s() -> None:
    assert records.ALERT_NAMES == RFC_ALERTS
    named = [
        (records.CLOSE_NOTIFY, 0), (records.UNEXPECTED_MESSAGE, 10), (records.BAD_RECORD_MAC, 20),
        (records.RECORD_OVERFLOW, 22), (records.BAD_CERTIFICATE, 42), (records.ILLEGAL_PARAMETER, 47),
        (records.ACCESS_DENIED, 49), (records.DECODE_ERROR, 50), (records.INTERNAL_ERROR, 80),
        (records.USER_CANCELED, 90),
    ]  # fmt: skip
    assert [ours for ours, _ in named] == [rfc for _, rfc in named]


def test_the_content_types_sizes_and_limits_are_the_rfcs() -> None:
    # RFC 8446 §5.1 and §5.2, §4 (handshake types), §5.5 (AES-GCM: 2^24.5 full records per key; we stop at 2^24).
    assert (records.CHANGE_CIPHER_SPEC, records.ALERT, records.HANDSHAKE, records.APPLICATION_DATA) == (20, 21, 22, 23)
    assert (records.NEW_SESSION_TICKET, records.KEY_UPDATE) == (4, 24)
    assert (records.HEADER_SIZE, records.TAG_SIZE, records.MAX_PLAINTEXT) == (5, 16, 16384)
    assert records.MAX_CIPHERTEXT == 16384 + 256 and records.MAX_RECORD == 5 + 16384 + 256
    assert records.OVERHEAD == 5 + 1 + 16
    assert Session(records.SUITES["TLS_AES_128_GCM_SHA256"], bytes(32), bytes(32), is_client=True).key_update_after
    assert records.KEY_UPDATE_AFTER == 2**24 and records.SEQUENCE_LIMIT == 2**64 - 1
    assert (records.MAX_IDLE_RECORDS, records.OPEN_BUDGET, records.MAX_HANDSHAKE_MESSAGE) == (32, 64, 65536)


def expand(algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, length: int) -> bytes:
    info = length.to_bytes(2, "big") + bytes([6 + len(label)]) + b"tls13 " + label + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


SUITES = [
    ("TLS_AES_256_GCM_SHA384", AESGCM, 32, hashes.SHA384()),
    ("TLS_AES_128_GCM_SHA256", AESGCM, 16, hashes.SHA256()),
    ("TLS_CHACHA20_POLY1305_SHA256", ChaCha20Poly1305, 32, hashes.SHA256()),
]


@pytest.mark.parametrize(("name", "aead", "key_size", "algorithm"), SUITES, ids=[s[0] for s in SUITES])
def test_keys_ivs_and_key_updates_follow_an_independent_key_schedule(
    name: str, aead: type, key_size: int, algorithm: hashes.HashAlgorithm
) -> None:
    # RFC 8446 §7.3 (key, iv) and §7.2 (application_traffic_secret_N+1 = HKDF-Expand-Label(.., "traffic upd", "",
    # Hash.length)), computed with cryptography's HKDF; then one record sealed with those, opened by the session.
    suite = records.SUITES[name]
    secret = bytes(range(algorithm.digest_size))
    session = Session(suite, secret, bytes(algorithm.digest_size), is_client=True)
    for generation in range(3):
        key, iv = expand(algorithm, secret, b"key", key_size), expand(algorithm, secret, b"iv", 12)
        assert session._read.secret == secret and session._read.iv == int.from_bytes(iv, "big")
        header = bytes((23, 3, 3, 0, 5 + 1 + 16))
        record = header + aead(key).encrypt(iv, b"hello\x17", header)  # sequence number 0: the nonce is the IV
        assert receive(session, record)[0] == b"hello"
        update = b"\x18\x00\x00\x01\x00\x16"
        nonce = (int.from_bytes(iv, "big") ^ 1).to_bytes(12, "big")
        header = bytes((23, 3, 3, 0, len(update) + 16))
        assert receive(session, header + aead(key).encrypt(nonce, update, header)) == (b"", 5 + 6 + 16)
        secret = expand(algorithm, secret, b"traffic upd", algorithm.digest_size)
        del generation


def test_the_record_header_on_the_wire() -> None:
    a, _ = pair()
    for size in (0, 1, 300, records.MAX_PLAINTEXT, records.MAX_PLAINTEXT + 1):
        for record in split_records(send(a, bytes(size))):
            body = len(record) - 5
            assert record[:5] == bytes((23, 3, 3, body >> 8, body & 0xFF))
    assert [len(r) for r in split_records(send(a, bytes(records.MAX_PLAINTEXT + 1)))] == [5 + 16385 + 16, 5 + 2 + 16]


def test_our_key_update_is_a_not_requested_one_on_the_wire() -> None:
    a, b = pair()
    a.key_update_after = 1
    data = send(a, b"one") + send(a, b"two")  # the second seal needs a new key: KeyUpdate(update_not_requested)
    assert len(split_records(data)) == 3
    assert receive(b, data)[0] == b"onetwo"
    assert b.take() == b""  # not requested: nothing owed
    a.request_key_update()
    assert receive(b, wire(a))[0] == b"" and len(b.outgoing) == 1  # requested: answered


def test_after_our_close_notify_a_request_gets_no_answer_and_after_user_canceled_it_does() -> None:
    a, b = pair()
    a.alert(records.CLOSE_NOTIFY)
    a.take()
    b.request_key_update()
    receive(a, wire(b))
    assert a.outgoing == []  # we send nothing after close_notify (RFC 8446 §6.1)
    a, b = pair()
    a.alert(records.USER_CANCELED)  # a warning: we may go on sending, so we answer
    a.take()
    b.request_key_update()
    receive(a, wire(b))
    assert len(a.outgoing) == 1


def test_the_size_checks_are_exact() -> None:
    # A record of exactly MAX_CIPHERTEXT passes the header check and is judged on its inner plaintext; one more is
    # refused from the header alone.
    a, b = pair()
    inner = b"x" + bytes([23]) + bytes(records.MAX_CIPHERTEXT - 16 - 2)
    with pytest.raises(RecordError, match="inner plaintext of 16624 bytes"):
        receive(b, forge(a, inner))
    a, b = pair()
    with pytest.raises(RecordError, match="record of 16641 bytes is over the limit"):
        receive(b, bytes((23, 3, 3, 0x41, 0x01)))  # a header alone: judged before any body arrives
    # Inner plaintext of exactly 2^14 + 1 (full content and its type) is fine; the smallest record (a type byte
    # and a tag) too, and one byte shorter is not.
    a, b = pair()
    assert receive(b, forge(a, bytes(records.MAX_PLAINTEXT) + b"\x17"))[0] == bytes(records.MAX_PLAINTEXT)
    assert receive(b, forge(a, b"\x17")) == (b"", 5 + 17)
    with pytest.raises(RecordError, match="record of 16 bytes is too short"):
        receive(b, bytes((23, 3, 3, 0, 16)))


def test_room_for_exactly_one_inner_plaintext_is_room_enough() -> None:
    a, b = pair()
    data = send(a, b"12345") + send(a, b"67890")
    out = bytearray(6)  # the inner plaintext is opened in place: content and its type byte
    assert b.open_into(memoryview(data), memoryview(out)) == (5 + 6 + 16, 5)
    assert bytes(out[:5]) == b"12345"
    small = bytearray(5)
    assert b.open_into(memoryview(data)[5 + 6 + 16 :], memoryview(small)) == (0, 0)


def ticket(size: int) -> bytes:
    return b"\x04" + size.to_bytes(3, "big") + bytes(size)  # NewSessionTicket: handshake type 4


def test_handshake_messages_split_anywhere_and_the_largest_allowed() -> None:
    a, b = pair()  # b sends tickets to the client a
    message = ticket(200)
    for cut in (1, 3, 4, 5, 100, 199, 201, 202, 203):
        data = forge(b, message[:cut] + b"\x16") + forge(b, message[cut:] + b"\x16") + send(b, b"after")
        assert receive(a, data) == (b"after", len(data)), cut
    # a whole message, then the start of the next one, in one record: the second waits for its rest
    first, second = ticket(50), ticket(100)
    data = forge(b, first + second[:80] + b"\x16") + forge(b, second[80:] + b"\x16") + send(b, b"both")
    assert receive(a, data) == (b"both", len(data))
    largest = ticket(records.MAX_HANDSHAKE_MESSAGE)
    pieces = [largest[i : i + 16000] for i in range(0, len(largest), 16000)]
    data = b"".join(forge(b, piece + b"\x16") for piece in pieces) + send(b, b"ok")
    assert receive(a, data) == (b"ok", len(data))
    with pytest.raises(RecordError, match="65537 bytes"):
        receive(a, forge(b, ticket(records.MAX_HANDSHAKE_MESSAGE + 1)[:4] + b"\x16"))
