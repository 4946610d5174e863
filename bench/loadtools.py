"""Small load tools the benchmark runs inside the namespaces: `python -m bench.loadtools <tool> ...`.

- `echo-server`: echoes every byte back (the backend for latency and idle connections).
- `http-server`: answers `GET /1k` with a 1 KiB body and keeps the connection (the backend for kept-alive small
  requests); answers any other request with a tiny 200 and closes (the backend for connections per second).
- `latency`: N round trips of a fixed-size message on one kept-alive connection; prints JSON percentiles.
- `idle`: opens N connections, proves each reaches the backend with a one-byte echo, prints `ready <n>`, and holds
  them until its stdin closes; bounded in time.

They print results on stdout as one JSON line and never retry silently: a failure is a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

from bench.stats import percentile

HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok"
SMALL_BODY = bytes(range(256)) * 4  # 1 KiB
HTTP_SMALL = (
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % len(SMALL_BODY)
    + SMALL_BODY
)
MAX_REQUEST = 65536


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            if head.startswith(b"GET /1k ") and b"connection: close" not in head.lower():
                self.transport.write(HTTP_SMALL)
                continue
            self.transport.write(HTTP_RESPONSE)
            self.transport.close()
            return
        if len(self.buffer) > MAX_REQUEST:
            self.transport.abort()


async def _serve(factory: type[asyncio.Protocol], host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def _latency(host: str, port: int, size: int, count: int, warmup: int, max_seconds: float) -> dict[str, float]:
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    samples: list[float] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + max_seconds
        for i in range(warmup + count):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter_ns()
            sock.sendall(payload)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise SystemExit("latency: connection closed by the tunnel")
                got += len(chunk)
            elapsed = time.perf_counter_ns() - start
            if i >= warmup:
                samples.append(elapsed / 1000.0)
    if not samples:
        raise SystemExit("latency: no round trip completed in time")
    return {
        "count": len(samples),
        "p50_us": percentile(samples, 0.50),
        "p99_us": percentile(samples, 0.99),
        "mean_us": sum(samples) / len(samples),
    }


async def _idle(host: str, port: int, count: int, concurrency: int, max_seconds: float) -> None:
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"x")
                await writer.drain()
                if await reader.readexactly(1) != b"x":
                    raise ConnectionError("wrong echo")
                writers.append(writer)
            except (OSError, asyncio.IncompleteReadError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout=max_seconds)
    except TimeoutError:
        failures.append(f"timed out after {max_seconds}s")
    print(json.dumps({"ready": len(writers), "failed": len(failures), "first_error": failures[:1]}), flush=True)
    # Hold until the runner closes our stdin (or its own bound on us fires).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtools")
    sub = parser.add_subparsers(dest="tool", required=True)
    for tool in ("echo-server", "http-server", "latency", "idle"):
        p = sub.add_parser(tool)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        if tool == "latency":
            p.add_argument("--size", type=int, default=64)
            p.add_argument("--count", type=int, default=5000)
            p.add_argument("--warmup", type=int, default=200)
            p.add_argument("--max-seconds", type=float, default=20.0)
        if tool == "idle":
            p.add_argument("--count", type=int, default=1000)
            p.add_argument("--concurrency", type=int, default=16)
            p.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.tool == "echo-server":
        asyncio.run(_serve(_Echo, args.host, args.port))
    elif args.tool == "http-server":
        asyncio.run(_serve(_Http, args.host, args.port))
    elif args.tool == "latency":
        result = _latency(args.host, args.port, args.size, args.count, args.warmup, args.max_seconds)
        print(json.dumps(result), flush=True)
    else:
        asyncio.run(_idle(args.host, args.port, args.count, args.concurrency, args.max_seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
