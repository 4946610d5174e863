"""The sniffer's exact bounds, and the incremental sniffer's work: each limit at its value and one past it, a header
cut anywhere, and how often the body parser runs while a ClientHello is dribbled."""

from __future__ import annotations

import pytest

from mtlsmesh import sniff
from mtlsmesh.sniff import MAX_CLIENT_HELLO, Sniff, Sniffer, SniffState, parse_client_hello
from tests.unit.test_sniff import TLS12, TLS13, ext, handshake, hello, hello_body, records, vec, wire


def test_the_limits_are_what_the_module_says() -> None:
    assert (sniff.MAX_CLIENT_HELLO, sniff.MAX_RECORDS) == (32768, 64)


@pytest.mark.parametrize(("count", "state"), [(64, SniffState.CLIENT_HELLO), (65, SniffState.NOT_TLS)])
def test_at_most_64_records(count: int, state: SniffState) -> None:
    message = handshake(hello_body(extensions=ext(21, bytes(600))))
    pieces = [message[i * len(message) // count : (i + 1) * len(message) // count] for i in range(count)]
    data = b"".join(b"\x16\x03\x01" + vec(2, piece) for piece in pieces)
    assert parse_client_hello(data).state is state


@pytest.mark.parametrize(("declared", "state"), [(40, SniffState.NOT_TLS), (41, SniffState.NEED_MORE)])
def test_the_shortest_body_there_is(declared: int, state: SniffState) -> None:
    # legacy_version(2) random(32) session_id(1) one suite(4) one compression method(2): 41 bytes
    answer = parse_client_hello(b"\x16\x03\x01\x00\x04" + b"\x01" + declared.to_bytes(3, "big"))
    assert answer.state is state
    if state is SniffState.NOT_TLS:
        assert answer.reason == "ClientHello length 40 is too short"


@pytest.mark.parametrize(("extra", "state"), [(0, SniffState.NEED_MORE), (1, SniffState.NOT_TLS)])
def test_the_longest_declared_length(extra: int, state: SniffState) -> None:
    declared = MAX_CLIENT_HELLO - 5 - 4 + extra
    answer = parse_client_hello(b"\x16\x03\x01\x00\x04" + b"\x01" + declared.to_bytes(3, "big"))
    assert answer.state is state


@pytest.mark.parametrize(("minor", "state"), [(4, SniffState.CLIENT_HELLO), (5, SniffState.NOT_TLS)])
def test_record_and_legacy_versions_up_to_0x0304(minor: int, state: SniffState) -> None:
    body = wire(hello_body())
    assert parse_client_hello(body[:2] + bytes([minor]) + body[3:]).state is state
    legacy = wire(hello_body(version=0x0300 + minor))
    assert parse_client_hello(legacy).state is state


def test_one_byte_alpn_names_and_254_bytes_of_versions() -> None:
    alpn = ext(16, vec(2, vec(1, b"h") + vec(1, b"mtlsmesh")))
    assert parse_client_hello(wire(hello_body(extensions=alpn))) == hello(("h", "mtlsmesh"))
    versions = ext(43, vec(1, (TLS13.to_bytes(2, "big") + TLS12.to_bytes(2, "big")) * 63 + b"\x7a\x7a"))
    assert parse_client_hello(wire(hello_body(extensions=versions))).versions == (TLS13, TLS12) * 63
    too_many = ext(43, b"\xff" + bytes(255))
    answer = parse_client_hello(wire(hello_body(extensions=too_many)))
    assert answer == Sniff(SniffState.NOT_TLS, reason="supported_versions length 255 is out of range")


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (b"", "server_name list length 0 is out of range"),
        (b"\x00", "server_name length overruns its enclosing length"),
    ],
)
def test_a_server_name_list_too_short(names: bytes, reason: str) -> None:
    answer = parse_client_hello(wire(hello_body(extensions=ext(0, vec(2, names)))))
    assert answer == Sniff(SniffState.NOT_TLS, reason=reason)


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 6, 9])
def test_a_record_header_cut_anywhere(cut: int) -> None:
    data = records(handshake(hello_body(extensions=ext(16, vec(2, vec(1, b"mtlsmesh"))))), [30])
    sniffer = Sniffer()
    answers = [sniffer.feed(data[i : i + cut]) for i in range(0, len(data), cut)]
    assert answers[-1] == parse_client_hello(data) == hello(("mtlsmesh",))


def count_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = sniff._parse_body

    def counted(body: sniff._Cursor) -> Sniff:
        calls.append(len(body.data))
        return real(body)

    monkeypatch.setattr(sniff, "_parse_body", counted)
    return calls


def test_the_body_parser_runs_a_logarithmic_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dribbled byte by byte, 20 KB of ClientHello cost ~15 parses (each time the message has doubled, and once
    # complete), not 20,000: the work stays linear in the bytes.
    calls = count_parses(monkeypatch)
    data = records(handshake(hello_body(extensions=ext(21, bytes(20000)))), [16384])
    sniffer = Sniffer()
    for i in range(len(data)):
        answer = sniffer.feed(data[i : i + 1])
        sniffer.feed(b"")  # nothing new: no parse
    assert answer == hello()
    assert len(calls) <= 17, calls
    assert calls == sorted(calls) and len(set(calls)) == len(calls)


def test_finish_runs_the_parser_on_what_was_deferred() -> None:
    # 1000 bytes parsed (NEED_MORE), then a bad byte in 200 more: not yet parsed (the message has not doubled),
    # so feed still says NEED_MORE; finish says what a full parse says.
    body = hello_body(extensions=ext(21, bytes(1100)) + ext(16, b"\x00\x05\x03abc") + ext(22, bytes(3000)))
    data = wire(body)
    sniffer = Sniffer()
    assert sniffer.feed(data[:1000]).state is SniffState.NEED_MORE
    assert sniffer.feed(data[1000:1200]).state is SniffState.NEED_MORE
    assert sniffer.finish() == parse_client_hello(data[:1200])
    assert sniffer.finish().state is SniffState.NOT_TLS
