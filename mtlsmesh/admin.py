"""The sidecar's small HTTP endpoints: health (kubelet), metrics (Prometheus) and admin (loopback only).

What it does: `serve_http` answers one request per connection (`Connection: close`) with a bounded request size and a
read timeout, so garbage or a stalled client costs little. The health port is reachable from every pod and must
still answer the kubelet: its read timeout is short, a request is answered as soon as its request line is in, and
when every slot is taken a new connection pushes out the oldest one still waiting for its request.
`Endpoints` maps paths to answers: health `GET /healthz/ready` (`readiness`: 200 once every listener is bound and
credentials are loaded, 503 before, while draining and while our SVID is expired); metrics `GET /stats/prometheus`
(`metrics.SidecarMetrics`, rendered by prometheus_client; its readiness gauge asks `readiness` too); admin adds
`GET /config_dump`, `GET /certs`, `GET /explain` and `GET /status` (`admin_views`), `POST /drain` and
`POST /logging?level=debug|info|warning|error`.

The admin port is guarded against the other processes and browsers of the host (docs/ARCHITECTURE.md §9): a
request with an `Origin` header, or with a `Host` that is neither a loopback name nor the listener's own address,
is refused (403: DNS rebinding, cross-site requests); a POST needs `Authorization: Bearer <token>`, the per-process
token the sidecar wrote to a file only its uid can read (`write_token`). A wrong method on a known path is 405 with
`Allow`; the query string is parsed as one (`a=1&b=2`), unknown parameters ignored, a repeated one refused.

What it does not: keep-alive, chunked bodies, TLS, or anything a real HTTP server does beyond that. Never shows a key.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import trio

from mtlsmesh import admin_views, metrics
from mtlsmesh import config as config_module
from mtlsmesh.conventions import LOG_LEVELS
from mtlsmesh.errors import ConfigError
from mtlsmesh.recent import Recent
from mtlsmesh.runtime import Runtime

log = logging.getLogger("mtlsmesh.admin")

MAX_REQUEST = 8192  # bytes of request line + headers; more is refused with 431
READ_TIMEOUT = 5.0  # seconds to send the whole request head
HEALTH_READ_TIMEOUT = 1.0  # the kubelet sends its probe at once (and itself gives up after 1 s by default)
LINGER = 1.0  # seconds to drain a client's unread bytes after answering
MAX_CLIENTS = 64  # concurrent HTTP connections per endpoint; more are closed at once
TOKEN_BYTES = 32  # of randomness in the admin token (secrets.token_urlsafe: 43 characters)
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
_FROM_WORKERS = frozenset({"/status", "/explain"})  # answered from the workers' connections under a supervisor

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, "text/plain", text.encode() + b"\n", headers)


@dataclass(frozen=True, slots=True)
class WorkersView:
    """The workers' connections, merged by their supervisor (`workers.Fleet.collect`): what GET /status and
    GET /explain answer from instead of the supervisor's own (empty) ones. `answered` of `asked` workers replied."""

    recent: Recent
    active: Counter[str]
    asked: int
    answered: int


@dataclass(slots=True)
class State:
    """What the endpoints report; the sidecar flips `ready` once everything is bound, and back when draining.
    `token`: what a POST to the admin port must present (None: POSTs are refused). `workers`: set by a supervisor,
    how to ask its workers for their connections (`WorkersView`)."""

    ready: bool = False
    draining: bool = False
    drain: trio.Event = field(default_factory=trio.Event)
    bound: dict[str, tuple[str, int]] = field(default_factory=dict)
    token: str | None = None
    workers: Callable[[], Awaitable[WorkersView]] | None = None


def readiness(rt: Runtime, state: State) -> Response:
    """The answer of `/healthz/ready`, and the one function the `mtlsmesh_ready` gauge is computed from."""
    if state.ready and rt.credentials.current.not_after <= datetime.now(UTC):
        # Every peer refuses an expired SVID: not ready until a reload brings a fresh one.
        return _text(503, "certificate expired")
    if state.ready:
        return _text(200, "ready")
    return _text(503, "draining" if state.draining else "not ready")


def watch(rt: Runtime, state: State) -> None:
    """Let the metrics' scrape-time gauges ask this sidecar (readiness as `/healthz/ready` answers it, the SVID,
    the reload counters)."""

    def not_after() -> datetime | None:
        try:
            return rt.credentials.current.not_after
        except RuntimeError:  # identity mode before enrolment: no SVID yet
            return None

    rt.stats.live = metrics.Live(
        ready=lambda: readiness(rt, state).status == 200,
        not_after=not_after,
        reloads=lambda: rt.credentials.reloads,
        reload_failures=lambda: rt.credentials.reload_failures,
    )


def render_prometheus(rt: Runtime, state: State) -> bytes:
    """The text exposition format (0.0.4) of the sidecar's registry, its gauges computed for `state` now."""
    watch(rt, state)
    return rt.stats.render()


def current_log_level() -> str:
    """The mesh logger's level now (POST /logging changes it), as the config spells levels."""
    return logging.getLevelName(logging.getLogger("mtlsmesh").getEffectiveLevel()).lower()


def write_token(path: str | os.PathLike[str]) -> str:
    """A fresh admin token, written to `path` (mode 0600, our uid: the proxy's, 1337, in a pod) through a temporary
    file renamed into place; its directory is made (0700) when missing. Raises ConfigError naming the path."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}")
    if target.parent.exists() and not target.parent.is_dir():
        raise ConfigError("--admin-token-file", f"cannot write {target}: {target.parent} is not a directory")
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, token.encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise ConfigError("--admin-token-file", f"cannot write {target}: {exc.strerror or exc}") from exc
    return token


def remove_token(path: str | os.PathLike[str], token: str) -> None:
    """Remove the token file at exit, unless another process has written its own there since."""
    target = Path(path)
    try:
        if target.read_text().strip() == token:
            target.unlink()
    except OSError:
        pass


def _host_name(host: str) -> str:
    """The name or address of a Host header, without its port and brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback_host(host: str, own: str | None = None) -> bool:
    """Whether a Host header names this machine's loopback (`localhost`, 127/8, ::1) or `own`, the address the
    admin listener is bound to: what a DNS-rebinding page can never send, since its Host is the attacker's name."""
    name = _host_name(host.strip()).lower()
    if name in LOOPBACK_NAMES or (own is not None and name == own.lower()):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercase; a repeated header is refused before this is built
    view: WorkersView | None = None  # a supervisor's GET /status and /explain: its workers' connections


Route = Callable[["Endpoints", Request], Response]


class Endpoints:
    """Path → answer, for one of the three listeners (`kind`: health, metrics or admin)."""

    def __init__(self, rt: Runtime, state: State, kind: str) -> None:
        self.rt, self.state, self.kind = rt, state, kind
        if kind in ("metrics", "admin"):
            watch(rt, state)

    def routes(self) -> dict[str, dict[str, Route]]:
        """path → method → answer, for this kind of endpoint."""
        table: dict[str, dict[str, Route]] = {}
        if self.kind in ("health", "admin"):
            table["/healthz/ready"] = {"GET": Endpoints._ready}
        if self.kind in ("metrics", "admin"):
            table["/stats/prometheus"] = {"GET": Endpoints._prometheus}
        if self.kind == "admin":
            table["/config_dump"] = {"GET": Endpoints._config_dump}
            table["/certs"] = {"GET": Endpoints._certs}
            table["/explain"] = {"GET": Endpoints._explain}
            table["/status"] = {"GET": Endpoints._status}
            table["/drain"] = {"POST": Endpoints._drain}
            table["/logging"] = {"POST": Endpoints._logging}
        return table

    def wants_workers(self, method: str, target: str) -> bool:
        """Whether this request is answered from the workers' connections, which a supervisor must ask for first."""
        path = target.partition("?")[0]
        return self.kind == "admin" and self.state.workers is not None and method == "GET" and path in _FROM_WORKERS

    def answer(
        self, method: str, target: str, headers: dict[str, str] | None = None, view: WorkersView | None = None
    ) -> Response:
        path, _, query_text = target.partition("?")
        methods = self.routes().get(path)
        if methods is None:
            return _text(404, "not found")
        headers = headers or {}
        refused = self._guard(headers) if self.kind == "admin" else None
        if refused is not None:
            return refused
        route = methods.get(method)
        if route is None:
            allowed = ", ".join(methods)
            return _text(405, f"use {allowed}", (("Allow", allowed),))
        refused = self._authorize(headers) if method == "POST" else None
        if refused is not None:
            return refused
        query = parse_qs(query_text, keep_blank_values=True)
        repeated = sorted(name for name, values in query.items() if len(values) > 1)
        if repeated:
            return _text(400, f"the query parameter {repeated[0]} is given more than once")
        return route(self, Request(method, path, query, headers, view))

    def _guard(self, headers: dict[str, str]) -> Response | None:
        """The admin port's refusals of any request: cross-origin (a browser's), a foreign Host (DNS rebinding)."""
        if "origin" in headers:
            log.warning("event=admin_refused reason=origin origin=%r", headers["origin"][:200])
            return _text(403, "requests with an Origin header are refused (the admin port is not for browsers)")
        host = headers.get("host")
        own = self.state.bound.get("admin", (None, 0))[0]
        if host is not None and not is_loopback_host(host, own):
            log.warning("event=admin_refused reason=host host=%r", host[:200])
            return _text(403, "the Host header must name the loopback (localhost, 127.0.0.1, [::1])")
        return None

    def _authorize(self, headers: dict[str, str]) -> Response | None:
        """A POST changes the sidecar: it needs the per-process token (`Authorization: Bearer`)."""
        token = self.state.token
        if token is None:
            return _text(403, "POST is disabled: the sidecar has no admin token (see --admin-token-file)")
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return _text(401, "POST needs Authorization: Bearer <admin token>", (("WWW-Authenticate", "Bearer"),))
        if not hmac.compare_digest(presented.strip().encode(), token.encode()):
            log.warning("event=admin_refused reason=token")
            return _text(403, "wrong admin token")
        return None

    def _ready(self, request: Request) -> Response:
        return readiness(self.rt, self.state)

    def _prometheus(self, request: Request) -> Response:
        return Response(200, metrics.CONTENT_TYPE, self.rt.stats.render())

    def _config_dump(self, request: Request) -> Response:
        dump = config_module.render_config(self.rt.config)
        dump["log"] = {**dump.get("log", {}), "level": current_log_level()}  # POST /logging may have changed it
        return Response(200, "application/json", json.dumps(dump, indent=2, sort_keys=True).encode() + b"\n")

    def _certs(self, request: Request) -> Response:
        return Response(200, "application/json", json.dumps(self.rt.credentials.current.describe(), indent=2).encode())

    def _explain(self, request: Request) -> Response:
        recent = None if request.view is None else request.view.recent
        return Response(*admin_views.explain_answer(self.rt, urlencode(request.query, doseq=True), recent))

    def _status(self, request: Request) -> Response:
        state, view = self.state, request.view
        if view is None:
            return Response(*admin_views.status_answer(self.rt, state.ready, state.draining, state.bound))
        workers = {"asked": view.asked, "answered": view.answered}
        return Response(*admin_views.status_answer(self.rt, state.ready, state.draining, state.bound, view.recent,
                                                   view.active, workers))  # fmt: skip

    def _drain(self, request: Request) -> Response:
        if not self.state.drain.is_set():
            log.info("event=drain_requested via=admin")
        self.state.drain.set()
        return _text(200, "draining")

    def _logging(self, request: Request) -> Response:
        level = request.query.get("level", [""])[0]
        if level not in LOG_LEVELS:
            return _text(400, f"level must be one of {', '.join(LOG_LEVELS)}")
        logging.getLogger("mtlsmesh").setLevel(level.upper())
        log.warning("event=log_level level=%s via=admin", level)  # warning: seen at every level
        return _text(200, f"log level {level}")


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


def _respond(response: Response) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
    head = (
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
        f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + response.body


def _parse_headers(lines: list[str]) -> dict[str, str] | None:
    """Header lines to {lowercase name: value}; None for a malformed line or a repeated header (two Host headers
    must not let one pass the check and the other be used)."""
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            break
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or " " in name or name in headers:
            return None
        headers[name] = value.strip()
    return headers


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
        bad = _text(400, "bad request")  # a request line or header line that is not HTTP
        if timer.cancelled_caught:
            response = _respond(_text(408, "request timeout"))
        elif head is None:
            response = _respond(_text(431, "request too large"))
        else:
            lines = [line.rstrip("\r") for line in head.decode("latin-1").split("\n")]
            parts = lines[0].strip().split(" ")
            headers = {} if health else _parse_headers(lines[1:])  # health reads the request line alone
            line_ok = len(parts) == 3 and parts[2].startswith("HTTP/1.") and parts[1].startswith("/")
            if not line_ok or headers is None:
                response = _respond(bad)
            else:
                view = None
                if endpoints.wants_workers(parts[0], parts[1]) and endpoints.state.workers is not None:
                    view = await endpoints.state.workers()
                response = _respond(endpoints.answer(parts[0], parts[1], headers, view))
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
