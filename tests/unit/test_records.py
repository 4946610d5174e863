"""The TLS 1.3 record layer on its own: key schedule vectors, sealing and opening, and every refusal.

Two `Session`s face each other here (one's write secret is the other's read secret); the same code against real
OpenSSL peers is in tests/integration/test_record_interop.py. Records that a correct peer would never send are
made with `forge`, which seals any inner plaintext under a direction's current key.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from mtlsmesh import records
from mtlsmesh.records import PeerAlert, RecordError, Session

SUITE = records.SUITES["TLS_AES_256_GCM_SHA384"]
A_SECRET = bytes(range(48))  # what the client writes with
B_SECRET = bytes(range(100, 148))


def pair(suite: records.Suite = SUITE) -> tuple[Session, Session]:
    """A client and a server session that talk to each other."""
    a = Session(suite, B_SECRET[: suite.hash_size], A_SECRET[: suite.hash_size], is_client=True)
    b = Session(suite, A_SECRET[: suite.hash_size], B_SECRET[: suite.hash_size], is_client=False)
    return a, b


def wire(session: Session) -> bytes:
    """Everything `session` has queued to send."""
    out = b""
    while chunk := session.take():
        out += chunk
    return out


def send(session: Session, data: bytes) -> bytes:
    session.seal(memoryview(data), bytearray(records.MAX_PLAINTEXT + 1))
    return wire(session)


def receive(session: Session, data: bytes) -> tuple[bytes, int]:
    """(plaintext, bytes of `data` used)."""
    out = bytearray(1 << 20)
    used, produced = session.open_into(memoryview(data), memoryview(out))
    return bytes(out[:produced]), used


def forge(sender: Session, inner: bytes) -> bytes:
    """A record whose inner plaintext (content, content type, padding) is exactly `inner`, under `sender`'s key."""
    direction = sender._write
    length = len(inner) + records.TAG_SIZE
    header = bytes((records.APPLICATION_DATA, 3, 3, length >> 8, length & 0xFF))
    aead: Any = direction.aead  # the whole AESGCM object, not only the part records.Session uses
    return header + bytes(aead.encrypt(direction.nonce(), inner, header))


def split_records(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        end = pos + 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
        out.append(data[pos:end])
        pos = end
    return out


# --- the key schedule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "key", "iv"),
    [
        # RFC 8448 §3 (TLS_AES_128_GCM_SHA256): the server's handshake and application traffic keys.
        (
            "b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38",
            "3fce516009c21727d0f2e4e86ee403bc",
            "5d313eb2671276ee13000b30",
        ),
        (
            "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643",
            "9f02283b6c9c07efc26bb9f2ac92e356",
            "cf782b88dd83549aadf1e984",
        ),
    ],
)
def test_traffic_key_and_iv_match_rfc_8448(secret: str, key: str, iv: str) -> None:
    s = bytes.fromhex(secret)
    assert records.hkdf_expand_label("sha256", s, b"key", b"", 16).hex() == key
    assert records.hkdf_expand_label("sha256", s, b"iv", b"", 12).hex() == iv


@pytest.mark.parametrize(
    ("hash_name", "algorithm", "length"), [("sha384", hashes.SHA384(), 48), ("sha256", hashes.SHA256(), 80)]
)
def test_expand_label_is_hkdf_expand_over_the_rfc_8446_label(
    hash_name: str, algorithm: hashes.HashAlgorithm, length: int
) -> None:
    # HkdfLabel: uint16 length, opaque label<7..255> = "tls13 " + label, opaque context<0..255> (RFC 8446 §7.1).
    # 80 bytes of SHA-256 takes three HMAC blocks.
    secret, label, context = os.urandom(48), b"traffic upd", b"ctx"
    info = length.to_bytes(2, "big") + bytes([6 + len(label)]) + b"tls13 " + label + bytes([len(context)]) + context
    expected = HKDFExpand(algorithm, length, info).derive(secret)
    assert records.hkdf_expand_label(hash_name, secret, label, context, length) == expected


# --- sealing and opening ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", records.SUITES.values(), ids=list(records.SUITES))
@pytest.mark.parametrize("size", [1, 100, records.MAX_PLAINTEXT, records.MAX_PLAINTEXT + 1, 100_000])
def test_what_one_side_seals_the_other_opens(suite: records.Suite, size: int) -> None:
    a, b = pair(suite)
    data = os.urandom(size)
    sent = send(a, data)
    parts = split_records(sent)
    assert len(parts) == -(-size // records.MAX_PLAINTEXT)  # full records, the last one partial
    assert all(len(p) <= records.HEADER_SIZE + records.MAX_PLAINTEXT + 1 + records.TAG_SIZE for p in parts)
    # A short plaintext turns up in random ciphertext by chance (one byte in a 22-byte record: about 8%), so the
    # check that nothing leaks in the clear looks for 16 bytes or more, which chance never finds.
    if size >= 16:
        assert data[:16] not in sent
    assert receive(b, sent) == (data, len(sent))
    # and back, on the other key
    reply = os.urandom(size)
    sent_back = send(b, reply)
    assert receive(a, sent_back) == (reply, len(sent_back))


def test_both_directions_and_their_sequence_numbers() -> None:
    a, b = pair()
    for i in range(5):
        assert receive(b, send(a, b"ping %d" % i))[0] == b"ping %d" % i
        assert receive(a, send(b, b"pong %d" % i))[0] == b"pong %d" % i
    assert a._write.seq == a._read.seq == b._write.seq == b._read.seq == 5


def test_sealing_nothing_makes_no_record() -> None:
    a, _ = pair()
    assert send(a, b"") == b""
    assert a._write.seq == 0


def test_a_partial_record_waits_for_the_rest() -> None:
    a, b = pair()
    sent = send(a, b"hello") + send(a, b"world")
    first = len(split_records(sent)[0])
    for cut in (0, 1, 4, 5, first - 1):
        _, c = pair()
        assert receive(c, sent[:cut]) == (b"", 0)
    assert receive(b, sent[: first + 3]) == (b"hello", first)
    assert receive(b, sent[first:]) == (b"world", len(sent) - first)


def test_no_room_for_the_next_record_stops_before_it() -> None:
    a, b = pair()
    sent = send(a, b"x" * 100) + send(a, b"y" * 100)
    out = bytearray(150)
    used, produced = b.open_into(memoryview(sent), memoryview(out))
    assert (used, produced) == (len(split_records(sent)[0]), 100)
    assert bytes(out[:100]) == b"x" * 100


def test_padding_is_stripped() -> None:
    a, b = pair()
    assert receive(b, forge(a, b"padded" + bytes([records.APPLICATION_DATA]) + bytes(300)))[0] == b"padded"


def test_an_empty_application_record_is_no_data() -> None:
    a, b = pair()
    record = forge(a, bytes([records.APPLICATION_DATA]))
    after = send(a, b"after")
    assert receive(b, record + after) == (b"after", len(record) + len(after))


# --- refusals: (what arrives, the alert we owe, the reason) -----------------------------------------------------


def flip(record: bytes, at: int) -> bytes:
    return record[:at] + bytes([record[at] ^ 1]) + record[at + 1 :]


REFUSED: list[tuple[str, object, int, str]] = [
    ("tampered ciphertext", lambda a: flip(send(a, b"data"), 7), records.BAD_RECORD_MAC, "failed authentication"),
    ("tampered tag", lambda a: flip(send(a, b"data"), -1), records.BAD_RECORD_MAC, "failed authentication"),
    ("tampered header", lambda a: flip(send(a, b"data"), 2), records.BAD_RECORD_MAC, "failed authentication"),
    ("plaintext handshake", lambda a: b"\x16\x03\x03\x00\x05hello", records.UNEXPECTED_MESSAGE, "record type 22"),
    ("change_cipher_spec", lambda a: b"\x14\x03\x03\x00\x01\x01", records.UNEXPECTED_MESSAGE, "record type 20"),
    ("oversized record", lambda a: b"\x17\x03\x03\x41\x01" + bytes(10), records.RECORD_OVERFLOW, "over the limit"),
    ("record too short", lambda a: b"\x17\x03\x03\x00\x10" + bytes(16), records.DECODE_ERROR, "too short"),
    ("no content type", lambda a: forge(a, bytes(20)), records.UNEXPECTED_MESSAGE, "no content type"),
    ("unknown content type", lambda a: forge(a, b"x\x63"), records.UNEXPECTED_MESSAGE, "content type 99"),
    ("CCS inside", lambda a: forge(a, b"\x01\x14"), records.UNEXPECTED_MESSAGE, "content type 20"),
    (
        "content over 2^14",
        lambda a: forge(a, bytes(records.MAX_PLAINTEXT + 1) + b"\x17"),
        records.RECORD_OVERFLOW,
        "inner plaintext of 16386 bytes",
    ),
    (
        "inner plaintext over 2^14 + 1 through padding",
        lambda a: forge(a, b"data\x17" + bytes(records.MAX_PLAINTEXT - 3)),
        records.RECORD_OVERFLOW,
        "inner plaintext of 16386 bytes",
    ),
    # One whole alert per record (RFC 8446 §5.1): anything else is unexpected_message, not decode_error.
    ("empty alert", lambda a: forge(a, b"\x15"), records.UNEXPECTED_MESSAGE, "malformed alert"),
    ("short alert", lambda a: forge(a, b"\x02\x15"), records.UNEXPECTED_MESSAGE, "malformed alert"),
    ("long alert", lambda a: forge(a, b"\x02\x28\x00\x15"), records.UNEXPECTED_MESSAGE, "malformed alert"),
    (
        "alert inside a handshake message",
        lambda a: forge(a, b"\x18\x00\x00\x01\x16") + forge(a, b"\x02\x28\x15"),
        records.UNEXPECTED_MESSAGE,
        "malformed alert",
    ),
    # A header's first byte is judged as soon as it is there, not once the whole header is.
    ("partial plaintext header", lambda a: b"\x16\x03", records.UNEXPECTED_MESSAGE, "record type 22"),
    ("empty handshake", lambda a: forge(a, b"\x16"), records.UNEXPECTED_MESSAGE, "empty handshake record"),
    (
        "ticket sent to a server",
        lambda a: forge(a, b"\x04\x00\x00\x01\x00\x16"),
        records.UNEXPECTED_MESSAGE,
        "handshake message 4",
    ),
    ("Finished again", lambda a: forge(a, b"\x14\x00\x00\x01\x00\x16"), records.UNEXPECTED_MESSAGE, "message 20"),
    ("KeyUpdate of 2 bytes", lambda a: forge(a, b"\x18\x00\x00\x02\x00\x00\x16"), records.DECODE_ERROR, "KeyUpdate"),
    ("KeyUpdate value 2", lambda a: forge(a, b"\x18\x00\x00\x01\x02\x16"), records.ILLEGAL_PARAMETER, "KeyUpdate"),
    (
        "KeyUpdate not last in its record",
        lambda a: forge(a, b"\x18\x00\x00\x01\x00" + b"\x18\x00\x00\x01\x00\x16"),
        records.UNEXPECTED_MESSAGE,
        "not at the end of its record",
    ),
    (
        "huge handshake message",
        lambda a: forge(a, b"\x04\x01\x00\x01\x16"),
        records.UNEXPECTED_MESSAGE,
        "65537 bytes",
    ),
    (
        "data inside a handshake message",
        lambda a: forge(a, b"\x18\x00\x00\x01\x16") + forge(a, b"data\x17"),
        records.UNEXPECTED_MESSAGE,
        "inside a handshake message",
    ),
]


@pytest.mark.parametrize(("case", "make", "alert", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_the_alert_it_deserves(case: str, make: object, alert: int, reason: str) -> None:
    a, b = pair()
    data = make(a)  # type: ignore[operator]
    with pytest.raises(RecordError, match=reason) as caught:
        receive(b, data)
    assert caught.value.alert == alert


def test_an_error_after_good_records_comes_after_their_data() -> None:
    a, b = pair()
    good = send(a, b"good")
    bad = flip(send(a, b"bad"), 8)
    assert receive(b, good + bad) == (b"good", len(good))
    with pytest.raises(RecordError, match="failed authentication"):
        receive(b, bad)
    with pytest.raises(RecordError, match="failed authentication"):  # and it stays failed
        receive(b, send(a, b"later"))


def test_an_error_stays_whatever_comes_next() -> None:
    a, b = pair()
    with pytest.raises(RecordError, match="failed authentication") as first:
        receive(b, flip(send(a, b"bad"), 8))
    with pytest.raises(RecordError) as again:
        receive(b, send(a, b"good, but after a failure"))
    assert again.value is first.value


def test_a_replayed_or_reordered_record_fails() -> None:
    a, b = pair()
    first, second = send(a, b"first"), send(a, b"second")
    assert receive(b, first)[0] == b"first"
    with pytest.raises(RecordError, match="failed authentication"):
        receive(b, first)  # the same record again: the sequence number has moved on
    _, c = pair()
    with pytest.raises(RecordError, match="failed authentication"):
        receive(c, second)  # the second record first


# --- alerts ----------------------------------------------------------------------------------------------------


def test_close_notify_ends_reading_and_what_follows_is_ignored() -> None:
    a, b = pair()
    data = send(a, b"before")
    a.alert(records.CLOSE_NOTIFY)
    data += wire(a) + send(a, b"after close_notify")
    plain, used = receive(b, data)
    assert plain == b"before"
    assert b.closed
    assert receive(b, data[used:]) == (b"", 0)


def test_user_canceled_is_not_an_error() -> None:
    a, b = pair()
    a.alert(records.USER_CANCELED)
    assert receive(b, wire(a) + send(a, b"still here"))[0] == b"still here"


@pytest.mark.parametrize(
    ("description", "name"),
    [(20, "bad record mac"), (48, "unknown ca"), (116, "certificate required"), (200, "number 200")],
)
def test_a_fatal_alert_from_the_peer_names_itself(description: int, name: str) -> None:
    a, b = pair()
    a.alert(description)
    record = wire(a)
    with pytest.raises(PeerAlert, match=f"^peer sent alert {name}$"):
        receive(b, record)
    # fatal alerts are level 2, close_notify level 1
    inner = bytearray(4)
    b2 = Session(SUITE, A_SECRET, B_SECRET, is_client=False)
    b2._read.aead.decrypt_into(b2._read.nonce(), memoryview(record)[5:], record[:5], memoryview(inner)[:3])
    assert bytes(inner[:3]) == bytes((2, description, records.ALERT))


# --- post-handshake messages -----------------------------------------------------------------------------------


def ticket(size: int) -> bytes:
    return bytes([records.NEW_SESSION_TICKET]) + size.to_bytes(3, "big") + os.urandom(size)


def test_a_client_drops_session_tickets_even_split_over_records() -> None:
    a, b = pair()  # a is the client: b sends it tickets
    message = ticket(200)
    data = forge(b, message[:3] + b"\x16") + forge(b, message[3:150] + b"\x16") + forge(b, message[150:] + b"\x16")
    data += forge(b, ticket(50) + ticket(60) + b"\x16") + send(b, b"reply")
    assert receive(a, data) == (b"reply", len(data))


def test_key_update_not_requested_moves_the_read_key_only() -> None:
    a, b = pair()
    old_read = a._read.secret
    b._update_write_key(requested=False)
    data = wire(b) + send(b, b"under the new key")
    assert receive(a, data)[0] == b"under the new key"
    assert a._read.secret != old_read
    assert a.take() == b""  # nothing owed
    assert receive(b, send(a, b"our key never moved"))[0] == b"our key never moved"


def test_key_update_requested_is_answered_before_our_next_record() -> None:
    a, b = pair()
    b.request_key_update()
    assert receive(a, wire(b) + send(b, b"new key"))[0] == b"new key"
    # a owes b a KeyUpdate: it is queued first, then a's records under a's next key
    reply = send(a, b"answered")
    assert len(split_records(reply)) == 2
    assert receive(b, reply)[0] == b"answered"
    assert a._write.seq == b._read.seq == 1


def test_our_write_key_moves_on_after_the_limit() -> None:
    a, b = pair()
    a.key_update_after = 3
    secrets = {a._write.secret}
    received = b""
    for i in range(10):
        received += receive(b, send(a, b"%d," % i))[0]
        secrets.add(a._write.secret)
    assert received == b"".join(b"%d," % i for i in range(10))
    assert len(secrets) == 4  # the first key and three updates: records 0-2, 3-5, 6-8, 9
    assert b._read.secret == a._write.secret


def test_one_seal_of_many_records_updates_before_them() -> None:
    a, b = pair()
    a.key_update_after = 4
    data = os.urandom(6 * records.MAX_PLAINTEXT)
    sent = send(a, data[: 3 * records.MAX_PLAINTEXT]) + send(a, data[3 * records.MAX_PLAINTEXT :])
    assert len(split_records(sent)) == 7  # 6 data records and one KeyUpdate, before the second batch
    assert receive(b, sent)[0] == data


# --- caps: records without application data, KeyUpdate answers, the queue, the keys' end ----------------------

KEY_UPDATE_REQUESTED = b"\x18\x00\x00\x01\x01\x16"
KEY_UPDATE_NOT_REQUESTED = b"\x18\x00\x00\x01\x00\x16"

# Records that carry no application data, each as a peer could send them one after another (the sender is the
# server b; the receiver the client a, the only side a NewSessionTicket may be sent to).
IDLE_RECORDS: list[tuple[str, Any]] = [
    ("KeyUpdate", lambda b: b._update_write_key(requested=False) or wire(b)),
    ("empty record", lambda b: forge(b, b"\x17")),
    ("padding-only record", lambda b: forge(b, b"\x17" + bytes(300))),
    ("user_canceled", lambda b: b.alert(records.USER_CANCELED) or wire(b)),
    ("NewSessionTicket", lambda b: forge(b, ticket(40) + b"\x16")),
]


@pytest.mark.parametrize("make", [m for _, m in IDLE_RECORDS], ids=[n for n, _ in IDLE_RECORDS])
def test_the_33rd_record_in_a_row_without_data_is_refused(make: Any) -> None:
    a, b = pair()
    allowed = b"".join(make(b) for _ in range(records.MAX_IDLE_RECORDS))
    assert receive(a, allowed) == (b"", len(allowed))  # 32 are fine (OpenSSL sends two tickets, for one)
    one_more = make(b)
    with pytest.raises(RecordError, match="more than 32 records in a row without data") as caught:
        receive(a, one_more)
    assert caught.value.alert == records.UNEXPECTED_MESSAGE == 10


def test_application_data_starts_the_count_again() -> None:
    a, b = pair()
    for round_ in range(3):
        idle = b"".join(forge(b, b"\x17") for _ in range(records.MAX_IDLE_RECORDS))
        data = idle + send(b, b"%d" % round_)
        assert receive(a, data) == (b"%d" % round_, len(data))
    # an empty record is not data: it does not start the count again
    with pytest.raises(RecordError, match="in a row"):
        receive(a, b"".join(forge(b, b"\x17") for _ in range(records.MAX_IDLE_RECORDS + 1)))


def test_many_key_update_requests_get_one_answer_until_we_send() -> None:
    # RFC 8446 §4.6.3: one answer covers every request received before our next application data.
    a, b = pair()
    requests = b""
    for _ in range(records.MAX_IDLE_RECORDS):
        requests += forge(b, KEY_UPDATE_REQUESTED)
        b._write.update()
    assert receive(a, requests) == (b"", len(requests))
    assert len(a.outgoing) == 1
    answer = a.take()
    assert a.queued == 0
    # The answer moved a's key once: b, updating its read key once, reads what a sends next.
    assert receive(b, answer + send(a, b"after one answer"))[0] == b"after one answer"
    # After our data a new request is owed a new answer.
    data = send(b, b"x") + forge(b, KEY_UPDATE_REQUESTED)
    b._write.update()
    assert receive(a, data)[0] == b"x"
    assert len(split_records(wire(a))) == 1


def test_the_queue_counts_its_bytes() -> None:
    a, _ = pair()
    a.seal(memoryview(bytes(40000)), bytearray(records.MAX_PLAINTEXT + 1))
    a.alert(records.CLOSE_NOTIFY)
    assert (
        a.queued == sum(len(r) for r in a.outgoing) == 40000 + 3 * records.OVERHEAD + records.HEADER_SIZE + 2 + 1 + 16
    )
    while a.take():
        pass
    assert a.queued == 0


def test_wiping_forgets_both_secrets_and_refuses_every_use() -> None:
    a, b = pair()
    record = send(b, b"in flight")
    a.wipe()
    assert a._read.secret == a._write.secret == b""
    with pytest.raises(RecordError, match="wiped") as caught:
        receive(a, record)
    assert caught.value.alert == records.INTERNAL_ERROR
    with pytest.raises(RecordError, match="wiped"):
        send(a, b"nothing")


def test_alert_numbers_and_levels_on_the_wire() -> None:
    # The bytes, not only the names: close_notify and user_canceled are warnings (1), everything else fatal (2).
    for description, level in [(0, 1), (90, 1), (10, 2), (20, 2), (22, 2), (42, 2), (49, 2), (50, 2), (80, 2)]:
        a, b = pair()
        a.alert(description)
        record = wire(a)
        assert record[:5] == bytes((23, 3, 3, 0, 2 + 1 + 16))
        inner = bytearray(3)
        b._read.aead.decrypt_into(b._read.nonce(), memoryview(record)[5:], record[:5], memoryview(inner))
        assert bytes(inner) == bytes((level, description, records.ALERT))


def test_one_call_opens_a_bounded_number_of_records_without_data() -> None:
    # The caller checkpoints between calls: one call must not open a whole socket read of records without data,
    # even when a byte of data now and then keeps them under the cap in a row.
    a, b = pair()
    groups = []
    for _ in range(4):
        groups.append([forge(b, b"\x17") for _ in range(31)] + [send(b, b"d")])
    flat = [r for g in groups for r in g]
    data = b"".join(flat)
    assert records.OPEN_BUDGET == 64
    plain, used = receive(a, data)
    # 64 records without data: two groups of 31 (and their data bytes) and two more
    assert plain == b"dd" and used == sum(len(r) for r in flat[: 2 * 32 + 2])
    plain, more = receive(a, data[used:])
    assert plain == b"dd" and used + more == len(data)
