"""Property-based tests (hypothesis) of the record layer and the ClientHello sniffer: generated data, splits,
mutations and post-handshake records, checked against what must hold for every input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlsmesh import records, sniff
from mtlsmesh.records import RecordError
from tests.unit.test_records import forge, pair, receive, send, wire
from tests.unit.test_sniff import openssl_client_hello

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HELLO = openssl_client_hello()


def cut_points(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=20).map(sorted)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@SETTINGS
@given(st.data())
def test_the_sniffer_answers_the_same_however_the_bytes_are_cut(data: st.DataObject) -> None:
    wire_bytes = data.draw(st.sampled_from([HELLO, HELLO + b"\x17\x03\x03\x00\x05trail"]))
    mutate = data.draw(st.booleans())
    if mutate:  # one byte changed anywhere: some answer, the same whatever the cuts
        at = data.draw(st.integers(0, len(wire_bytes) - 1))
        wire_bytes = wire_bytes[:at] + bytes([data.draw(st.integers(0, 255))]) + wire_bytes[at + 1 :]
    batch = sniff.parse_client_hello(wire_bytes)
    sniffer = sniff.Sniffer()
    answers = [sniffer.feed(part) for part in chunks(wire_bytes, data.draw(cut_points(wire_bytes)))]
    assert sniffer.finish() == batch
    final = [a for a in answers if a.state is not sniff.SniffState.NEED_MORE]
    assert all(a == batch for a in final)  # an answer, once given, is the batch answer and stays
    if not mutate:
        assert batch.state is sniff.SniffState.CLIENT_HELLO and sniff.is_mesh(batch)


@SETTINGS
@given(st.binary(max_size=3000), st.lists(st.integers(1, 64), max_size=30))
def test_the_sniffer_never_raises_and_never_needs_more_past_the_limit(noise: bytes, sizes: list[int]) -> None:
    data = b"\x16\x03\x01" + noise
    sniffer = sniff.Sniffer()
    pos = 0
    for size in sizes:
        sniffer.feed(data[pos : pos + size])
        pos += size
    sniffer.feed(data[pos:])
    assert sniffer.finish() == sniff.parse_client_hello(data)
    assert sniff.parse_client_hello(data + bytes(sniff.MAX_CLIENT_HELLO)).state is not sniff.SniffState.NEED_MORE


@SETTINGS
@given(st.lists(st.binary(max_size=3 * records.MAX_PLAINTEXT), max_size=6), st.data())
def test_records_carry_any_data_cut_anywhere(messages: list[bytes], data: st.DataObject) -> None:
    a, b = pair()
    stream = b"".join(send(a, m) for m in messages)
    got, left = b"", b""
    for part in chunks(stream, data.draw(cut_points(stream))):
        plain, used = receive(b, left + part)
        got += plain
        left = (left + part)[used:]
    assert got == b"".join(messages) and left == b""


@SETTINGS
@given(st.binary(min_size=1, max_size=200), st.integers(0, 400), st.integers(0, 255))
def test_any_flipped_bit_is_a_bad_record_mac_and_nothing_is_delivered(payload: bytes, at: int, mask: int) -> None:
    a, b = pair()
    record = bytearray(send(a, payload))
    at %= len(record)
    if at < records.HEADER_SIZE and at in (0, 3, 4):
        return  # the type and length bytes are judged before authentication (their own tests)
    record[at] ^= mask or 1
    with pytest.raises(RecordError) as caught:
        receive(b, bytes(record))
    assert caught.value.alert == records.BAD_RECORD_MAC


@SETTINGS
@given(st.lists(st.sampled_from(["data", "empty", "padding", "key_update", "request", "canceled"]), max_size=80))
def test_the_idle_cap_and_the_one_answer_hold_for_any_sequence(kinds: list[str]) -> None:
    a, b = pair()  # b sends, a (the client) reads
    idle = answers_owed = 0
    for kind in kinds:
        if kind == "data":
            record = send(b, b"d")
        elif kind == "empty":
            record = forge(b, b"\x17")
        elif kind == "padding":
            record = forge(b, b"\x17" + bytes(50))
        elif kind == "canceled":
            b.alert(records.USER_CANCELED)
            record = wire(b)
        else:
            record = forge(b, b"\x18\x00\x00\x01" + (b"\x01" if kind == "request" else b"\x00") + b"\x16")
            b._write.update()
        idle = 0 if kind == "data" else idle + 1
        if idle > records.MAX_IDLE_RECORDS:
            with pytest.raises(RecordError, match="in a row"):
                receive(a, record)
            return
        plain, _ = receive(a, record)
        assert plain == (b"d" if kind == "data" else b"")
        if kind == "request":
            answers_owed = 1
        assert len(a.outgoing) == answers_owed  # one answer, however many requests (we never send here)
