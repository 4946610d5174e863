"""The ClientHello sniffer against real ClientHellos from OpenSSL, hand-built broken ones, and mangled bytes."""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Sequence

import pytest
from OpenSSL import SSL

from mtlsmesh.conventions import MESH_ALPN
from mtlsmesh.sniff import MAX_CLIENT_HELLO, MAX_RECORDS, Sniff, Sniffer, SniffState, is_mesh, parse_client_hello

TLS12 = 0x0303
TLS13 = 0x0304


def openssl_client_hello(
    alpn: Sequence[bytes] = (MESH_ALPN.encode(),), sni: bytes | None = b"reviews.default.svc", tls12_only: bool = False
) -> bytes:
    """The first flight of a real OpenSSL client, taken from its memory BIO before any server answers."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    if tls12_only:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    conn = SSL.Connection(ctx, None)
    if sni is not None:
        conn.set_tlsext_host_name(sni)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


@pytest.fixture(scope="module")
def mesh_hello() -> bytes:
    return openssl_client_hello()


def handshake_message(data: bytes) -> bytes:
    """The handshake message inside a single-record ClientHello (OpenSSL sends one record)."""
    assert data[0] == 22
    length = int.from_bytes(data[3:5], "big")
    assert len(data) == 5 + length
    return data[5:]


def records(message: bytes, sizes: Sequence[int], version: bytes = b"\x03\x01") -> bytes:
    """Split a handshake message over records of the given sizes (the last size repeats)."""
    out = bytearray()
    pos = 0
    i = 0
    while pos < len(message):
        size = sizes[min(i, len(sizes) - 1)]
        chunk = message[pos : pos + size]
        out += bytes([22]) + version + struct.pack(">H", len(chunk)) + chunk
        pos += size
        i += 1
    return bytes(out)


def vec(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">H", ext_type) + vec(2, data)


def hello_body(
    *,
    version: int = TLS12,
    session_id: bytes = b"\x00" * 32,
    suites: bytes = b"\x13\x01",
    compression: bytes = b"\x00",
    extensions: bytes | None = b"",
) -> bytes:
    body = struct.pack(">H", version) + b"\x11" * 32 + vec(1, session_id) + vec(2, suites) + vec(1, compression)
    if extensions is not None:
        body += vec(2, extensions)
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + vec(3, body)


def wire(body: bytes) -> bytes:
    return records(handshake(body), [16384])


def hello(alpn: tuple[str, ...] = (), sni: str | None = None, versions: tuple[int, ...] = (TLS12,)) -> Sniff:
    return Sniff(SniffState.CLIENT_HELLO, alpn, sni, versions)


ALPN_MESH = ext(16, vec(2, vec(1, b"h2") + vec(1, b"mtlsmesh")))
SNI_DB = ext(0, vec(2, b"\x00" + vec(2, b"db.example")))
VERSIONS_13 = ext(43, vec(1, b"\x7a\x7a\x03\x04\x03\x03"))  # with a GREASE value first, as browsers send


# --- real ClientHellos -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpn", "sni", "tls12_only", "expected"),
    [
        ([b"mtlsmesh"], b"reviews.default.svc", False, hello(("mtlsmesh",), "reviews.default.svc", (TLS13, TLS12))),
        ([b"h2", b"http/1.1"], b"example.org", False, hello(("h2", "http/1.1"), "example.org", (TLS13, TLS12))),
        ([], None, False, hello((), None, (TLS13, TLS12))),
        ([b"mtlsmesh"], None, True, hello(("mtlsmesh",), None, (TLS12,))),
    ],
)
def test_real_client_hello(alpn: list[bytes], sni: bytes | None, tls12_only: bool, expected: Sniff) -> None:
    data = openssl_client_hello(alpn, sni, tls12_only)
    assert parse_client_hello(data) == expected
    assert is_mesh(parse_client_hello(data)) == (b"mtlsmesh" in alpn)


def test_post_quantum_client_hello_parses(mesh_hello: bytes) -> None:
    # OpenSSL 3.5+ offers an X25519MLKEM768 key share by default (1.2 KB of it): the size the sniffer must wait for.
    if len(mesh_hello) < 1200:
        pytest.skip(f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} sends no post-quantum key share")
    assert len(mesh_hello) < MAX_CLIENT_HELLO
    assert parse_client_hello(mesh_hello) == hello(("mtlsmesh",), "reviews.default.svc", (TLS13, TLS12))


@pytest.mark.parametrize("sizes", [[30], [100], [512], [4, 1000], [1000, 200], [16384]])
def test_client_hello_split_across_records(mesh_hello: bytes, sizes: list[int]) -> None:
    data = records(handshake_message(mesh_hello), sizes)
    assert parse_client_hello(data) == parse_client_hello(mesh_hello)
    assert is_mesh(parse_client_hello(data))


def test_every_strict_prefix_needs_more(mesh_hello: bytes) -> None:
    for cut in range(len(mesh_hello)):
        assert parse_client_hello(mesh_hello[:cut]).state is SniffState.NEED_MORE, cut


def test_every_prefix_of_a_fragmented_hello_needs_more(mesh_hello: bytes) -> None:
    data = records(handshake_message(mesh_hello), [7, 300, 41])
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]).state is SniffState.NEED_MORE, cut
    assert is_mesh(parse_client_hello(data))


@pytest.mark.parametrize("trailer", [b"\x17\x03\x03\x00\x05hello", b"\x16\x03\x03", b"GET / HTTP/1.1\r\n"])
def test_bytes_after_the_client_hello_are_ignored(mesh_hello: bytes, trailer: bytes) -> None:
    assert parse_client_hello(mesh_hello + trailer) == parse_client_hello(mesh_hello)


def test_accepts_bytearray_and_memoryview(mesh_hello: bytes) -> None:
    expected = parse_client_hello(mesh_hello)
    assert parse_client_hello(bytearray(mesh_hello)) == expected
    assert parse_client_hello(memoryview(mesh_hello)) == expected


# --- hand-built ClientHellos ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (wire(hello_body(extensions=None)), hello()),
        (wire(hello_body(session_id=b"")), hello()),
        (wire(hello_body(version=0x0301, extensions=SNI_DB)), hello(sni="db.example", versions=(0x0301,))),
        (wire(hello_body(extensions=ALPN_MESH + VERSIONS_13)), hello(("h2", "mtlsmesh"), None, (TLS13, TLS12))),
        (
            wire(hello_body(extensions=ext(0, vec(2, b"\x07" + vec(2, b"other") + b"\x00" + vec(2, b"a.b"))))),
            hello(sni="a.b"),
        ),
        (wire(hello_body(extensions=ext(16, vec(2, vec(1, b"\xff\x01"))))), hello(alpn=("\xff\x01",))),
        (records(handshake(hello_body()), [16384], version=b"\x03\x03"), hello()),
    ],
)
def test_hand_built_client_hello(data: bytes, expected: Sniff) -> None:
    assert parse_client_hello(data) == expected


NOT_TLS_CASES = [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", r"first byte 0x47 is not a TLS handshake record"),
    (b"G", r"first byte 0x47"),
    (b"\x00", r"first byte 0x00"),
    (b"\x15\x03\x03\x00\x02\x02\x28", r"first byte 0x15"),  # an alert
    (b"\x16\x02", r"record version major byte 0x02 is not 3"),
    (b"\x16\x03\x05", r"record version 0x0305 is unknown"),
    (b"\x16\x03\x01\x00\x00", r"empty handshake record"),
    (b"\x16\x03\x01\x40\x01", r"record length 16385 exceeds 2\^14"),
    (b"\x16\x03\x01\x00\x10\x02", r"handshake type 2 is not ClientHello"),
    (b"\x16\x03\x01\x00\x10\x01\x00\x00\x10", r"ClientHello length 16 is too short"),
    (b"\x16\x03\x01\x00\x10\x01\x01\x00\x00", r"ClientHello length 65536 exceeds 32768 bytes"),
    (records(handshake(hello_body()), [10])[:15] + b"\x15", r"record type 21 inside the ClientHello"),
    (wire(hello_body(version=0x0200)), r"ClientHello version 0x0200 is not TLS"),
    (wire(hello_body(version=0x0305)), r"ClientHello version 0x0305 is not TLS"),
    (wire(hello_body(session_id=b"\x00" * 33)), r"legacy_session_id length 33 is out of range"),
    (wire(hello_body(suites=b"")), r"cipher_suites length 0 is out of range"),
    (wire(hello_body(suites=b"\x13\x01\x13")), r"cipher_suites length is odd"),
    (wire(hello_body(compression=b"")), r"legacy_compression_methods length 0 is out of range"),
    (wire(hello_body(extensions=b"\x00\x00\x00\x05")), r"extension 0 overruns its enclosing length"),
    (wire(hello_body(extensions=b"\x00")), r"extension type overruns"),
    (wire(hello_body() + b"\x00"), r"extensions length disagrees with the ClientHello length"),
    (wire(hello_body(extensions=ALPN_MESH + ALPN_MESH)), r"extension 16 appears twice"),
    (wire(hello_body(extensions=ext(16, vec(2, b"")))), r"ALPN list length 0 is out of range"),
    (wire(hello_body(extensions=ext(16, vec(2, vec(1, b"x")) + b"\x00"))), r"trailing bytes after the ALPN list"),
    (wire(hello_body(extensions=ext(16, vec(2, b"\x00\x00")))), r"ALPN protocol length 0 is out of range"),
    (wire(hello_body(extensions=ext(16, vec(2, b"\x05ab")))), r"ALPN protocol overruns its enclosing length"),
    (
        wire(hello_body(extensions=ext(0, vec(2, b"\x00" + vec(2, "ü".encode()))))),
        r"server_name host_name is not ASCII",
    ),
    (
        wire(hello_body(extensions=ext(0, vec(2, b"\x00" + vec(2, b"a") + b"\x00" + vec(2, b"b"))))),
        r"two host_name entries",
    ),
    (wire(hello_body(extensions=ext(0, vec(2, b"")))), r"server_name list length 0 is out of range"),
    (wire(hello_body(extensions=ext(0, vec(2, b"\x00" + vec(2, b""))))), r"server_name length 0 is out of range"),
    (wire(hello_body(extensions=ext(43, vec(1, b"\x03\x04\x03")))), r"supported_versions length is odd"),
    (wire(hello_body(extensions=ext(43, vec(1, b"")))), r"supported_versions length 0 is out of range"),
    (wire(hello_body(extensions=ext(43, vec(1, b"\x03\x04") + b"\x00"))), r"trailing bytes after supported_versions"),
    (wire(hello_body(extensions=ext(43, b"\x05\x03\x04"))), r"supported_versions overruns its enclosing length"),
]


@pytest.mark.parametrize(("data", "reason"), NOT_TLS_CASES, ids=[reason for _, reason in NOT_TLS_CASES])
def test_not_tls(data: bytes, reason: str) -> None:
    result = parse_client_hello(data)
    assert result.state is SniffState.NOT_TLS
    assert not is_mesh(result)
    assert re.search(reason, result.reason), result.reason


@pytest.mark.parametrize(
    ("extension", "reason"),
    [
        (ext(16, b"\x00\x05" + vec(1, b"mtlsmesh")), "trailing bytes after the ALPN list"),
        (ext(16, b"\x00\x09\x00" + b"mtlsmesh"), "ALPN protocol length 0 is out of range"),
        (ext(0, b"\x00\x40" + b"\x00" + vec(2, b"example.org")), "server_name list overruns its enclosing length"),
        (ext(43, b"\x03\x03\x04\x03"), "supported_versions length is odd"),
    ],
)
def test_a_broken_extension_is_refused_before_it_is_complete(extension: bytes, reason: str) -> None:
    data = wire(hello_body(extensions=ext(23, b"") + extension + ext(21, b"\x00" * 50)))
    start = data.index(extension)
    # the first byte that makes the extension impossible is at most 4 bytes into its body
    results = [parse_client_hello(data[:cut]) for cut in range(start, start + len(extension))]
    assert results[0].state is SniffState.NEED_MORE
    refused = next(i for i, result in enumerate(results) if result.state is SniffState.NOT_TLS)
    assert refused <= 4 + 4
    assert all(result.state is SniffState.NOT_TLS for result in results[refused:])
    assert re.search(reason, results[refused].reason), results[refused].reason


@pytest.mark.parametrize("sizes", [[1], [2, 3], [20]])
def test_a_hello_in_more_than_64_records_is_not_tls(mesh_hello: bytes, sizes: list[int]) -> None:
    # Tiny records only cost the sniffer work: the 65th record header ends the wait, whatever the bytes.
    data = records(handshake_message(mesh_hello), sizes)
    sniffer = Sniffer()
    answers = [sniffer.feed(data[i : i + 1]) for i in range(len(data))]
    refused = next(i for i, a in enumerate(answers) if a.state is not SniffState.NEED_MORE)
    assert answers[refused] == Sniff(SniffState.NOT_TLS, reason=f"ClientHello in more than {MAX_RECORDS} records")
    assert data[: refused + 1].count(b"\x16\x03\x01") >= MAX_RECORDS + 1 > data[:refused].count(b"\x16\x03\x01") - 1
    assert parse_client_hello(data) == answers[refused]


def test_a_hello_longer_than_the_limit_is_not_tls() -> None:
    # The largest declared length allowed, in full records: its third record header does not fit in the limit.
    largest = MAX_CLIENT_HELLO - 5 - 4
    padded = hello_body(extensions=ext(21, b"\x00" * (largest - len(hello_body(extensions=ext(21, b""))))))
    assert len(padded) == largest
    data = records(handshake(padded), [16384])
    assert len(data) > MAX_CLIENT_HELLO
    assert parse_client_hello(data[: MAX_CLIENT_HELLO - 1]).state is SniffState.NEED_MORE
    result = parse_client_hello(data[:MAX_CLIENT_HELLO])
    assert result == Sniff(SniffState.NOT_TLS, reason=f"no complete ClientHello in {MAX_CLIENT_HELLO} bytes")


@pytest.mark.parametrize(
    ("sniff", "mesh"),
    [
        (hello(alpn=("mtlsmesh",)), True),
        (hello(alpn=("h2", "mtlsmesh")), True),
        (hello(alpn=("h2",)), False),
        (hello(alpn=("mtlsmesh2",)), False),
        (hello(), False),
        (Sniff(SniffState.NEED_MORE), False),
        (Sniff(SniffState.NOT_TLS, alpn=("mtlsmesh",)), False),
    ],
)
def test_is_mesh(sniff: Sniff, mesh: bool) -> None:
    assert is_mesh(sniff) is mesh


# --- never raises, and never changes its mind ---------------------------------------------------------------------


def check_answer(data: bytes) -> Sniff:
    result = parse_client_hello(data)
    assert isinstance(result, Sniff)
    assert not result.reason.startswith("unparseable"), (result.reason, data.hex())
    if result.state is not SniffState.CLIENT_HELLO:
        assert (result.alpn, result.sni, result.versions) == ((), None, ())
    if result.state is not SniffState.NOT_TLS:
        assert result.reason == ""
    if len(data) >= MAX_CLIENT_HELLO:
        assert result.state is not SniffState.NEED_MORE
    return result


def check_consistent_with_prefix(data: bytes, cut: int) -> None:
    """Once NOT_TLS or CLIENT_HELLO, more bytes never change the answer; NEED_MORE means every prefix agreed."""
    whole, prefix = check_answer(data), check_answer(data[:cut])
    if prefix.state is not SniffState.NEED_MORE:
        assert whole.state is prefix.state, (cut, data.hex())
        if prefix.state is SniffState.CLIENT_HELLO:
            assert whole == prefix
    if whole.state is SniffState.NEED_MORE:
        assert prefix.state is SniffState.NEED_MORE


def mutations(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            out.append(bytes(flipped))
    return out


def test_every_bit_flip_of_a_real_client_hello(mesh_hello: bytes) -> None:
    rng = random.Random(1)
    states = set()
    for variant in mutations(mesh_hello):
        check_consistent_with_prefix(variant, rng.randrange(len(variant) + 1))
        states.add(parse_client_hello(variant).state)
    # Both decided answers were reached, so the checks above had teeth. (NEED_MORE is not: a flip that lengthens a
    # record or the message is caught by the inner lengths, which then disagree.)
    assert states == {SniffState.CLIENT_HELLO, SniffState.NOT_TLS}


def test_every_bit_flip_of_a_fragmented_client_hello(mesh_hello: bytes) -> None:
    data = records(handshake_message(mesh_hello)[:600], [200])  # the header, random, suites and first extensions
    rng = random.Random(2)
    for variant in mutations(data):
        check_consistent_with_prefix(variant, rng.randrange(len(variant) + 1))


def test_random_bytes() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        prefix = rng.choice([b"", b"\x16", b"\x16\x03\x01", b"\x16\x03\x01\x06\x00\x01\x00\x05\xfc\x03\x03"])
        data = prefix + rng.randbytes(rng.randrange(0, 2000))
        check_consistent_with_prefix(data, rng.randrange(len(data) + 1))


def test_random_splices_of_real_client_hellos(mesh_hello: bytes) -> None:
    other = openssl_client_hello([b"h2"], b"example.org", tls12_only=True)
    rng = random.Random(4)
    for _ in range(2000):
        a, b = sorted(rng.randrange(len(mesh_hello)) for _ in range(2))
        data = mesh_hello[:a] + other[rng.randrange(len(other)) :][: b - a] + mesh_hello[b:]
        check_consistent_with_prefix(data, rng.randrange(len(data) + 1))


def test_max_sized_inputs_are_decided() -> None:
    rng = random.Random(5)
    for length_bytes in (b"\x40\x00", b"\x00\x01", b"\x00\x05"):
        # valid-looking records that never complete a message declared near the limit
        data = bytearray(b"\x16\x03\x01" + length_bytes + b"\x01\x00\x7f\x00")
        while len(data) < MAX_CLIENT_HELLO:
            data += rng.randbytes(1)
        check_answer(bytes(data))
