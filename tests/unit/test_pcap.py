"""The capture reader: pcap framing, TCP reassembly and the TLS record walk, on hand-built packets."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from mtlsmesh.lab.pcap import Flow, PcapError, TlsRecord, parse_pcap, reassemble, tls_records


def tcp_frame(src: str, dst: str, sport: int, dport: int, seq: int, payload: bytes, flags: int = 0x18) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp),
        0,
        0,
        64,
        6,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp


def pcap_file(frames: list[bytes], endian: str = "<", magic: int = 0xA1B2C3D4) -> bytes:
    out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 262144, 1)
    for frame in frames:
        out += struct.pack(endian + "IIII", 0, 0, len(frame), len(frame)) + frame
    return out


A, B = "198.18.0.10", "198.18.0.11"
FLOW = Flow(A, 40000, B, 9080)


@pytest.mark.parametrize(("endian", "magic"), [("<", 0xA1B2C3D4), (">", 0xA1B2C3D4), ("<", 0xA1B23C4D)])
def test_parse_both_byte_orders_and_nanoseconds(endian: str, magic: int) -> None:
    frames = [tcp_frame(A, B, 40000, 9080, 7, b"", flags=0x02), tcp_frame(A, B, 40000, 9080, 8, b"hello")]
    segments = parse_pcap(pcap_file(frames, endian, magic))
    assert [(s.syn, s.payload) for s in segments] == [(True, b""), (False, b"hello")]
    assert (segments[1].src, segments[1].dport) == (A, 9080)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "shorter than"), (b"\x0a\x0d\x0d\x0a" + b"\0" * 24, "pcapng is not read"), (b"x" * 24, "not a pcap")],
)
def test_parse_refuses(data: bytes, message: str) -> None:
    with pytest.raises(PcapError, match=message):
        parse_pcap(data)


@pytest.mark.parametrize(
    ("isn", "pieces", "expected"),
    [
        (100, [(0, b"abc"), (3, b"def")], b"abcdef"),  # in order
        (100, [(3, b"def"), (0, b"abc")], b"abcdef"),  # out of order
        (100, [(0, b"abc"), (0, b"abc"), (3, b"def")], b"abcdef"),  # a retransmission
        (100, [(0, b"abcd"), (2, b"cdef")], b"abcdef"),  # an overlap
        (100, [(0, b"abc"), (9, b"xyz")], b"abc"),  # a gap: only what is contiguous
        (2**32 - 3, [(0, b"ab"), (2, b"cd")], b"abcd"),  # the sequence number wraps
    ],
)
def test_reassemble(isn: int, pieces: list[tuple[int, bytes]], expected: bytes) -> None:
    frames = [tcp_frame(A, B, 40000, 9080, isn, b"", flags=0x02)]
    frames += [tcp_frame(A, B, 40000, 9080, (isn + 1 + offset) % 2**32, data) for offset, data in pieces]
    assert reassemble(parse_pcap(pcap_file(frames))) == {FLOW: expected}


def record(content_type: int, body: bytes, version: int = 0x0303) -> bytes:
    return struct.pack("!BHH", content_type, version, len(body)) + body


@pytest.mark.parametrize(
    ("stream", "records", "complete", "trailing"),
    [
        (record(22, b"hi") + record(23, b"x" * 40), [(22, 2), (23, 40)], True, 0),
        (record(23, b"x" * 10)[:8], [], True, 8),  # cut by the end of the capture
        (b"GET / HTTP/1.1\r\n", [], False, 16),
        (record(23, b"ok") + b"plaintext!", [(23, 2)], False, 10),
        (record(23, b"x", version=0x0200), [], False, 6),
    ],
)
def test_tls_records(stream: bytes, records: list[tuple[int, int]], complete: bool, trailing: int) -> None:
    scan = tls_records(stream)
    assert [(r.content_type, r.length) for r in scan.records] == records
    assert (scan.complete, scan.trailing) == (complete, trailing)
    assert all(isinstance(r, TlsRecord) for r in scan.records)
