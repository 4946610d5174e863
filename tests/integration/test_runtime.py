"""The accept loop and the boundary it puts around every connection, through a real loopback listener and tiny
handlers: one log line and one count per connection, whatever the handler does; a handler's bug costs its own
connection only; `max_connections`; the tracker a drain waits on; and cancellation at drain time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import shlex
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from mtlsmesh.credentials import CredentialStore
from mtlsmesh.errors import ConfigError
from mtlsmesh.outcome import Decision, Reason
from mtlsmesh.runtime import ConnRecord, Handler, Runtime, Tracker, serve_listener
from tests.integration.mesh import LOOPBACK, base_config, conn_lines, connect, exchange, outcome
from tests.pki import TD, Pki

pytestmark = pytest.mark.usefixtures("mesh_logs")

IO = 10.0
LISTENER = "edge"
DIRECTION = "test"

# What the log line says (decision, reason, detail) for each way a connection can end here; the counters count it
# by (decision, reason). A handler that is cut off before it decides leaves the decision at `refuse`.
OUTCOMES = {
    "handled": (Decision.PASSTHROUGH, Reason.CLOSED, ""),  # what `echo` records, as a real handler does
    "bug": (Decision.REFUSE, Reason.INTERNAL_ERROR, "RuntimeError: a bug in the handler"),
    "mesh_error": (Decision.REFUSE, Reason.ERROR, "listen.port: a refusal the handler reports"),
    "limit": (Decision.REFUSE, Reason.LIMIT, "max_connections reached"),
    "drain_timeout": (Decision.REFUSE, Reason.DRAIN_TIMEOUT, ""),
    "cancelled": (Decision.REFUSE, Reason.CANCELLED, ""),
}


def check_outcome(rt: Runtime, line: dict[str, str], outcome_name: str, count: int = 1) -> None:
    """The line's decision, reason and detail are those of `outcome_name`, and the counters hold `count` such
    connections."""
    decision, reason, detail = OUTCOMES[outcome_name]
    assert (line["decision"], line["reason"], line.get("detail", "")) == (decision, reason, detail)
    assert rt.stats.connections[(DIRECTION, decision, reason)] == count


def fields(line: str) -> dict[str, str]:
    """A `key=value ...` log line as a dict (values unquoted)."""
    return dict(part.split("=", 1) for part in shlex.split(line))


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """The connections' lines (not the accept loop's warnings, on the same logger)."""
    return [fields(line) for line in conn_lines(caplog.records) if line.startswith("dir=")]


@pytest.fixture
def rt(pki: Pki) -> Runtime:
    files = pki.issue("a")
    return Runtime(base_config(files), CredentialStore.load(files, TD), tracker=Tracker(100))


@dataclass
class Serving:
    port: int
    accepting: trio.CancelScope  # the accept loop alone
    connections: trio.CancelScope  # the connections it started


@asynccontextmanager
async def serving(rt: Runtime, handler: Handler) -> AsyncIterator[Serving]:
    """`serve_listener` on a loopback port, its connections in a nursery that outlives the accept loop (as the
    sidecar runs it), each under a cancel scope of its own that the test may cancel (the body runs under neither);
    both are cancelled at the end. Bounded by IO seconds."""
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    accepting, connections = trio.CancelScope(), trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with connections:
            async with trio.open_nursery() as nursery:

                async def accept(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                    with accepting:
                        await serve_listener(
                            rt, listener, LISTENER, DIRECTION, handler, nursery, task_status=task_status
                        )

                await nursery.start(accept)
                task_status.started()

    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            try:
                yield Serving(port, accepting, connections)
            finally:
                accepting.cancel()
                connections.cancel()


async def echo(rt: Runtime, stream: trio.SocketStream, rec: ConnRecord) -> None:
    """Echo to EOF, counting and recording as handlers do; half-close back and close."""
    rec.decision = Decision.PASSTHROUGH
    while data := await stream.receive_some(65536):
        rec.bytes_in += len(data)
        await stream.send_all(data)
        rec.bytes_out += len(data)
    await stream.send_eof()
    await stream.aclose()
    rec.reason = Reason.CLOSED


async def reset_at_once(port: int) -> int:
    """Connect with a plain socket, whose connect() returns as soon as the kernel has the connection (trio's may
    see the server's RST first), and check that the answer is a reset; returns the client's port."""
    with socket.socket() as plain:
        plain.connect((LOOPBACK, port))
        await trio.lowlevel.wait_readable(plain)
        with pytest.raises(ConnectionResetError):
            plain.recv(10)
        return int(plain.getsockname()[1])


async def settled(rt: Runtime) -> None:
    """Every connection has ended (its line logged, its counts in)."""
    with trio.fail_after(IO):
        await rt.tracker.wait_idle()


async def test_one_line_per_connection_with_its_counts(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    payloads = [b"a", b"bb" * 1000, os.urandom(300_000)]
    clients = []
    async with serving(rt, echo) as server:
        for payload in payloads:
            client = await connect(server.port)
            clients.append(client.socket.getsockname()[1])
            await client.send_all(payload)
            await client.send_eof()
            assert await outcome(client) == ("eof", payload)
            await client.aclose()
            await settled(rt)
    got = lines(caplog)
    assert len(got) == len(payloads)
    for line, payload, port in zip(got, payloads, clients, strict=True):
        assert (line["dir"], line["listener"], line["client"]) == (DIRECTION, LISTENER, f"127.0.0.1:{port}")
        assert (line["bytes_in"], line["bytes_out"]) == (str(len(payload)), str(len(payload)))
        assert int(line["duration_ms"]) >= 0
        assert (line["orig_dst"], line["peer_id"]) == ("-", "-")  # nothing the handler did not fill in
    check_outcome(rt, got[0], "handled", count=len(payloads))
    total = sum(map(len, payloads))
    assert (rt.stats.bytes[(DIRECTION, "in")], rt.stats.bytes[(DIRECTION, "out")]) == (total, total)
    assert rt.stats.active[DIRECTION] == 0 and rt.tracker.active == 0


async def test_a_handler_bug_costs_its_own_connection_only(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def buggy_once(rt: Runtime, stream: trio.SocketStream, rec: ConnRecord) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await stream.receive_some(10)
            raise RuntimeError("a bug in the handler")  # and the stream is left open
        await echo(rt, stream, rec)

    async with serving(rt, buggy_once) as server:
        first = await connect(server.port)
        await first.send_all(b"x")
        assert await outcome(first) == ("reset", b"")  # what it left open was closed with an RST
        await first.aclose()
        assert await exchange(server.port, b"next") == b"next"  # the server goes on
        await settled(rt)
    bug, served = lines(caplog)
    check_outcome(rt, bug, "bug")
    check_outcome(rt, served, "handled")
    (report,) = [r for r in caplog.records if r.name == "mtlsmesh" and r.levelno == logging.ERROR]
    assert report.getMessage() == f"event=internal_error listener={LISTENER}"
    assert report.exc_info is not None and "a bug in the handler" in str(report.exc_info[1])


async def test_a_mesh_error_is_a_reason_not_a_bug(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    async def refuses(rt: Runtime, stream: trio.SocketStream, rec: ConnRecord) -> None:
        raise ConfigError("listen.port", "a refusal the handler reports")

    async with serving(rt, refuses) as server:
        await reset_at_once(server.port)
        await settled(rt)
    (line,) = lines(caplog)
    check_outcome(rt, line, "mesh_error")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback: bad input is no bug


async def test_max_connections_refuses_the_one_too_many_with_a_reset(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    rt = dataclasses.replace(rt, tracker=Tracker(1))
    async with serving(rt, echo) as server:
        held = await connect(server.port)
        await held.send_all(b"one")
        assert await held.receive_some(10) == b"one"  # open and being served
        extra_port = await reset_at_once(server.port)
        assert (rt.tracker.active, rt.stats.active[DIRECTION]) == (1, 1)  # the refused one never counted as open
        await held.send_all(b" still")
        assert await held.receive_some(10) == b" still"
        await held.send_eof()
        assert await outcome(held) == ("eof", b"")
        await held.aclose()
        await settled(rt)
        assert await exchange(server.port, b"room again") == b"room again"
        await settled(rt)
    refused, first, third = lines(caplog)
    assert refused["client"] == f"127.0.0.1:{extra_port}"
    check_outcome(rt, refused, "limit")
    check_outcome(rt, first, "handled", count=2)
    assert third["bytes_in"] == str(len(b"room again"))


async def test_the_tracker_is_idle_when_the_last_connection_closes() -> None:
    tracker = Tracker(10)
    with trio.fail_after(IO):
        await tracker.wait_idle()  # nothing open: returns at once
        tracker.opened()
        tracker.opened()
        idle = trio.Event()

        async def wait() -> None:
            await tracker.wait_idle()
            idle.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            tracker.closed()
            await trio.testing.wait_all_tasks_blocked()
            assert not idle.is_set()  # one still open
            tracker.closed()
        assert idle.is_set() and tracker.active == 0
        tracker.opened()  # busy again: a new wait waits again
        with trio.move_on_after(0.05) as still_busy:
            await tracker.wait_idle()
        assert still_busy.cancelled_caught
        tracker.closed()
        await tracker.wait_idle()


async def test_the_tracker_counts_connections_through_the_accept_loop(rt: Runtime) -> None:
    release = trio.Event()

    async def hold(rt: Runtime, stream: trio.SocketStream, rec: ConnRecord) -> None:
        await release.wait()

    async with serving(rt, hold) as server:
        clients = [await connect(server.port) for _ in range(3)]
        while rt.tracker.active < 3:
            await trio.sleep(0.01)
        with trio.move_on_after(0.05) as busy:
            await rt.tracker.wait_idle()
        assert busy.cancelled_caught and rt.stats.active[DIRECTION] == 3
        release.set()
        await settled(rt)  # the drain's wait: over once the last handler has returned
        assert rt.stats.active[DIRECTION] == 0
        for client in clients:
            assert await outcome(client) == ("reset", b"")  # the boundary closed what the handler left open
            await client.aclose()


@pytest.mark.parametrize(("draining", "outcome_name"), [(True, "drain_timeout"), (False, "cancelled")])
async def test_a_connection_cancelled_under_its_handler(
    rt: Runtime, caplog: pytest.LogCaptureFixture, draining: bool, outcome_name: str
) -> None:
    """What a drain does once its time is up: cancel what is still open. The handler's connection is reset, and
    counted and logged like any other."""
    started = trio.Event()

    async def forever(rt: Runtime, stream: trio.SocketStream, rec: ConnRecord) -> None:
        started.set()
        await trio.sleep_forever()

    async with serving(rt, forever) as server:
        client = await connect(server.port)
        await started.wait()
        server.accepting.cancel()  # the drain stops accepting first...
        rt.tracker.draining = draining
        await trio.testing.wait_all_tasks_blocked()
        server.connections.cancel()  # ...then, its time up, cancels the connections
        await settled(rt)
        assert await outcome(client) == ("reset", b"")
        await client.aclose()
    (line,) = lines(caplog)
    check_outcome(rt, line, outcome_name)
    assert rt.stats.active[DIRECTION] == 0


async def test_an_open_connection_outlives_the_accept_loop(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(rt, echo) as server:
        client = await connect(server.port)
        await client.send_all(b"before")
        assert await client.receive_some(10) == b"before"
        server.accepting.cancel()
        await trio.testing.wait_all_tasks_blocked()
        with socket.socket() as late, pytest.raises(ConnectionRefusedError):  # the listener is closed...
            late.connect((LOOPBACK, server.port))
        await client.send_all(b"after")  # ...and the open connection goes on
        assert await client.receive_some(10) == b"after"
        await client.send_eof()
        assert await outcome(client) == ("eof", b"")
        await client.aclose()
        await settled(rt)
    (line,) = lines(caplog)
    check_outcome(rt, line, "handled")
    assert line["bytes_in"] == str(len(b"beforeafter"))


async def test_running_out_of_descriptors_backs_off_and_goes_on(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with serving(rt, echo) as server:
        plain = socket.socket()  # its descriptor first: the connect itself needs none
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # none left for accept()
        try:
            plain.connect((LOOPBACK, server.port))
            await trio.testing.wait_all_tasks_blocked()  # the loop found the connection, failed to take it, waits
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client = trio.SocketStream(trio.socket.from_stdlib_socket(plain))
        await client.send_all(b"served after the back-off")
        await client.send_eof()
        assert await outcome(client) == ("eof", b"served after the back-off")
        await client.aclose()
        await settled(rt)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"event=accept_failed listener={LISTENER} error='[Errno 24] Too many open files'"]
    (line,) = lines(caplog)
    check_outcome(rt, line, "handled")
