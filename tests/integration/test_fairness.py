"""Fairness on the data path, where trio's "every async call is a checkpoint" rule is deliberately not followed.

`relay` and `tls` read and write sockets without a checkpoint when the socket is ready, and `runtime.serve_listener`
accepts without one while the backlog holds connections. What replaces the rule: a relay pump checkpoints on the
second of two rounds in a row in which neither side waited, and the accept loop every `ACCEPT_BURST` connections.
These tests pin that replacement: taken out, the relay's checkpoint lets a flood hold the loop for the whole
length of the load (until a watchdog thread ends it), and the accept loop's lets a busy listener take a whole
backlog in one go.

The relay's flood is a relay that is its own peer: its downstream and upstream are the two ends of one loopback
connection, loaded with some data each way before it starts, so whatever it writes to one side comes back on the
other. Its source never runs dry and its destination never fills, however the machine schedules anything else: the
worst case for fairness, and a deterministic one. A pump that never waits and never checkpoints would never give
the loop back, so a thread shuts the connection down after `FLOOD` seconds: the load is bounded in time even when
the loop is not, and in bytes by what was loaded into it.

While the load runs, a probe measures what another connection and a timer see: 1-byte round trips, back to back,
through a relay of their own to an echo task, and a 10 ms `trio.sleep`. The bounds are generous (a noisy machine
with two cores shared with other jobs still meets them by a wide margin: a few ms, a few tens with the accept
loop's load); a loop that starves misses them by half a second to a second.
"""

from __future__ import annotations

import itertools
import logging
import os
import resource
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from mtlsmesh import ca, handshake, tls
from mtlsmesh.credentials import CredentialStore
from mtlsmesh.identity import workload_id
from mtlsmesh.relay import RelayResult, relay
from mtlsmesh.runtime import ACCEPT_BURST, ConnRecord, Runtime, Tracker, serve_listener
from tests.integration.mesh import base_config
from tests.pki import TD, Pki, material_for

LOOPBACK = "127.0.0.1"
FLOOD = 1.0  # seconds of load
BOUND = 0.2  # seconds a round trip, or a timer's lateness, may take during the load
TICK = 0.01  # the probe's timer
LIMIT = 30.0  # seconds for a whole test, once the loop is free again
MIN_FLOOD = 16 << 20  # bytes a flood must have moved each way to count as one (typically hundreds of MiB)
# Bytes loaded into the flood each way: more than one read of a pump (the relay's 256 KiB chunk for TCP, a TLS
# stream's 64 KiB transport read), so that no read is ever short (a short read waits, and a wait yields).
LOAD = {"tcp": 384 * 1024, "tls": 128 * 1024}


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection (dialer, accepted)."""
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dialer = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        await listener.bind((LOOPBACK, 0))
        listener.listen(1)
        await dialer.connect(listener.getsockname())
        accepted, _ = await listener.accept()
    return trio.SocketStream(dialer), trio.SocketStream(accepted)


# --- the probe ----------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """What the other connection and the timer saw: every round trip and every tick's lateness (seconds)."""

    round_trips: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)

    def check(self, what: str) -> None:
        slowest, latest = max(self.round_trips), max(self.late)
        summary = (
            f"during {what}: {len(self.round_trips)} round trips, slowest {slowest * 1000:.1f} ms; "
            f"{len(self.late)} ticks, latest {latest * 1000:.1f} ms late"
        )
        print(summary)
        assert slowest < BOUND, f"another connection starved {summary}"
        assert latest < BOUND, f"a timer starved {summary}"
        assert len(self.round_trips) >= 20 and len(self.late) >= 10, f"too few samples {summary}"


@asynccontextmanager
async def probing(client: trio.abc.Stream) -> AsyncIterator[Probe]:
    """1-byte round trips over `client` (whose far end echoes), back to back, and ticks of a timer while the body
    runs. A round trip or a sleep still under way at the end counts with the time it has taken so far: a starved
    one may not have finished."""
    probe = Probe()
    pending: dict[str, float] = {}

    async def ping() -> None:
        while True:
            pending["round trip"] = started = trio.current_time()
            await client.send_all(b"x")
            assert await client.receive_some(1) == b"x"
            probe.round_trips.append(trio.current_time() - started)
            del pending["round trip"]

    async def tick() -> None:
        while True:
            pending["tick"] = started = trio.current_time()
            await trio.sleep(TICK)
            probe.late.append(trio.current_time() - started - TICK)
            del pending["tick"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ping)
        nursery.start_soon(tick)
        while not (probe.round_trips and probe.late):  # both running before the load starts
            await trio.sleep(0.001)
        try:
            yield probe
            await trio.sleep(0.05)  # the load is over: what it held up finishes now
        finally:
            now = trio.current_time()
            if "round trip" in pending:
                probe.round_trips.append(now - pending["round trip"])
            if "tick" in pending:
                probe.late.append(now - pending["tick"] - TICK)
            nursery.cancel_scope.cancel()


async def echo(stream: trio.abc.Stream) -> None:
    while data := await stream.receive_some(1):
        await stream.send_all(data)


@asynccontextmanager
async def relayed_echo() -> AsyncIterator[trio.SocketStream]:
    """A client connection through a relay of its own (plain TCP) to an echo task."""
    client, down = await tcp_pair()
    up, server = await tcp_pair()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, down, up)  # closes down and up when cancelled
            nursery.start_soon(echo, server)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


# --- a relay carrying a flood -------------------------------------------------------------------------------


@contextmanager
def shut_down_after(seconds: float, *streams: trio.SocketStream) -> Iterator[None]:
    """A thread shuts `streams` down for reading and writing after `seconds`, whether or not the trio loop is free
    (over duplicates of their descriptors: a socket the relay closed meanwhile is still the same socket)."""
    duplicates = [os.dup(stream.socket.fileno()) for stream in streams]

    def stop() -> None:
        for fd in duplicates:
            with suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, stop)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        for fd in duplicates:
            os.close(fd)


async def both(first: Callable[[], Awaitable[object]], second: Callable[[], Awaitable[object]]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)


async def warm_up(a: trio.SocketStream, b: trio.SocketStream, at_least: int) -> None:
    """Data both ways, read as fast as it comes, until the kernel has grown both receive buffers to `at_least`
    bytes (it grows them for fast readers). The loaded flood must never fill a window: each pump would wait for
    itself for ever."""
    block = bytes(1 << 20)

    async def push(stream: trio.SocketStream) -> None:
        for _ in range(32):
            await stream.send_all(block)

    async def pull(stream: trio.SocketStream) -> None:
        got = 0
        while got < 32 * len(block):
            got += len(await stream.receive_some(len(block)))

    for _ in range(4):
        await both(lambda: both(lambda: push(a), lambda: pull(b)), lambda: both(lambda: push(b), lambda: pull(a)))
        sizes = [stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for stream in (a, b)]
        if min(sizes) >= at_least:
            return
    pytest.skip(f"the receive buffers of a loopback connection stay at {sizes} bytes: too small for the flood")


async def load_flood(
    kind: str, a: trio.SocketStream, b: trio.SocketStream
) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    """The two ends of the loopback connection `a`-`b` (raw TCP, or TLS over it), loaded each way: (down, up)."""
    await warm_up(a, b, at_least=2 * LOAD[kind])
    if kind == "tcp":
        down: trio.abc.HalfCloseableStream = a
        up: trio.abc.HalfCloseableStream = b
    else:
        authority = ca.create_ca(TD, now=datetime.now(UTC))
        client = tls.TLSStream(a, context(authority, "client", tls.Side.CLIENT), tls.Side.CLIENT)
        server = tls.TLSStream(b, context(authority, "server", tls.Side.SERVER), tls.Side.SERVER)
        await both(client.do_handshake, server.do_handshake)
        down, up = client, server
    payload = bytes(LOAD[kind])
    with trio.move_on_after(5) as stuck:
        await both(lambda: down.send_all(payload), lambda: up.send_all(payload))  # nobody reads yet: it all waits
    if stuck.cancelled_caught:
        pytest.skip(f"a loopback connection cannot hold {len(payload)} unread bytes each way")
    return down, up


def context(authority: ca.Authority, name: str, side: tls.Side) -> tls.SSL.Context:
    return handshake.build_context(material_for(authority, workload_id(TD, "default", name)), side)


@pytest.mark.parametrize("kind", ["tcp", "tls"])
async def test_a_relay_carrying_a_flood_does_not_starve_other_connections(kind: str) -> None:
    a, b = await tcp_pair()
    results: list[RelayResult] = []
    try:
        with trio.fail_after(LIMIT):
            down, up = await load_flood(kind, a, b)
            with shut_down_after(FLOOD, a, b):
                async with relayed_echo() as client, probing(client) as probe:
                    results.append(await relay(down, up))  # until the shutdown: it never waits for a peer
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
    probe.check(f"a {kind} flood")
    (result,) = results
    print(f"the flood moved {result.downstream_to_upstream >> 20} + {result.upstream_to_downstream >> 20} MiB")
    assert result.aborted  # ended by the shutdown, as intended, not by running out of data
    assert min(result.downstream_to_upstream, result.upstream_to_downstream) >= MIN_FLOOD, result


# --- the accept loop ----------------------------------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Runtime:
    # Thousands of connections here: keep their log lines out (and their formatting out of the measurements).
    caplog.set_level(logging.WARNING, logger="mtlsmesh")
    files = Pki(tmp_path).issue("a")
    return Runtime(base_config(files), CredentialStore.load(files, TD), tracker=Tracker(100_000))


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Room for the connections a starving accept loop would pile up, so that it starves rather than running out of
    descriptors (which makes it back off, and so yield)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_full_backlog_is_taken_a_burst_at_a_time(runtime: Runtime) -> None:
    """With a backlog already full, another task gets a turn at least every two bursts (its turn and the loop's
    can fall in either order within one pass of the scheduler). Counted, not timed: exact on any machine."""
    waiting = 6 * ACCEPT_BURST
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK, backlog=waiting + 8)
    clients = [socket.socket() for _ in range(waiting)]
    release = trio.Event()

    async def hold(rt: Runtime, stream: trio.SocketStream, rec: ConnRecord) -> None:
        await release.wait()  # keeps `tracker.active` counting every connection accepted so far

    seen: list[int] = []
    try:
        for client in clients:
            client.connect(listener.socket.getsockname())  # each waits in the backlog
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as connections:
                connections.start_soon(serve_listener, runtime, listener, "flood", "test", hold, connections)
                while runtime.tracker.active < waiting:
                    seen.append(runtime.tracker.active)
                    await trio.sleep(0)
                seen.append(runtime.tracker.active)
                release.set()
                connections.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        await trio.aclose_forcefully(listener)  # closed already, unless the loop never started
    steps = [after - before for before, after in itertools.pairwise(seen)]
    print(f"accepted per turn of another task: {steps}")
    assert max(steps) <= 2 * ACCEPT_BURST, steps
    assert sum(steps) == waiting


# Connects as fast as it can, and resets each connection at once (no TIME_WAIT left behind): a listener whose
# backlog never empties. A process of its own, so that it keeps up whatever the test's loop does.
CONNECTOR = r"""
import socket, struct, sys, time
port, seconds, limit = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
reset = struct.pack("ii", 1, 0)
made = 0
stop_at = time.monotonic() + seconds
while made < limit and time.monotonic() < stop_at:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:  # the port of a connection just reset can be refused for a moment
            continue
        made += 1
print(made)
"""
CONNECTORS = 2
CONNECTIONS = 20_000  # per connector, at most


@pytest.mark.usefixtures("descriptors")
async def test_a_backlog_that_never_empties_does_not_starve_an_established_connection(runtime: Runtime) -> None:
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    established: list[trio.SocketStream] = []

    async def handler(rt: Runtime, stream: trio.SocketStream, rec: ConnRecord) -> None:
        if not established:  # the first one: the connection the probe talks over
            established.append(stream)
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the client's reset at the end
                await echo(stream)
        # every other one returns at once: the accept loop's clean-up resets it

    made: list[int] = []

    async def connector() -> None:
        command = [sys.executable, "-I", "-S", "-c", CONNECTOR, str(port), str(FLOOD), str(CONNECTIONS)]
        made.append(int((await trio.run_process(command, capture_stdout=True)).stdout))

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as connections:
            connections.start_soon(serve_listener, runtime, listener, "flood", "test", handler, connections)
            client = await trio.open_tcp_stream(LOOPBACK, port)
            try:
                await client.send_all(b"x")
                assert await client.receive_some(1) == b"x"  # established, and served by the echo above
                async with probing(client) as probe, trio.open_nursery() as load:
                    for _ in range(CONNECTORS):
                        load.start_soon(connector)
            finally:
                await trio.aclose_forcefully(client)
                connections.cancel_scope.cancel()
    probe.check(f"{sum(made)} connections in a row")
    accepted = sum(runtime.stats.connections.values())
    assert accepted >= 1000, f"only {accepted} connections accepted: no load to speak of"
