"""A large transfer through two sidecars, bytes compared by hash in both directions.

A size that is no multiple of the chunk size (a few MiB and a remainder) always runs; the big one is marked `slow`:
1 GiB each way through client → outbound sidecar ═TLS═▶ inbound sidecar → app, all in one process
on loopback (so one core does the work of four parties). The time is printed; the bound is generous for CI.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.mesh import app_server, connect, mesh_pair
from tests.pki import Pki

TOTAL = int(os.environ.get("MTLSMESH_TEST_TRANSFER_BYTES", 1 << 30))  # 1 GiB unless told
CHUNK = 1 << 20
TIME_LIMIT = 300.0  # seconds for the whole transfer; fails the test rather than hanging CI


def pieces(total: int, block: bytes) -> Iterator[bytes]:
    """`total` bytes as whole blocks, then what remains: a size need not be a multiple of the block."""
    for _ in range(total // len(block)):
        yield block
    if total % len(block):
        yield block[: total % len(block)]


async def stream_back_hashed(stream: trio.SocketStream, total: int) -> None:
    """The app: hash what arrives and, at the same time, send `total` bytes of its own back."""
    digest = hashlib.sha256()
    block = bytes(range(256)) * (CHUNK // 256)

    async def send() -> None:
        for piece in pieces(total, block):
            await stream.send_all(piece)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while data := await stream.receive_some(65536):
            digest.update(data)
    await stream.send_all(digest.hexdigest().encode())
    await stream.send_eof()


@pytest.mark.parametrize(
    "total", [pytest.param(3 * CHUNK + 12_345, id="remainder"), pytest.param(TOTAL, id="big", marks=pytest.mark.slow)]
)
async def test_a_transfer_each_way_arrives_intact(tmp_path: Path, total: int) -> None:
    pki = Pki(tmp_path)
    block = os.urandom(CHUNK)
    sent = hashlib.sha256()
    for piece in pieces(total, block):
        sent.update(piece)
    expected_back = hashlib.sha256()
    for piece in pieces(total, bytes(range(256)) * (CHUNK // 256)):
        expected_back.update(piece)

    received = bytearray()
    back = hashlib.sha256()
    back_count = 0
    app = functools.partial(stream_back_hashed, total=total)
    with trio.fail_after(TIME_LIMIT):
        async with app_server(app) as (app_port, _), mesh_pair(pki, app_port) as mesh:
            client = await connect(mesh.port)
            started = time.perf_counter()

            async def send() -> None:
                for piece in pieces(total, block):
                    await client.send_all(piece)
                await client.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await client.receive_some(65536):
                    take = min(len(data), total - back_count)
                    back.update(data[:take])
                    back_count += take
                    received += data[take:]
            elapsed = time.perf_counter() - started
            await client.aclose()
    assert back_count == total and back.hexdigest() == expected_back.hexdigest()
    assert received.decode() == sent.hexdigest()
    print(f"\n{total} bytes each way through both sidecars in {elapsed:.1f} s: {2 * total / elapsed / 1e6:.0f} MB/s")
