"""A large transfer through two sidecars, bytes compared by hash in both directions.

Marked `slow`: 1 GiB each way through client → outbound sidecar ═TLS═▶ inbound sidecar → app, all in one process
on loopback (so one core does the work of four parties). The time is printed; the bound is generous for CI.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from tests.integration.mesh import Pki, app_server, connect, mesh_pair

TOTAL = int(os.environ.get("MTLSMESH_TEST_TRANSFER_BYTES", 1 << 30))  # 1 GiB unless told
CHUNK = 1 << 20
TIME_LIMIT = 300.0  # seconds for the whole transfer; fails the test rather than hanging CI


async def stream_back_hashed(stream: trio.SocketStream) -> None:
    """The app: hash what arrives and, at the same time, send the same amount of its own bytes back."""
    digest = hashlib.sha256()
    block = bytes(range(256)) * (CHUNK // 256)

    async def send() -> None:
        for _ in range(TOTAL // CHUNK):
            await stream.send_all(block)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while data := await stream.receive_some(65536):
            digest.update(data)
    await stream.send_all(digest.hexdigest().encode())
    await stream.send_eof()


@pytest.mark.slow
async def test_one_gib_each_way_arrives_intact(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    block = os.urandom(CHUNK)
    sent = hashlib.sha256()
    for _ in range(TOTAL // CHUNK):
        sent.update(block)
    expected_back = hashlib.sha256()
    back_block = bytes(range(256)) * (CHUNK // 256)
    for _ in range(TOTAL // CHUNK):
        expected_back.update(back_block)

    received = bytearray()
    back = hashlib.sha256()
    back_count = 0
    with trio.fail_after(TIME_LIMIT):
        async with app_server(stream_back_hashed) as (app_port, _), mesh_pair(pki, app_port) as mesh:
            client = await connect(mesh.port)
            started = time.perf_counter()

            async def send() -> None:
                for _ in range(TOTAL // CHUNK):
                    await client.send_all(block)
                await client.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await client.receive_some(65536):
                    take = min(len(data), TOTAL - back_count)
                    back.update(data[:take])
                    back_count += take
                    received += data[take:]
            elapsed = time.perf_counter() - started
            await client.aclose()
    assert back_count == TOTAL and back.hexdigest() == expected_back.hexdigest()
    assert received.decode() == sent.hexdigest()
    print(f"\n{TOTAL} bytes each way through both sidecars in {elapsed:.1f} s: {2 * TOTAL / elapsed / 1e6:.0f} MB/s")
