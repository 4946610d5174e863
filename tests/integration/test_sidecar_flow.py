"""Two in-process sidecars on loopback: app → outbound sidecar ═mTLS═▶ inbound sidecar → app.

Real listeners, real TLS 1.3 with SVIDs from the CA, real sockets; the original destination is injected.
Each test checks what the app and the client see, and the one log line per connection.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio

from tests.integration.mesh import Pki, app_server, connect, echo, mesh_pair, read_all

IO = 10.0  # seconds any single scenario may take


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def test_bytes_flow_both_ways_and_the_app_sees_127_0_0_6(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtlsmesh")
    payload = os.urandom(300_000)
    with trio.fail_after(IO):
        async with app_server(echo) as (app_port, seen), mesh_pair(pki, app_port) as (port, _c, _s):
            client = await connect(port)
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await client.send_all(payload)
                    await client.send_eof()

                nursery.start_soon(send)
                got = await read_all(client)
            await client.aclose()
    assert got == payload
    assert seen == ["127.0.0.6"]
    lines = [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.conn"]
    outbound = [line for line in lines if "dir=outbound" in line]
    inbound = [line for line in lines if "dir=inbound" in line]
    assert len(outbound) == 1 and len(inbound) == 1, lines
    assert "decision=mtls" in outbound[0] and "peer_id=spiffe://cluster.local/ns/default/sa/reviews" in outbound[0]
    assert "peer_id=spiffe://cluster.local/ns/default/sa/productpage" in inbound[0]
    assert f"bytes_in={len(payload)}" in outbound[0] and f"bytes_out={len(payload)}" in outbound[0]
    assert "reason=closed" in outbound[0] and "reason=closed" in inbound[0]
