"""An authenticated client that breaks the record protocol after its handshake, against a real sidecar.

For every case of RFC 8446's list (and the caps): the sidecar sends the fatal alert the case deserves before the
connection ends (read and opened here), nothing of the connection reaches the app, the connection's log line
names the alert as its reason, and a well-behaved connection through the same sidecar is served right after.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import trio

from mtlsmesh import records
from tests.adversarial.peer import WAIT, Peer, header, open_peer, round_trip, sidecar_in_front_of_an_app
from tests.integration.mesh import conn_lines
from tests.pki import Pki

IO = 20.0


def flipped_tag(p: Peer) -> bytes:
    record = bytearray(p.data(b"forged"))
    record[-1] ^= 1
    return bytes(record)


def times(n: int, make: Callable[[Peer], bytes]) -> Callable[[Peer], bytes]:
    return lambda p: b"".join(make(p) for _ in range(n))


def user_canceled(p: Peer) -> bytes:
    return p.seal(b"\x01\x5a\x15")


IDLE = 33  # records in a row without application data: the 33rd is refused (records.MAX_IDLE_RECORDS)
# (case, what the peer sends, the alert, the reason on the log line)
CASES: list[tuple[str, Callable[[Peer], bytes], int, str]] = [
    ("bad tag", flipped_tag, 20, "bad_record_mac"),
    (
        "replayed record",
        lambda p: (lambda r: r + r)(p.seal(b"\x17")),
        20,
        "bad_record_mac",
    ),
    ("reordered records", lambda p: (lambda a, b: b + a)(p.seal(b"\x17"), p.seal(b"\x17")), 20, "bad_record_mac"),
    ("under the next key too early", lambda p: (p.write.update(), p.data(b"x"))[1], 20, "bad_record_mac"),
    ("oversized record", lambda p: header(records.MAX_CIPHERTEXT + 1) + bytes(100), 22, "record_overflow"),
    ("inner plaintext over 2^14+1", lambda p: p.seal(b"x\x17" + bytes(records.MAX_PLAINTEXT)), 22, "record_overflow"),
    ("record too short", lambda p: header(16) + bytes(16), 50, "decode_error"),
    ("empty records", times(IDLE, lambda p: p.seal(b"\x17")), 10, "unexpected_message"),
    ("padding-only records", times(IDLE, lambda p: p.seal(b"\x17" + bytes(200))), 10, "unexpected_message"),
    ("KeyUpdates", times(IDLE, lambda p: p.key_update()), 10, "unexpected_message"),
    ("user_canceled alerts", times(IDLE, user_canceled), 10, "unexpected_message"),
    ("all padding, no content type", lambda p: p.seal(bytes(30)), 10, "unexpected_message"),
    ("plaintext handshake record", lambda p: header(5, 22) + b"hello", 10, "unexpected_message"),
    ("change_cipher_spec record", lambda p: header(1, 20) + b"\x01", 10, "unexpected_message"),
    ("alert record in the clear", lambda p: header(2, 21) + b"\x02\x28", 10, "unexpected_message"),
    ("CCS inside a record", lambda p: p.seal(b"\x01\x14"), 10, "unexpected_message"),
    ("unknown inner type", lambda p: p.seal(b"x\x63"), 10, "unexpected_message"),
    ("ClientHello after the handshake", lambda p: p.seal(b"\x01\x00\x00\x00\x16"), 10, "unexpected_message"),
    ("Finished after the handshake", lambda p: p.seal(b"\x14\x00\x00\x01\x00\x16"), 10, "unexpected_message"),
    ("NewSessionTicket to a server", lambda p: p.seal(b"\x04\x00\x00\x01\x00\x16"), 10, "unexpected_message"),
    ("empty handshake record", lambda p: p.seal(b"\x16"), 10, "unexpected_message"),
    ("empty alert", lambda p: p.seal(b"\x15"), 10, "unexpected_message"),
    ("short alert", lambda p: p.seal(b"\x02\x15"), 10, "unexpected_message"),
    ("KeyUpdate of two bytes", lambda p: p.seal(b"\x18\x00\x00\x02\x00\x00\x16"), 50, "decode_error"),
    ("KeyUpdate value 2", lambda p: p.seal(b"\x18\x00\x00\x01\x02\x16"), 47, "illegal_parameter"),
    (
        "data inside a handshake message",
        lambda p: p.seal(b"\x18\x00\x00\x01\x16") + p.data(b"x"),
        10,
        "unexpected_message",
    ),
]


@pytest.mark.parametrize(("case", "make", "alert", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_a_violation_is_refused_with_its_alert_before_the_end(
    pki: Pki, caplog: pytest.LogCaptureFixture, case: str, make: Callable[[Peer], bytes], alert: int, reason: str
) -> None:
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki) as target:
            peer = await open_peer(pki, target.port)
            await peer.send(make(peer))
            got, how = await peer.alert_then_end()
            assert got == alert, f"{case}: alert {got}, ended by {how}"
            assert how in ("eof", "reset"), how  # ended, not left hanging
            await peer.stream.aclose()
            assert await round_trip(pki, target.port, b"still served") == b"still served"
            assert target.received == [b"still served"]  # nothing of the hostile connection reached the app
            await trio.sleep(0.2)  # the hostile connection's log line
    lines = [line for line in conn_lines(caplog.records, "inbound") if "mallory" in line]
    assert len(lines) == 1 and re.search(rf" reason={reason}( |$)", lines[0]), lines


async def test_a_truncated_record_ends_without_reaching_the_app(pki: Pki) -> None:
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki) as target:
            peer = await open_peer(pki, target.port)
            record = peer.data(b"half of me")
            await peer.send(record[: len(record) // 2])
            await peer.stream.send_eof()
            _, how = await peer.read_to_end()
            assert how in ("eof", "reset")
            assert await round_trip(pki, target.port) == b"x"
            assert target.received == [b"x"]


async def test_data_after_close_notify_never_reaches_the_app(pki: Pki) -> None:
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki) as target:
            peer = await open_peer(pki, target.port)
            await peer.send(peer.data(b"before") + peer.seal(b"\x01\x00\x15") + peer.data(b"after close_notify"))
            with trio.move_on_after(WAIT):
                while b"".join(target.received) != b"before":
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert b"".join(target.received) == b"before"
            await peer.stream.aclose()
            assert await round_trip(pki, target.port) == b"x"
