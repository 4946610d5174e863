"""The sidecar's small HTTP endpoints: health (kubelet), metrics (Prometheus) and admin (loopback only).

What it does: `serve_http` answers one request per connection (`Connection: close`) with a bounded request size and a
read timeout, so garbage or a stalled client costs little. The health port is reachable from every pod and must
still answer the kubelet: its read timeout is short, a request is answered as soon as its request line is in, and
when every slot is taken a new connection pushes out the oldest one still waiting for its request.
`Endpoints` maps paths to answers: health `GET /healthz/ready` (200 once every listener is bound and credentials
are loaded, 503 before, while draining and while our SVID is expired); metrics `GET /stats/prometheus` (text
exposition written by hand); admin adds `GET /config_dump`, `GET /certs`, `GET /explain` and `GET /status`
(`admin_views`), `POST /drain` and `POST /logging?level=debug|info|warning|error`.

What it does not: keep-alive, chunked bodies, TLS, or anything a real HTTP server does beyond that. Never shows a key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from mtlsmesh import admin_views
from mtlsmesh import config as config_module
from mtlsmesh.conventions import LOG_LEVELS
from mtlsmesh.runtime import Runtime

log = logging.getLogger("mtlsmesh.admin")

MAX_REQUEST = 8192  # bytes of request line + headers; more is refused with 431
READ_TIMEOUT = 5.0  # seconds to send the whole request head
HEALTH_READ_TIMEOUT = 1.0  # the kubelet sends its probe at once (and itself gives up after 1 s by default)
LINGER = 1.0  # seconds to drain a client's unread bytes after answering
MAX_CLIENTS = 64  # concurrent HTTP connections per endpoint; more are closed at once

Response = tuple[int, str, bytes]  # status, content type, body
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}  # fmt: skip


@dataclass(slots=True)
class State:
    """What the endpoints report; the sidecar flips `ready` once everything is bound, and back when draining."""

    ready: bool = False
    draining: bool = False
    drain: trio.Event = field(default_factory=trio.Event)
    bound: dict[str, tuple[str, int]] = field(default_factory=dict)


def render_prometheus(rt: Runtime, state: State) -> bytes:
    """Counters in the Prometheus text exposition format (version 0.0.4)."""
    out = [
        "# HELP mtlsmesh_connections_total Connections handled, by direction, decision and reason.",
        "# TYPE mtlsmesh_connections_total counter",
    ]
    for (direction, decision, reason), count in sorted(rt.stats.connections.items()):
        out.append(
            f'mtlsmesh_connections_total{{direction="{direction}",decision="{decision}",reason="{reason}"}} {count}'
        )
    out += ["# HELP mtlsmesh_bytes_total Bytes relayed, by direction and side.", "# TYPE mtlsmesh_bytes_total counter"]
    for (direction, side), count in sorted(rt.stats.bytes.items()):
        out.append(f'mtlsmesh_bytes_total{{direction="{direction}",side="{side}"}} {count}')
    out += ["# HELP mtlsmesh_active_connections Open connections.", "# TYPE mtlsmesh_active_connections gauge"]
    for direction, count in sorted(rt.stats.active.items()):
        out.append(f'mtlsmesh_active_connections{{direction="{direction}"}} {count}')
    creds = rt.credentials
    out += [
        "# TYPE mtlsmesh_credential_reloads_total counter",
        f"mtlsmesh_credential_reloads_total {creds.reloads}",
        "# TYPE mtlsmesh_credential_reload_failures_total counter",
        f"mtlsmesh_credential_reload_failures_total {creds.reload_failures}",
        "# TYPE mtlsmesh_certificate_expiry_seconds gauge",
        f"mtlsmesh_certificate_expiry_seconds {creds.current.not_after.timestamp():.0f}",
        "# HELP mtlsmesh_svid_seconds_left Seconds until our SVID expires (0 once it has).",
        "# TYPE mtlsmesh_svid_seconds_left gauge",
        f"mtlsmesh_svid_seconds_left {max(0.0, (creds.current.not_after - datetime.now(UTC)).total_seconds()):.0f}",
        "# TYPE mtlsmesh_ready gauge",
        f"mtlsmesh_ready {int(state.ready)}",
    ]
    return ("\n".join(out) + "\n").encode()


class Endpoints:
    """Path → answer, for one of the three listeners (`kind`: health, metrics or admin)."""

    def __init__(self, rt: Runtime, state: State, kind: str) -> None:
        self.rt, self.state, self.kind = rt, state, kind

    def answer(self, method: str, target: str) -> Response:
        path, _, query = target.partition("?")
        if path == "/healthz/ready" and self.kind in ("health", "admin"):
            if method != "GET":
                return 405, "text/plain", b"use GET\n"
            if self.state.ready and self.rt.credentials.current.not_after <= datetime.now(UTC):
                # Every peer refuses an expired SVID: not ready until a reload brings a fresh one.
                return 503, "text/plain", b"certificate expired\n"
            if self.state.ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"draining\n" if self.state.draining else b"not ready\n"
        if path == "/stats/prometheus" and self.kind in ("metrics", "admin"):
            return 200, "text/plain; version=0.0.4", render_prometheus(self.rt, self.state)
        if self.kind != "admin":
            return 404, "text/plain", b"not found\n"
        if path == "/config_dump" and method == "GET":
            body = json.dumps(config_module.render_config(self.rt.config), indent=2, sort_keys=True)
            return 200, "application/json", body.encode() + b"\n"
        if path == "/explain" and method == "GET":
            return admin_views.explain_answer(self.rt, query)
        if path == "/status" and method == "GET":
            return admin_views.status_answer(self.rt, self.state.ready, self.state.draining, self.state.bound)
        if path == "/certs" and method == "GET":
            return 200, "application/json", json.dumps(self.rt.credentials.current.describe(), indent=2).encode()
        if path == "/drain" and method == "POST":
            self.state.drain.set()
            return 200, "text/plain", b"draining\n"
        if path == "/logging" and method == "POST":
            level = query.removeprefix("level=")
            if level not in LOG_LEVELS:
                return 400, "text/plain", f"level must be one of {', '.join(LOG_LEVELS)}\n".encode()
            logging.getLogger("mtlsmesh").setLevel(level.upper())
            return 200, "text/plain", f"log level {level}\n".encode()
        return 404, "text/plain", b"not found\n"


async def _read_head(stream: trio.abc.Stream, *, line_only: bool = False) -> bytes | None:
    """The request head up to the blank line (or, with `line_only`, the request line); None when too big."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer and not (line_only and b"\n" in buffer):
        if len(buffer) >= MAX_REQUEST:
            return None
        data = await stream.receive_some(MAX_REQUEST - len(buffer))
        if not data:
            break
        buffer += data
    return bytes(buffer)


def _respond(status: int, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _Clients:
    """The connections of one endpoint: at most `limit`; those still waiting for their request head can be pushed
    out, oldest first, to make room (idle connections must not lock the kubelet out)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.waiting: dict[int, trio.CancelScope] = {}  # insertion order: oldest first
        self.evicted = 0

    def admit(self) -> bool:
        if self.active >= self.limit:
            if not self.waiting:
                return False
            oldest = next(iter(self.waiting))
            self.waiting.pop(oldest).cancel()
            self.evicted += 1
        self.active += 1
        return True


async def _handle(stream: trio.SocketStream, endpoints: Endpoints, clients: _Clients | None = None) -> None:
    health = endpoints.kind == "health"  # only GET /healthz/ready there: the request line is all it takes
    try:
        waiting = trio.CancelScope()
        if clients is not None:
            clients.waiting[id(waiting)] = waiting
        try:
            with waiting, trio.move_on_after(HEALTH_READ_TIMEOUT if health else READ_TIMEOUT) as timer:
                head = await _read_head(stream, line_only=health)
        finally:
            if clients is not None:
                clients.waiting.pop(id(waiting), None)
        if waiting.cancelled_caught:
            return  # pushed out for a newer connection: closed without an answer
        if timer.cancelled_caught:
            response = _respond(408, "text/plain", b"request timeout\n")
        elif head is None:
            response = _respond(431, "text/plain", b"request too large\n")
        else:
            parts = head.split(b"\n", 1)[0].decode("latin-1").strip().split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
                response = _respond(400, "text/plain", b"bad request\n")
            else:
                response = _respond(*endpoints.answer(parts[0], parts[1]))
        with trio.move_on_after(READ_TIMEOUT):
            await stream.send_all(response)
            # Lingering close: closing with unread request bytes would send an RST that can destroy the response
            # in the client's buffer (a 431 answers before reading all). Half-close, then drain a little.
            await stream.send_eof()
            drained = 0
            with trio.move_on_after(LINGER):
                while drained < MAX_REQUEST * 8 and (data := await stream.receive_some(MAX_REQUEST)):
                    drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to answer
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http(
    listener: trio.SocketListener,
    endpoints: Endpoints,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve forever, one request per connection, at most MAX_CLIENTS at once (see `_Clients`)."""
    clients = _Clients(MAX_CLIENTS)
    task_status.started()
    async with listener, trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                log.warning("event=accept_failed listener=%s error=%r", endpoints.kind, str(exc))
                await trio.sleep(0.1)
                continue
            if not clients.admit():
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(_one, stream, endpoints, clients)


async def _one(stream: trio.SocketStream, endpoints: Endpoints, clients: _Clients) -> None:
    try:
        await _handle(stream, endpoints, clients)
    except Exception:  # a bug: show it, close this one, keep serving (an escaping error would end the sidecar)
        log.error("event=internal_error listener=%s", endpoints.kind, exc_info=True)
        await trio.aclose_forcefully(stream)
    finally:
        clients.active -= 1
