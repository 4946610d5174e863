"""`python -m bench.handshake`: CPU per mTLS connection inside one process, with no network and no load tool.

Three loops over the benchmark's certificates (ECDSA P-256, made fresh in a temporary directory, deleted at the
end), each printing the process's CPU time per connection, both ends together:

- `openssl`: a handshake between two pyOpenSSL connections over memory BIOs, on the contexts the sidecar builds:
  OpenSSL's share of a connection.
- `tlsstream`: `tls.open_mtls` on both ends of a socketpair, a request and a reply, close: what the sidecar's TLS
  layer adds on top (trio, the hand-over, the record layer, the SPIFFE check).
- `plain`: the same exchange over the socketpair without TLS: the floor under `tlsstream`.

`--auto-chain` turns OpenSSL's auto chain back on (the sidecar turns it off: see `mtlsmesh.handshake.build_context`),
to show what it costs; `--key-exchange classic` offers X25519 and P-256 only, as the sidecar's `key_exchange:
classic` does, beside the default hybrid post-quantum group. A benchmark, not a test: it asserts nothing beyond each
handshake having happened.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from OpenSSL import SSL

from bench.certs import BenchCerts, SvidFiles, issue_bench_certs
from mtlsmesh import handshake, tls
from mtlsmesh.config import CredentialFiles
from mtlsmesh.credentials import Credentials, load_credentials
from mtlsmesh.identity import parse_spiffe_id, parse_trust_domain

TRUST_DOMAIN = parse_trust_domain("cluster.local")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def _load(files: SvidFiles) -> Credentials:
    return load_credentials(CredentialFiles(str(files.cert), str(files.key), str(files.bundle)), TRUST_DOMAIN)


def openssl_handshake(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    """A handshake between two plain pyOpenSSL connections over memory BIOs, driven by hand: (client, server)."""
    client, server = SSL.Connection(client_ctx, None), SSL.Connection(server_ctx, None)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(3):  # ClientHello; the server's flight; the client's flight
        for one, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                one.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(one.bio_read(65536))
    if server.get_peer_finished() is None:
        raise RuntimeError("the handshake did not finish")
    return client, server


Opener = Callable[[trio.SocketStream], Awaitable[trio.abc.HalfCloseableStream]]


async def exchange(a: trio.SocketStream, b: trio.SocketStream, open_client: Opener, open_server: Opener) -> None:
    """A request, an EOF, a reply and close, each end in its own task right after opening its stream (a client
    that holds its Finished until its first send needs its first send to come from the same task)."""

    async def client_side() -> None:
        client = await open_client(a)
        await client.send_all(REQUEST)
        await client.send_eof()
        while await client.receive_some(16384):
            pass
        await client.aclose()

    async def server_side() -> None:
        server = await open_server(b)
        while await server.receive_some(16384):
            pass
        await server.send_all(REPLY)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_side)
        nursery.start_soon(server_side)


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(trio.socket.from_stdlib_socket(b))


def per_connection(count: int, one: Callable[[], object]) -> float:
    """Microseconds of this process's CPU per call of `one`, after a short warm-up."""
    for _ in range(min(20, count)):
        one()
    start = time.process_time()
    for _ in range(count):
        one()
    return (time.process_time() - start) / count * 1e6


async def per_connection_async(count: int, one: Callable[[], Awaitable[object]]) -> float:
    for _ in range(min(20, count)):
        await one()
    start = time.process_time()
    for _ in range(count):
        await one()
    return (time.process_time() - start) / count * 1e6


def run(certs: BenchCerts, count: int, auto_chain: bool, key_exchange: str = "hybrid") -> dict[str, float]:
    client, server = _load(certs.client), _load(certs.server)
    client_ctx = handshake.variant_context(
        client.client_context, client.material, tls.Side.CLIENT, key_exchange=key_exchange
    )
    server_ctx = handshake.variant_context(
        server.server_context, server.material, tls.Side.SERVER, key_exchange=key_exchange
    )
    if auto_chain:
        for ctx in (client_ctx, server_ctx):
            ctx.clear_mode(handshake.SSL_MODE_NO_AUTO_CHAIN)
    expected = (parse_spiffe_id(certs.server.spiffe_id),)

    async def open_client(stream: trio.SocketStream) -> trio.abc.HalfCloseableStream:
        return await tls.open_mtls(
            stream, client_ctx, tls.Side.CLIENT, TRUST_DOMAIN, expected=expected, send_last=False
        )

    async def open_server(stream: trio.SocketStream) -> trio.abc.HalfCloseableStream:
        return await tls.open_mtls(stream, server_ctx, tls.Side.SERVER, TRUST_DOMAIN)

    async def as_is(stream: trio.SocketStream) -> trio.abc.HalfCloseableStream:
        return stream

    async def mtls() -> None:
        await exchange(*socket_pair(), open_client, open_server)

    async def plain() -> None:
        await exchange(*socket_pair(), as_is, as_is)

    async def both() -> tuple[float, float]:
        return await per_connection_async(count, mtls), await per_connection_async(count, plain)

    results = {"openssl": per_connection(count, lambda: openssl_handshake(client_ctx, server_ctx))}
    results["tlsstream"], results["plain"] = trio.run(both)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handshake", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="connections per loop (default 500)")
    parser.add_argument("--auto-chain", action="store_true", help="turn OpenSSL's auto chain back on")
    parser.add_argument(
        "--key-exchange", choices=handshake.KEY_EXCHANGES, default="hybrid", help="the groups offered (default hybrid)"
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="mtlsmesh-handshake-"))
    try:
        results = run(issue_bench_certs(workdir), args.count, args.auto_chain, args.key_exchange)
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # holds the private keys
    chain = "auto chain on" if args.auto_chain else "no auto chain (as the sidecar)"
    print(f"CPU per connection, both ends, {args.count} connections, {chain}, key exchange {args.key_exchange}:")
    for name, value in results.items():
        print(f"  {name:10} {value:8.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
