"""A hostile TLS 1.3 peer: a real handshake (OpenSSL, through the package's handshake seam, with a real SVID), then
records made and read by this module's own code, so that it can send what no correct peer sends.

The record protection here is written from RFC 8446 (§5.2, §7.1, §7.2, §7.3) on `cryptography`'s HKDF and AEADs,
independently of `mtlsmesh.records`: only the two application traffic secrets and sequence numbers are taken from
the handshake. A sidecar in the same trio loop (tests.integration.mesh) faces it, in front of an app that records
every byte it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from mtlsmesh import handshake, tls
from mtlsmesh.config import AuthzRule, Destination, InboundConfig, Mode, OutboundConfig, RecordLayer
from tests.integration.mesh import (
    ANY_PORT,
    LOOPBACK,
    LOOPBACK_NET,
    app_server,
    base_config,
    fixed_dst,
    running_sidecar,
)
from tests.pki import Pki, material_for

WAIT = 5.0  # one expected effect (an alert, an end)
SUITES = {  # name: (AEAD, key length, hash)
    "TLS_AES_256_GCM_SHA384": (AESGCM, 32, hashes.SHA384()),
    "TLS_AES_128_GCM_SHA256": (AESGCM, 16, hashes.SHA256()),
    "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32, hashes.SHA256()),
}


def expand_label(algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


@dataclasses.dataclass
class Keys:
    """One direction's protection: RFC 8446 §7.3 keys from a traffic secret, and the sequence number."""

    suite: str
    secret: bytes
    seq: int = 0

    def __post_init__(self) -> None:
        self._install()

    def _install(self) -> None:
        aead, key_size, algorithm = SUITES[self.suite]
        self.aead = aead(expand_label(algorithm, self.secret, b"key", key_size))
        self.iv = int.from_bytes(expand_label(algorithm, self.secret, b"iv", 12), "big")

    def update(self) -> None:
        _, _, algorithm = SUITES[self.suite]
        self.secret = expand_label(algorithm, self.secret, b"traffic upd", algorithm.digest_size)
        self.seq = 0
        self._install()

    def nonce(self) -> bytes:
        nonce = (self.iv ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return nonce


def header(length: int, content_type: int = 23) -> bytes:
    return bytes((content_type, 3, 3, length >> 8, length & 0xFF))


class Peer:
    """The hostile end of one connection after its real handshake."""

    def __init__(self, stream: trio.SocketStream, read: Keys, write: Keys, unread: bytes) -> None:
        self.stream, self.read, self.write = stream, read, write
        self.inbox = bytearray(unread)
        self.held = b""  # what the real handshake left to send first (a server's tickets)

    def seal(self, inner: bytes) -> bytes:
        """A record whose inner plaintext (content, content type, padding) is exactly `inner`."""
        head = header(len(inner) + 16)
        return head + self.write.aead.encrypt(self.write.nonce(), inner, head)

    def data(self, payload: bytes) -> bytes:
        return self.seal(payload + b"\x17")

    def key_update(self, requested: bool = False) -> bytes:
        record = self.seal(b"\x18\x00\x00\x01" + (b"\x01" if requested else b"\x00") + b"\x16")
        self.write.update()
        return record

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_to_end(self) -> tuple[list[tuple[int, bytes]], str]:
        """Every record the other end sends until it ends, opened: [(inner content type, content)], and how it
        ended: "eof" (a FIN), "reset" (an RST) or "timeout"."""
        how = "timeout"
        with trio.move_on_after(WAIT):
            try:
                while chunk := await self.stream.receive_some(65536):
                    self.inbox += chunk
                how = "eof"
            except trio.BrokenResourceError:
                how = "reset"
        opened: list[tuple[int, bytes]] = []
        data = bytes(self.inbox)
        while len(data) >= 5:
            length = int.from_bytes(data[3:5], "big")
            if len(data) < 5 + length:
                break
            record, data = data[: 5 + length], data[5 + length :]
            inner = self.read.aead.decrypt(self.read.nonce(), record[5:], record[:5]).rstrip(b"\x00")
            opened.append((inner[-1], inner[:-1]))
        return opened, how

    async def alert_then_end(self) -> tuple[int | None, str]:
        """The first alert's description the other end sent (None when it sent none), and how it ended."""
        opened, how = await self.read_to_end()
        alerts = [content for kind, content in opened if kind == 21]
        return (alerts[0][1] if alerts else None), how


async def open_peer(pki: Pki, port: int, name: str = "mallory") -> Peer:
    """Connect to `port` and complete a real mTLS handshake as client `name` (an SVID of `pki`'s CA)."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    ours = tls.TLSStream(
        stream, handshake.build_context(material_for(pki.authority, pki.id_of(name)), tls.Side.CLIENT), tls.Side.CLIENT
    )
    with trio.fail_after(WAIT):
        await ours.do_handshake()
    return peer_of(ours, stream)


def peer_of(ours: tls.TLSStream, stream: trio.SocketStream) -> Peer:
    """The hostile end's keys, taken from a stream whose handshake is done; `held` is what it must send first (a
    server's session tickets, already under its application key)."""
    session = ours._session
    assert session is not None
    suite = ours.negotiated[1]
    assert suite is not None
    read = Keys(suite, session._read.secret, session._read.seq)
    write = Keys(suite, session._write.secret, session._write.seq)
    peer = Peer(stream, read, write, ours._cin)
    peer.held = ours._held
    return peer


@asynccontextmanager
async def hostile_server_behind_a_sidecar(pki: Pki) -> AsyncIterator[tuple[int, trio.MemoryReceiveChannel[Peer]]]:
    """A sidecar's outbound listener whose one mesh destination is a hostile server (SVID "reviews"): yields the
    listener's port and a channel that gets a `Peer` for each connection the sidecar opened to it, once its
    handshake is done. Our sidecar is then the TLS client, the side a NewSessionTicket may be sent to."""
    send, receive = trio.open_memory_channel[Peer](8)
    listener = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
    server_port = listener.socket.getsockname()[1]
    context = handshake.build_context(material_for(pki.authority, pki.id_of("reviews")), tls.Side.SERVER)

    async def serve() -> None:
        while True:
            stream = await listener.accept()
            ours = tls.TLSStream(stream, context, tls.Side.SERVER)
            with trio.fail_after(WAIT):
                await ours.do_handshake()
            await send.send(peer_of(ours, stream))

    cfg = base_config(
        pki.issue("productpage"),
        outbound=OutboundConfig(
            enabled=True,
            listen=ANY_PORT,
            destinations=(Destination((LOOPBACK_NET,), frozenset({server_port}), ()),),
        ),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with running_sidecar(cfg, orig_dst=fixed_dst(LOOPBACK, server_port)) as (_, state):
            yield state.bound["outbound"][1], receive
        nursery.cancel_scope.cancel()
    await listener.aclose()


@dataclasses.dataclass
class Target:
    """A sidecar's inbound listener in front of an echo app that records what it was given."""

    port: int
    received: list[bytes]


@asynccontextmanager
async def sidecar_in_front_of_an_app(
    pki: Pki,
    mode: Mode = Mode.STRICT,
    authorization: tuple[AuthzRule, ...] = (),
    record_layer: RecordLayer = RecordLayer.OWN,
) -> AsyncIterator[Target]:
    received: list[bytes] = []

    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            received.append(data)
            await stream.send_all(data)
        await stream.send_eof()

    async with app_server(echo) as (app_port, _):
        cfg = base_config(
            pki.issue("reviews"),
            inbound=InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=1.0, mode=mode),
            authorization=authorization,
            record_layer=record_layer,
        )
        async with running_sidecar(cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (_, state):
            yield Target(state.bound["inbound"][1], received)


async def round_trip(pki: Pki, port: int, payload: bytes = b"x") -> bytes:
    """One well-behaved mesh client's exchange through the sidecar: what came back."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    client = tls.TLSStream(
        stream,
        handshake.build_context(material_for(pki.authority, pki.id_of("good")), tls.Side.CLIENT),
        tls.Side.CLIENT,
    )
    try:
        await client.send_all(payload)
        got = b""
        while len(got) < len(payload):
            chunk = await client.receive_some()
            assert chunk, "the sidecar ended a good connection"
            got += chunk
        return got
    finally:
        await client.aclose()
