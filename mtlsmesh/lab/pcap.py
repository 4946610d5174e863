"""Reading a packet capture to prove what crossed the wire: TCP streams and the TLS records in them.

`parse_pcap(data)` reads a classic pcap file (either byte order, micro- or nanosecond stamps; Ethernet or Linux
cooked link types) into TCP segments of IPv4 and IPv6 packets. `reassemble(segments)` rebuilds each direction of
each connection in sequence order (retransmissions and overlaps collapse). `tls_records(stream)` walks the TLS
record layer (RFC 8446 section 5.1: type, legacy version, 16-bit length) and reports whether the whole stream is
records and nothing else. Everything here is pure: bytes in, frozen values out.

What this module does not do: capture (the lab runs tcpdump), decrypt, or follow anything but TCP.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mtlsmesh.errors import MeshError

# pcap-savefile(5): magic numbers for micro- and nanosecond files, in the writer's byte order.
_MAGIC_US = 0xA1B2C3D4
_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_RAW = 101
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = 0x8100
_PROTO_TCP = 6

# RFC 8446 section 5.1 / B.1 content types.
TLS_CHANGE_CIPHER_SPEC = 20
TLS_ALERT = 21
TLS_HANDSHAKE = 22
TLS_APPLICATION_DATA = 23
TLS_CONTENT_TYPES = frozenset({TLS_CHANGE_CIPHER_SPEC, TLS_ALERT, TLS_HANDSHAKE, TLS_APPLICATION_DATA})
TLS_MAX_RECORD = 2**14 + 256  # TLSCiphertext.length limit


class PcapError(MeshError):
    """The file is not a pcap capture this reader understands."""


@dataclass(frozen=True, slots=True)
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    syn: bool
    fin: bool
    rst: bool
    payload: bytes


@dataclass(frozen=True, slots=True)
class Flow:
    """One direction of one TCP connection."""

    src: str
    sport: int
    dst: str
    dport: int

    def __str__(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


@dataclass(frozen=True, slots=True)
class TlsRecord:
    content_type: int
    version: int
    length: int


@dataclass(frozen=True, slots=True)
class TlsScan:
    records: tuple[TlsRecord, ...]
    complete: bool  # the stream is records back to back; False when anything else appeared
    trailing: int  # bytes after the last whole record (a record cut by the end of the capture)


def parse_pcap(data: bytes) -> list[Segment]:
    """Every TCP segment in a pcap file, in capture order."""
    if len(data) < 24:
        raise PcapError("shorter than a pcap file header")
    for endian in ("<", ">"):
        (magic,) = struct.unpack(endian + "I", data[:4])
        if magic in (_MAGIC_US, _MAGIC_NS):
            break
    else:
        raise PcapError(f"not a pcap file (magic {data[:4].hex()}; pcapng is not read here, use tcpdump -w)")
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW):
        raise PcapError(f"link type {linktype} is not Ethernet, Linux cooked or raw IP")
    segments: list[Segment] = []
    offset = 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        segment = _parse_frame(frame, linktype)
        if segment is not None:
            segments.append(segment)
    return segments


def _parse_frame(frame: bytes, linktype: int) -> Segment | None:
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        ethertype = struct.unpack("!H", frame[12:14])[0]
        start = 14
        if ethertype == _ETHERTYPE_VLAN and len(frame) >= 18:
            ethertype = struct.unpack("!H", frame[16:18])[0]
            start = 18
    elif linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        ethertype = struct.unpack("!H", frame[14:16])[0]
        start = 16
    else:
        if not frame:
            return None
        ethertype = _ETHERTYPE_IPV4 if frame[0] >> 4 == 4 else _ETHERTYPE_IPV6
        start = 0
    return _parse_ip(frame[start:], ethertype)


def _parse_ip(packet: bytes, ethertype: int) -> Segment | None:
    if ethertype == _ETHERTYPE_IPV4:
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != _PROTO_TCP:
            return None
        header_len = (packet[0] & 0x0F) * 4
        total_len = struct.unpack("!H", packet[2:4])[0]
        src = str(ipaddress.IPv4Address(packet[12:16]))
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        return _parse_tcp(packet[header_len:total_len], src, dst)
    if ethertype == _ETHERTYPE_IPV6:
        # Extension headers are not followed: the lab's TCP over IPv6 carries none.
        if len(packet) < 40 or packet[6] != _PROTO_TCP:
            return None
        payload_len = struct.unpack("!H", packet[4:6])[0]
        src = str(ipaddress.IPv6Address(packet[8:24]))
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        return _parse_tcp(packet[40 : 40 + payload_len], src, dst)
    return None


def _parse_tcp(tcp: bytes, src: str, dst: str) -> Segment | None:
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    header_len = (tcp[12] >> 4) * 4
    flags = tcp[13]
    return Segment(
        src=src,
        sport=sport,
        dst=dst,
        dport=dport,
        seq=seq,
        syn=bool(flags & 0x02),
        fin=bool(flags & 0x01),
        rst=bool(flags & 0x04),
        payload=tcp[header_len:],
    )


def reassemble(segments: Iterable[Segment]) -> dict[Flow, bytes]:
    """Each flow's payload in sequence order, from its SYN (or its first segment when the SYN was not captured).

    Sequence numbers wrap at 2**32; offsets are taken modulo that from the flow's start. A gap (a lost capture)
    is left out, so a stream with a gap is shorter than what was sent, never wrong in order.
    """
    starts: dict[Flow, int] = {}
    pieces: dict[Flow, list[tuple[int, bytes]]] = {}
    for segment in segments:
        flow = Flow(segment.src, segment.sport, segment.dst, segment.dport)
        if segment.syn:
            starts[flow] = (segment.seq + 1) % 2**32
        elif flow not in starts:
            starts[flow] = segment.seq
        if segment.payload:
            offset = (segment.seq - starts[flow]) % 2**32
            pieces.setdefault(flow, []).append((offset, segment.payload))
    streams: dict[Flow, bytes] = {}
    for flow, parts in pieces.items():
        out = bytearray()
        for offset, payload in sorted(parts, key=lambda part: part[0]):
            if offset > len(out):
                continue  # a gap: keep what is contiguous from the start
            out += payload[len(out) - offset :]
        streams[flow] = bytes(out)
    return streams


def tls_records(stream: bytes) -> TlsScan:
    """Walk `stream` as TLS records; stop at the first bytes that cannot be a record header."""
    records: list[TlsRecord] = []
    offset = 0
    while offset + 5 <= len(stream):
        content_type = stream[offset]
        version, length = struct.unpack("!HH", stream[offset + 1 : offset + 5])
        if content_type not in TLS_CONTENT_TYPES or version >> 8 != 3 or length > TLS_MAX_RECORD:
            return TlsScan(tuple(records), complete=False, trailing=len(stream) - offset)
        if offset + 5 + length > len(stream):
            break
        records.append(TlsRecord(content_type, version, length))
        offset += 5 + length
    return TlsScan(tuple(records), complete=True, trailing=len(stream) - offset)


def flows_with(streams: dict[Flow, bytes], needle: bytes) -> list[Flow]:
    """The flows whose reassembled payload contains `needle` (e.g. a plaintext marker)."""
    return [flow for flow, data in streams.items() if needle in data]


def flows_on_port(streams: dict[Flow, bytes], ports: Sequence[int]) -> dict[Flow, bytes]:
    """The flows to or from any of `ports`."""
    return {flow: data for flow, data in streams.items() if flow.sport in ports or flow.dport in ports}
