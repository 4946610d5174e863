"""Shared pieces for the sidecar integration tests: apps, in-process sidecars, and ways to talk to them.

Everything runs on loopback in the test's own trio loop. The sidecars are the real `serve_sidecar` with real
listeners, real TLS and real sockets; only the original-destination lookup is injected (there is no iptables
here), which is exactly the parameter the design leaves open for this (docs/ARCHITECTURE.md §9).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import trio

from mtlsmesh import admin
from mtlsmesh.addresses import IPAddress
from mtlsmesh.config import (
    Config,
    CredentialFiles,
    Destination,
    InboundConfig,
    ListenAddr,
    OutboundConfig,
    Timeouts,
)
from mtlsmesh.credentials import CredentialStore
from mtlsmesh.identity import SpiffeId
from mtlsmesh.runtime import Runtime
from mtlsmesh.sidecar import serve_sidecar
from tests.pki import TD, Pki

LOOPBACK = "127.0.0.1"
ANY_PORT = ListenAddr(LOOPBACK, 0)
LOOPBACK_NET = ipaddress.ip_network("127.0.0.1/32")


def base_config(files: CredentialFiles, **changes: object) -> Config:
    """A config with every listener on an ephemeral loopback port and short timeouts."""
    cfg = Config(
        trust_domain=TD,
        credentials=files,
        outbound=OutboundConfig(enabled=False, listen=ANY_PORT),
        inbound=InboundConfig(enabled=False, listen=ANY_PORT, sniff_timeout=0.5),
        timeouts=Timeouts(handshake=2.0, connect=1.0, idle=None, drain=1.0),
        admin_listen=ANY_PORT,
        health_listen=ANY_PORT,
        metrics_listen=ANY_PORT,
    )
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


ADMIN_TOKEN = "mesh-admin-token"  # what running_sidecar's admin port wants in `Authorization: Bearer`


@asynccontextmanager
async def running_sidecar(
    cfg: Config,
    *,
    orig_dst: Callable[[trio.SocketStream], tuple[IPAddress, int]] | None = None,
) -> AsyncIterator[tuple[Runtime, admin.State]]:
    """Start a sidecar in this trio loop; yield once every listener is bound; drain and stop at exit. Its admin
    port's POSTs take ADMIN_TOKEN."""
    assert cfg.credentials is not None
    store = CredentialStore.load(cfg.credentials, cfg.trust_domain)
    stop = trio.Event()
    kwargs = {} if orig_dst is None else {"orig_dst": orig_dst}
    serve = functools.partial(serve_sidecar, cfg, store, stop=stop, admin_token=ADMIN_TOKEN, **kwargs)
    async with trio.open_nursery() as nursery:
        rt, state = await nursery.start(serve)
        try:
            yield rt, state
        finally:
            stop.set()


def fixed_dst(ip: str, port: int) -> Callable[[trio.SocketStream], tuple[IPAddress, int]]:
    address = ipaddress.ip_address(ip)
    return lambda stream: (address, port)


AppHandler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def app_server(handler: AppHandler, host: str = LOOPBACK) -> AsyncIterator[tuple[int, list[str]]]:
    """A plain TCP app; yields its port and the list of client addresses it saw (to check 127.0.0.6)."""
    seen: list[str] = []

    async def wrapped(stream: trio.SocketStream) -> None:
        seen.append(stream.socket.getpeername()[0])
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, wrapped, 0, host=host))
        yield listeners[0].socket.getsockname()[1], seen
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back: the reply ends where the request did."""
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


async def connect(port: int, host: str = LOOPBACK) -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port)


async def exchange(port: int, payload: bytes) -> bytes:
    """Connect to `port`, send `payload` and half-close while reading the reply to its end (reading at the same time,
    so a reply larger than the socket buffers cannot stall the send)."""
    client = await connect(port)
    try:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await client.send_all(payload)
                await client.send_eof()

            nursery.start_soon(send)
            return await read_all(client)
    finally:
        await client.aclose()


async def read_all(stream: trio.abc.ReceiveStream, limit: int = 1 << 24) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
        assert len(out) <= limit
    return bytes(out)


@dataclasses.dataclass(frozen=True, slots=True)
class Mesh:
    port: int  # the client sidecar's outbound listener: where the client app connects
    inbound_port: int  # the server sidecar's inbound listener
    client_rt: Runtime
    server_rt: Runtime
    server_state: admin.State
    client_state: admin.State


@asynccontextmanager
async def mesh_pair(
    pki: Pki,
    app_port: int,
    *,
    client: str = "productpage",
    server: str = "reviews",
    server_changes: dict[str, object] | None = None,
    client_changes: dict[str, object] | None = None,
    identities: tuple[SpiffeId, ...] = (),
) -> AsyncIterator[Mesh]:
    """Client sidecar (outbound listener) → server sidecar (inbound listener) → app on `app_port`.

    The client's original destination is the server sidecar's inbound listener (as if iptables had sent the app's
    connection to the pod IP:app_port, which the peer's capture redirects to its 15006); the server's original
    destination is the app."""
    server_cfg = base_config(pki.issue(server), inbound=InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5))
    server_cfg = dataclasses.replace(server_cfg, **(server_changes or {}))  # type: ignore[arg-type]
    async with running_sidecar(server_cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (server_rt, server_state):
        inbound_port = server_state.bound["inbound"][1]
        client_cfg = base_config(
            pki.issue(client),
            outbound=OutboundConfig(
                enabled=True,
                listen=ANY_PORT,
                destinations=(Destination((LOOPBACK_NET,), frozenset({inbound_port}), identities),),
            ),
        )
        client_cfg = dataclasses.replace(client_cfg, **(client_changes or {}))  # type: ignore[arg-type]
        async with running_sidecar(client_cfg, orig_dst=fixed_dst(LOOPBACK, inbound_port)) as (client_rt, state):
            yield Mesh(state.bound["outbound"][1], inbound_port, client_rt, server_rt, server_state, state)


def client_hello(alpn: bytes | None = b"mtlsmesh") -> bytes:
    """A real ClientHello from OpenSSL (TLS 1.3, our ALPN by default), as the first flight a peer sends."""
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn is not None:
        ctx.set_alpn_protos([alpn])
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


async def outcome(stream: trio.abc.ReceiveStream, limit: int = 1 << 20) -> tuple[str, bytes]:
    """Read to the end: ("eof", data) for a clean end, ("reset", data) for an RST or broken stream."""
    out = bytearray()
    try:
        while data := await stream.receive_some(65536):
            out += data
            assert len(out) <= limit
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return "reset", bytes(out)
    return "eof", bytes(out)


def conn_lines(records: list[logging.LogRecord], direction: str | None = None) -> list[str]:
    lines = [r.getMessage() for r in records if r.name == "mtlsmesh.conn"]
    return [line for line in lines if direction is None or f"dir={direction} " in line]
