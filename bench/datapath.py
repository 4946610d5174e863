"""`python -m bench.datapath`: CPU of the sidecars' data path inside one process, with no network and no load tool.

The path of one connection through both sidecars, on socketpairs in one trio loop:

    app -> [relay] -> TLSStream ==TLS 1.3== TLSStream -> [relay] -> backend

Three loops, each run `--repeat` times (min and median printed), the process's CPU time (`time.process_time`) per unit:

- `request`: kept-alive round trips of a 31-byte GET answered with 1 KiB (the bench's small-request step on one
  connection): CPU per request, both sidecars, the app and the backend together.
- `request-plain`: the same through two relays without TLS: the floor under `request` (the app, the backend, the
  relays and their wake-ups).
- `stream`: `--megabytes` MiB one way (the bench's one-stream step): CPU seconds per GB.

Everything runs on one core, so the figures count interpreter work, not how two processes overlap; they move little
with the load beside them (run it twice, or from two checkouts alternately, to compare code). A benchmark, not a
test: it asserts nothing beyond every byte having arrived.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import trio

from mtlsmesh import ca, handshake, relay, tls
from mtlsmesh.identity import TrustDomain, workload_id

TRUST_DOMAIN = TrustDomain("cluster.local")
CLIENT_ID = workload_id(TRUST_DOMAIN, "bench", "client")
SERVER_ID = workload_id(TRUST_DOMAIN, "bench", "server")
REQUEST = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n"
REPLY_SIZE = 1024
WRITE_SIZE = 128 * 1024  # what the stream loop's app writes per call


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(trio.socket.from_stdlib_socket(b))


async def _tls_pair() -> tuple[tls.TLSStream, tls.TLSStream]:
    now = datetime.now(UTC)
    authority = ca.create_ca(TRUST_DOMAIN, now=now)
    contexts = {}
    for side, spiffe_id in ((handshake.Side.CLIENT, CLIENT_ID), (handshake.Side.SERVER, SERVER_ID)):
        issued = ca.issue_svid(authority, spiffe_id, now=now)
        assert issued.key is not None
        material = handshake.Material((issued.cert, *issued.chain), issued.key, issued.roots)
        contexts[side] = handshake.build_context(material, side)
    near, far = _pair()
    streams: dict[handshake.Side, tls.TLSStream] = {}

    async def open_side(side: handshake.Side, transport: trio.SocketStream) -> None:
        expected = (SERVER_ID,) if side is handshake.Side.CLIENT else ()
        streams[side] = await tls.open_mtls(transport, contexts[side], side, TRUST_DOMAIN, expected=expected)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_side, handshake.Side.CLIENT, near)
        nursery.start_soon(open_side, handshake.Side.SERVER, far)
    return streams[handshake.Side.CLIENT], streams[handshake.Side.SERVER]


async def _middle(with_tls: bool) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    """The two ends the sidecars relay to each other: a TLS pair, or a plain socketpair."""
    if with_tls:
        return await _tls_pair()
    return _pair()


async def _requests(count: int, with_tls: bool) -> float:
    """CPU seconds for `count` round trips through both relays."""
    outbound, inbound = await _middle(with_tls)
    app, app_side = _pair()
    backend_side, backend = _pair()
    reply = bytes(REPLY_SIZE)

    async def serve() -> None:
        for _ in range(count):
            need = len(REQUEST)
            while need > 0:
                need -= len(await backend.receive_some(65536))
            await backend.send_all(reply)
        await backend.aclose()

    async def call() -> None:
        for _ in range(count):
            await app.send_all(REQUEST)
            need = REPLY_SIZE
            while need > 0:
                need -= len(await app.receive_some(65536))
        await app.aclose()

    return await _timed(app_side, outbound, inbound, backend_side, serve, call)


async def _timed(
    app_side: trio.abc.HalfCloseableStream,
    outbound: trio.abc.HalfCloseableStream,
    inbound: trio.abc.HalfCloseableStream,
    backend_side: trio.abc.HalfCloseableStream,
    *ends: Callable[[], Awaitable[None]],
) -> float:
    """CPU seconds until both relays (app -> outbound, inbound -> backend) and `ends` are done."""
    start = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.relay, app_side, outbound)
        nursery.start_soon(relay.relay, inbound, backend_side)
        for end in ends:
            nursery.start_soon(end)
    return time.process_time() - start


async def _stream(total: int) -> float:
    """CPU seconds for `total` bytes one way through both relays and TLS."""
    outbound, inbound = await _tls_pair()
    app, app_side = _pair()
    backend_side, backend = _pair()
    chunk = bytes(WRITE_SIZE)
    received = 0

    async def write() -> None:
        sent = 0
        while sent < total:
            await app.send_all(chunk)
            sent += len(chunk)
        await app.send_eof()

    async def read() -> None:
        nonlocal received
        while data := await backend.receive_some(256 * 1024):
            received += len(data)
        await backend.aclose()

    elapsed = await _timed(app_side, outbound, inbound, backend_side, write, read)
    await app.aclose()
    if received != total:
        raise SystemExit(f"stream: {received} bytes arrived of {total}")
    return elapsed


def _line(name: str, values: list[float], unit: str) -> str:
    return f"  {name:<14} min {min(values):8.2f} {unit}   median {statistics.median(values):8.2f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="round trips per request run (default 5000)")
    parser.add_argument("--megabytes", type=int, default=256, help="MiB per stream run (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each loop (default 5)")
    args = parser.parse_args(argv)
    for name in ("requests", "megabytes", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    request: list[float] = []
    plain: list[float] = []
    stream: list[float] = []
    for _ in range(args.repeat):  # interleaved, so that a busy moment falls on every loop alike
        request.append(trio.run(_requests, args.requests, True) / args.requests * 1e6)
        plain.append(trio.run(_requests, args.requests, False) / args.requests * 1e6)
        total = args.megabytes << 20
        stream.append(trio.run(_stream, total) / (total / 1e9))
    print(f"CPU of the data path in one process ({args.repeat} runs each):")
    print(_line("request", request, "us"))
    print(_line("request-plain", plain, "us"))
    print(_line("stream", stream, "s/GB"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
