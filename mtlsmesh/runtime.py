"""The connection boundary: the dependency bundle, the per-connection record and log line, counters, and the accept
loop that puts a boundary around every connection.

What it does: `Runtime` carries the config, the credential store, the original-destination lookup and the dialer
(parameters, so tests run the handlers on loopback without root or iptables), the counters and the connection
tracker. `serve_listener` accepts connections, enforces `max_connections`, and runs each handler inside
`_run_connection`, which catches every error (no handler error may stop the server: trio's `serve_listeners` would
let it), closes what is left, counts the connection by its outcome and logs exactly one key=value line for it.

What it does not: decide what happens to a connection (see `outbound`, `inbound`), or give the handlers the steps
they share (see `steps`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from mtlsmesh import netio
from mtlsmesh.addresses import IPAddress, unmapped_host_port
from mtlsmesh.config import Config
from mtlsmesh.credentials import CredentialSource
from mtlsmesh.errors import MeshError
from mtlsmesh.identity import SpiffeId
from mtlsmesh.metrics import UNKNOWN, IdentityKey, SidecarMetrics, identity_key
from mtlsmesh.outcome import Outcome, Reason
from mtlsmesh.recent import Recent

log = logging.getLogger("mtlsmesh.conn")

OrigDstLookup = Callable[[trio.SocketStream], tuple[IPAddress, int]]


class Dialer(Protocol):
    """How handlers open upstream connections: `netio.dial`, or a test's stand-in. Raises OSError/TooSlowError."""

    def __call__(
        self, host: str, port: int, *, timeout: float, source: IPAddress | netio.TransparentSource | None = None
    ) -> Awaitable[trio.abc.HalfCloseableStream]: ...


ACCEPT_BURST = 16  # connections a listener accepts in a row before it lets the other tasks run


_NEEDS_QUOTES = re.compile(r'[ "=\\\n\t]')


def _quote(value: object) -> str:
    text = str(value)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def render_kv(fields: dict[str, object]) -> str:
    """One log line: `key=value` pairs, values quoted when they hold spaces or quotes."""
    return " ".join(f"{key}={_quote(value)}" for key, value in fields.items())


@dataclass(slots=True)
class ConnRecord(Outcome):
    """What one connection's log line says: its outcome (decision, reason, detail, peer_id) and where it came from
    and went; handlers fill it as they go. bytes_in: received from the accepted (downstream) side and forwarded;
    bytes_out: sent back to it."""

    direction: str
    listener: str
    client_addr: str = "-"
    orig_dst: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """`render_kv` of the fields in this order, written out (one line per connection: no dict to build). The
        decision and the reason are words of a closed set, never quoted; the detail, when there is one, comes last."""
        q = _quote
        peer_id = "-" if self.peer_id is None else q(self.peer_id)
        text = (
            f"dir={q(self.direction)} listener={q(self.listener)} client={q(self.client_addr)} "
            f"orig_dst={q(self.orig_dst)} peer_id={peer_id} decision={self.decision} "
            f"bytes_in={self.bytes_in} bytes_out={self.bytes_out} "
            f"duration_ms={int((time.monotonic() - self.started) * 1000)} reason={self.reason}"
        )
        return f"{text} detail={q(self.detail)}" if self.detail else text

    __str__ = line  # the log record carries the connection itself; its text is made when a handler formats it

    def fields(self) -> dict[str, object]:
        """The fields of `line`, under the same names, as values (a JSON log line: `log.format: json`)."""
        out: dict[str, object] = {
            "dir": self.direction, "listener": self.listener, "client": self.client_addr, "orig_dst": self.orig_dst,
            "peer_id": None if self.peer_id is None else str(self.peer_id), "decision": str(self.decision),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "duration_ms": int((time.monotonic() - self.started) * 1000), "reason": str(self.reason),
        }  # fmt: skip
        if self.detail:
            out["detail"] = self.detail
        return out


def log_connection(rec: ConnRecord) -> None:
    """The connection's one log line, as `log.info` would emit it but without looking up the caller's source line
    (logging walks the stack for that on every call). The record's argument is `rec` itself: a text formatter
    writes `rec.line()`, a JSON one `rec.fields()`, each only when it formats."""
    if log.isEnabledFor(logging.INFO):
        log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (rec,), None, "log_connection"))


class Stats(SidecarMetrics):
    """The sidecar's metrics (`metrics.SidecarMetrics`, one registry) fed from connection records: `record` when a
    connection ends, `carried` when its relay starts, `accepted` when it is accepted. `connections`, `bytes` and
    `active` read the numbers back from the registry for readers in this process."""

    def accepted(self, direction: str) -> None:
        self.count_active(direction, 1)

    def carried(self, rec: ConnRecord, own: SpiffeId | None = None) -> None:
        self.count_opened(_identity(rec, own))

    def record(self, rec: ConnRecord, own: SpiffeId | None = None, *, was_open: bool = False) -> None:
        """Count an ended connection (`was_open`: it had been `accepted`, so it leaves the active gauge)."""
        if was_open:
            self.count_active(rec.direction, -1)
        self.count_closed(
            _identity(rec, own),
            rec.decision,
            rec.reason,
            received=rec.bytes_in,
            sent=rec.bytes_out,
            seconds=time.monotonic() - rec.started,
        )

    @property
    def connections(self) -> Counter[tuple[str, str, str]]:
        """Ended connections by (direction, decision, reason); the enums' members look up their text."""
        return Counter({(d, c, r): n for (d, c, r), n in self.tally(self.connections_total).items()})

    @property
    def bytes(self) -> Counter[tuple[str, str]]:
        """Bytes by (direction, "in" | "out"): received from the accepted side and sent back to it."""
        out: Counter[tuple[str, str]] = Counter()
        for side, metric in (("in", self.received_bytes), ("out", self.sent_bytes)):
            for key, count in self.tally(metric).items():
                out[(key[0], side)] += count
        return out

    @property
    def active(self) -> Counter[str]:
        return Counter({key[0]: n for key, n in self.tally(self.active_gauge).items()})


def _port_of(orig_dst: str) -> str:
    host, _, port = orig_dst.rpartition(":")
    return port if host and port.isdigit() else UNKNOWN


def _identity(rec: ConnRecord, own: SpiffeId | None) -> IdentityKey:
    peer = None if rec.peer_id is None else str(rec.peer_id)
    return identity_key(rec.direction, rec.decision, None if own is None else str(own), peer, _port_of(rec.orig_dst))


class Tracker:
    """Counts open connections for `max_connections` and tells the drain when the last one ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.draining = False
        self._idle = trio.Event()
        self._idle.set()

    def opened(self) -> None:
        self.active += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def closed(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True, slots=True)
class Runtime:
    """The one dependency bundle handed to every listener and handler."""

    config: Config
    credentials: CredentialSource
    orig_dst: OrigDstLookup = netio.original_dst
    dial: Dialer = netio.dial
    stats: Stats = field(default_factory=Stats)
    tracker: Tracker = field(default_factory=lambda: Tracker(10_000))
    recent: Recent = field(default_factory=Recent)  # open connections, last outcomes (admin GET /explain, /status)


Handler = Callable[[Runtime, trio.SocketStream, ConnRecord], Awaitable[None]]


def _own_id(rt: Runtime) -> SpiffeId | None:
    try:
        return rt.credentials.current.spiffe_id
    except RuntimeError:  # no SVID yet (identity mode before enrolment): nothing is served then anyway
        return None


def count_carried(rt: Runtime, rec: ConnRecord) -> None:
    """A handler's connection is carried from now on (upstream connected, handshakes done, the relay starts):
    counted as opened, with its identities (`mtlsmesh_tcp_connections_opened_total`)."""
    rt.stats.carried(rec, _own_id(rt))


async def _run_connection(rt: Runtime, handler: Handler, stream: trio.SocketStream, rec: ConnRecord) -> None:
    try:
        await handler(rt, stream, rec)
    except trio.Cancelled:
        rec.reason = Reason.DRAIN_TIMEOUT if rt.tracker.draining else Reason.CANCELLED
        raise
    except MeshError as exc:
        rec.reason, rec.detail = Reason.ERROR, str(exc)
    except Exception as exc:  # a bug: show its traceback, and keep serving everyone else
        rec.reason, rec.detail = Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"
        logging.getLogger("mtlsmesh").error("event=internal_error listener=%s", rec.listener, exc_info=True)
    finally:
        if stream.socket.fileno() != -1:
            with trio.CancelScope(shield=True):
                # Handlers close what they open; this catches what an error left open.
                await netio.abort_close(stream)
        rt.tracker.closed()
        rt.stats.record(rec, _own_id(rt), was_open=True)
        rt.recent.closed(rec)
        log_connection(rec)


async def serve_listener(
    rt: Runtime,
    listener: trio.SocketListener,
    name: str,
    direction: str,
    handler: Handler,
    connections: trio.Nursery,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever; run each connection in `connections` (a nursery that outlives the accept loop, so a drain
    can stop accepting and still let open connections finish)."""
    task_status.started()
    async with listener:
        # Accept on the plain socket: every connection waiting in the backlog in one go, waiting for readability
        # only when none is left (trio's accept takes a trip through the scheduler per connection).
        raw = netio.listening_socket(listener)
        try:
            in_a_row = 0
            while True:
                try:
                    accepted = netio.accept_ready(raw)
                except OSError as exc:  # EMFILE and friends: trio does not retry these; back off and go on
                    log.warning("event=accept_failed listener=%s error=%r", name, str(exc))
                    await trio.sleep(0.1)
                    continue
                if accepted is None:
                    in_a_row = 0
                    await trio.lowlevel.wait_readable(listener.socket)
                    continue
                stream, (host, port) = accepted
                rec = ConnRecord(direction, name, client_addr=unmapped_host_port(host, port))
                if rt.tracker.active >= rt.tracker.limit:
                    rec.reason, rec.detail = Reason.LIMIT, "max_connections reached"
                    await netio.abort_close(stream)  # an RST: its connect() succeeded against us
                    rt.stats.record(rec, _own_id(rt))
                    rt.recent.add(rec)
                    log_connection(rec)
                else:
                    rt.tracker.opened()
                    rt.stats.accepted(direction)
                    rt.recent.opened(rec)
                    connections.start_soon(_run_connection, rt, handler, stream, rec)
                in_a_row += 1
                if in_a_row >= ACCEPT_BURST:  # a backlog that never empties must not starve everyone else
                    in_a_row = 0
                    await trio.lowlevel.checkpoint()
        finally:
            raw.detach()
