"""Resource budgets under a flood: one peer that keeps the sidecar's socket full of records without application data
(or with one byte of it now and then) must not starve another connection, nor make the sidecar hold more memory.

The flood is sent from a thread with a blocking socket, so that it keeps the sidecar's socket full whatever the trio
loop does (a flood sent from the loop itself would wait whenever the sidecar hogs it: no test at all). Its records
are made beforehand by the test's own record code (tests.adversarial.peer), after a real handshake.

The probe is open-loop, from two more threads: a plain TCP connection through the same sidecar (passed through to
the echo app: PERMISSIVE) gets one byte every TICK, whether or not the echoes come back, and each echo's delay is a
sample. A loop held for a second by the flood then delays every byte sent in that second, not only the one in
flight: the median of the PROBES samples says whether the loop was starved (a few ms on an idle machine; hundreds
when starved), and stays robust to the odd slow sample on a loaded machine. Bounded: the flood in bytes and in time
(FLOOD_TIME, after which its socket is shut), the probe in samples and time.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from contextlib import suppress

import pytest
import trio

from mtlsmesh.config import Mode
from tests.adversarial.peer import Peer, hostile_server_behind_a_sidecar, open_peer, sidecar_in_front_of_an_app
from tests.integration.mesh import LOOPBACK
from tests.pki import Pki

IO = 60.0
FLOOD_TIME = 10.0  # seconds the flooding thread may run at most
PROBES = 100  # samples, one per TICK: a second of probing from the flood's start
TICK = 0.01
BOUND = 0.05  # seconds: the median echo delay of the other connection during the flood
MEMORY = 64 << 20  # bytes the process may grow by during the flood (beyond the flood's own bytes, made before)


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flood_of(kind: str, peer: Peer, n: int) -> bytes:
    out = bytearray()
    for i in range(n):
        if kind == "key_update":
            out += peer.key_update()
        elif kind == "empty":
            out += peer.seal(b"\x17")
        elif kind == "padding":
            out += peer.seal(b"\x17" + bytes(64))
        elif kind == "user_canceled":
            out += peer.seal(b"\x01\x5a\x15")
        elif kind in ("tickets", "tickets_mixed") and not (kind == "tickets_mixed" and i % 33 == 32):
            out += peer.seal(b"\x04\x00\x00\x0f" + bytes(4) + bytes(4) + b"\x00" + b"\x00\x02tk" + b"\x00\x00\x16")
        elif i % 33 == 32:  # "mixed": the most a peer may send unrefused, 32 KeyUpdate requests, then a data byte
            out += peer.data(b"d")
        else:
            out += peer.key_update(True)
    return bytes(out)


class Flood(threading.Thread):
    """Sends the flood over a duplicate of the peer's socket, blocking, until done, refused, or FLOOD_TIME."""

    def __init__(self, peer: Peer, flood: bytes) -> None:
        super().__init__(daemon=True)
        self.raw = socket.socket(fileno=os.dup(peer.stream.socket.fileno()))
        self.raw.setblocking(True)
        self.raw.settimeout(FLOOD_TIME)
        self.flood = flood
        self.started = threading.Event()

    def run(self) -> None:
        try:
            self.raw.sendall(self.flood[:65536])
            self.started.set()
            self.raw.sendall(self.flood[65536:])
        except OSError:
            pass  # refused (a reset) or timed out: the flood is over either way
        finally:
            self.started.set()

    def stop(self) -> None:
        self.join(FLOOD_TIME)
        if self.is_alive():
            self.raw.shutdown(socket.SHUT_RDWR)
            self.join(FLOOD_TIME)
        self.raw.close()


def probe(port: int) -> tuple[list[float], int]:
    """Open-loop echo delays through the sidecar (see the module docstring), and the process's peak RSS meanwhile."""
    conn = socket.create_connection((LOOPBACK, port), timeout=FLOOD_TIME)
    sent: list[float] = []
    delays: list[float] = []
    peak = rss()

    def read() -> None:
        nonlocal peak
        while len(delays) < PROBES:
            data = conn.recv(PROBES)
            if not data:
                return
            now = time.monotonic()
            for _ in data:
                delays.append(now - sent[len(delays)])
            peak = max(peak, rss())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for _ in range(PROBES):
            sent.append(time.monotonic())
            conn.sendall(b"p")
            time.sleep(TICK)
        reader.join(FLOOD_TIME)
    finally:
        conn.close()
    return delays, peak


@pytest.mark.parametrize(("kind", "n"), [("key_update", 150_000), ("empty", 600_000), ("padding", 300_000),
                                         ("user_canceled", 600_000), ("mixed", 100_000)])  # fmt: skip
async def test_a_flood_does_not_starve_another_connection(pki: Pki, kind: str, n: int) -> None:
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki, Mode.PERMISSIVE) as target:
            warm = await trio.open_tcp_stream(LOOPBACK, target.port)  # the passthrough path works, before the flood
            await warm.send_all(b"warm")
            assert await warm.receive_some() == b"warm"
            await warm.aclose()
            peer = await open_peer(pki, target.port)
            flood = Flood(peer, flood_of(kind, peer, n))
            baseline = rss()
            flood.start()
            await trio.to_thread.run_sync(flood.started.wait)
            delays, peak = await trio.to_thread.run_sync(probe, target.port)
            await trio.to_thread.run_sync(flood.stop)
            await peer.stream.aclose()
    assert len(delays) == PROBES, f"{kind}: {len(delays)} of {PROBES} echoes came back"
    median = statistics.median(delays)
    assert median < BOUND, (
        f"{kind}: median echo delay {median * 1000:.1f} ms during the flood (max {max(delays) * 1000:.0f})"
    )
    assert peak - baseline < MEMORY, f"{kind}: the process grew by {(peak - baseline) >> 20} MiB"


@pytest.mark.parametrize(("kind", "n"), [("tickets", 300_000), ("tickets_mixed", 100_000)])
async def test_a_flood_of_tickets_toward_our_client_side_does_not_starve_another_connection(
    pki: Pki, kind: str, n: int
) -> None:
    with trio.fail_after(IO):
        async with (
            sidecar_in_front_of_an_app(pki, Mode.PERMISSIVE) as target,
            hostile_server_behind_a_sidecar(pki) as (outbound_port, peers),
        ):
            app = await trio.open_tcp_stream(LOOPBACK, outbound_port)  # the app, calling out through the sidecar
            peer = await peers.receive()
            first = peer.held + peer.data(b"d")  # the real handshake's tickets, then data: the count starts again
            flood = Flood(peer, first + flood_of(kind, peer, n))
            got = 0

            async def drain() -> None:  # the app reads what the hostile server's data records carry
                nonlocal got
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await app.receive_some(65536):
                        got += len(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                baseline = rss()
                flood.start()
                await trio.to_thread.run_sync(flood.started.wait)
                delays, peak = await trio.to_thread.run_sync(probe, target.port)
                await trio.to_thread.run_sync(flood.stop)
                await peer.stream.aclose()
                nursery.cancel_scope.deadline = trio.current_time() + 2
            await app.aclose()
    assert len(delays) == PROBES
    median = statistics.median(delays)
    assert median < BOUND, (
        f"{kind}: median echo delay {median * 1000:.1f} ms during the flood (max {max(delays) * 1000:.0f})"
    )
    assert peak - baseline < MEMORY, f"{kind}: the process grew by {(peak - baseline) >> 20} MiB"
    if kind == "tickets_mixed":
        assert got > 0  # the data between the tickets went through: the flood was carried, not refused
