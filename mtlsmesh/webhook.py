"""The admission webhook's server: HTTPS on one port, every request answered by `admission`, one log line each.

What it does: `serve_webhook` binds its listener, then accepts connections (at most `max_connections` at once; more
are closed at once) and gives each a TLS 1.3 handshake with the serving certificate that is current at that moment,
then an HTTP/1.1 keep-alive loop (`http11.serve_connection`, bounded in head and body size and in time). The
certificate comes from a `credentials.CredentialStore`, polled and reloaded as the sidecar's is (a Secret's symlink
swap included): new handshakes use the new certificate, open connections keep theirs, a bad new file is refused and
logged while the old one keeps serving. The TLS server is `handshake.build_context` with ALPN `http/1.1` and no
client certificate required, which is what the API server (and curl, and kubelet probes) speak. Each request is
answered by `admission.answer` and logged on one key=value line (`mtlsmesh.webhook`: client, uid, pod, decision,
reason, detail, duration); a request the HTTP layer refuses (too large, too slow, not HTTP) is answered and logged
the same way. No error of one connection, the review's own included, stops the server: a bug in a review is a 500
and a traceback in the log, and the next request is served. When `stop` is set the listener closes and open
connections get `drain` seconds to finish.

What it does not: decide anything about a review (see `admission`), parse flags or files (see `cli.webhook`), or
verify who the client is: the API server authenticates the webhook by its certificate, not the other way round.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field

import trio
from OpenSSL import SSL

from mtlsmesh import admission, http11
from mtlsmesh.addresses import unmapped_host_port
from mtlsmesh.config import ListenAddr
from mtlsmesh.credentials import Credentials, CredentialStore
from mtlsmesh.errors import ConfigError, HandshakeError
from mtlsmesh.handshake import Side, build_context
from mtlsmesh.inject import InjectOptions
from mtlsmesh.runtime import render_kv
from mtlsmesh.tls import TLSStream

log = logging.getLogger("mtlsmesh.webhook")

# The largest body the API server itself accepts for a request (kube-apiserver's MaxRequestBodyBytes, 3 MiB): an
# AdmissionReview wraps one such object, and the API server sends no `oldObject` on CREATE.
MAX_BODY = 3 * 1024 * 1024
LIMITS = http11.Limits(max_head=16 * 1024, max_body=MAX_BODY, read_timeout=10.0, max_requests=1000)
HTTP_ALPN = (b"http/1.1",)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    listen: ListenAddr
    options: InjectOptions = field(default_factory=InjectOptions)
    limits: http11.Limits = LIMITS
    max_connections: int = 256
    handshake_timeout: float = 10.0
    drain: float = 5.0  # seconds open connections get to finish after `stop`


class ServingContext:
    """The TLS server context for the store's current credentials, built once per generation: a reload makes a new
    `Credentials`, and the next handshake gets a context built from it."""

    def __init__(self, store: CredentialStore) -> None:
        self._store = store
        self._built: tuple[Credentials, SSL.Context] | None = None

    def current(self) -> SSL.Context:
        credentials = self._store.current
        if self._built is None or self._built[0] is not credentials:
            context = build_context(credentials.material, Side.SERVER, alpn=HTTP_ALPN, require_peer_certificate=False)
            self._built = (credentials, context)
        return self._built[1]


@dataclass(slots=True)
class _Server:
    settings: WebhookSettings
    context: ServingContext
    active: int = 0
    idle: trio.Event = field(default_factory=trio.Event)


async def serve_webhook(
    settings: WebhookSettings,
    credentials: CredentialStore,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, report the bound `(host, port)` through `task_status`, serve until `stop` is set, then drain."""
    listener = await _bind(settings.listen)
    server = _Server(settings, ServingContext(credentials))
    server.idle.set()
    server.context.current()  # a certificate OpenSSL refuses fails here, before the first client does
    host, port = listener.socket.getsockname()[:2]
    async with trio.open_nursery() as top:
        top.start_soon(credentials.serve_reload)
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(_accept, server, listener, connections)
                log.info(
                    "event=listening address=%s spiffe_id=%s sha256=%s",
                    unmapped_host_port(str(host), int(port)),
                    credentials.current.spiffe_id,
                    credentials.current.fingerprint,
                )
                task_status.started((str(host), int(port)))
                await (stop if stop is not None else trio.Event()).wait()
                accepting.cancel_scope.cancel()
            log.info("event=draining open=%d timeout_s=%s", server.active, settings.drain)
            with trio.move_on_after(settings.drain):
                await server.idle.wait()
            connections.cancel_scope.cancel()
        top.cancel_scope.cancel()
    log.info("event=stopped")


async def _bind(addr: ListenAddr) -> trio.SocketListener:
    try:
        listeners = await trio.open_tcp_listeners(addr.port, host=addr.host)
    except OSError as exc:
        hint = " (address in use)" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError("--listen", f"cannot listen on {addr}: {exc.strerror or exc}{hint}") from exc
    for extra in listeners[1:]:  # one address was asked for; a name resolving to several gets the first
        await trio.aclose_forcefully(extra)
    return listeners[0]


async def _accept(server: _Server, listener: trio.SocketListener, connections: trio.Nursery) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off and go on accepting
                log.warning("event=accept_failed error=%r", str(exc))
                await trio.sleep(0.1)
                continue
            if server.active >= server.settings.max_connections:
                log.warning("event=connection_refused reason=limit max_connections=%d", server.settings.max_connections)
                await trio.aclose_forcefully(stream)
                continue
            server.active += 1
            server.idle = trio.Event() if server.idle.is_set() else server.idle
            connections.start_soon(_connection, server, stream)


async def _connection(server: _Server, stream: trio.SocketStream) -> None:
    try:
        host, port = stream.socket.getpeername()[:2]
        client = unmapped_host_port(str(host), int(port))
    except OSError:
        client = "-"
    tls: TLSStream | None = None
    try:
        tls = TLSStream(stream, server.context.current(), Side.SERVER, peer=client)
        with trio.move_on_after(server.settings.handshake_timeout) as timer:
            try:
                await tls.do_handshake()
            except HandshakeError as exc:
                log.info("%s", render_kv({"event": "handshake_failed", "client": client, "detail": exc.reason}))
                return
        if timer.cancelled_caught:
            log.info("event=handshake_timeout client=%s", client)
            return

        async def handle(request: http11.Request) -> http11.Response:
            return _respond(request, client, server.settings.options)

        def refuse(status: int, message: str) -> http11.Response:
            return _log_and_render(admission.refusal(status, message), client, time.monotonic())

        await http11.serve_connection(tls, handle, server.settings.limits, refuse)
    except Exception:  # a bug in one connection must not end the server: log it, close, serve the others
        log.error("event=internal_error client=%s", client, exc_info=True)
    finally:
        await trio.aclose_forcefully(tls if tls is not None else stream)
        server.active -= 1
        if server.active == 0:
            server.idle.set()


def _respond(request: http11.Request, client: str, options: InjectOptions) -> http11.Response:
    started = time.monotonic()
    try:
        answer = admission.answer(request.method, request.path, request.header("content-type"), request.body, options)
    except Exception as exc:  # a bug in a review: a 500 (the API server applies failurePolicy) and the traceback
        log.error("event=internal_error client=%s path=%s", client, request.path, exc_info=True)
        answer = admission.internal_error(f"{type(exc).__name__}: {exc}")
    return _log_and_render(answer, client, started)


def _log_and_render(answer: admission.Answer, client: str, started: float) -> http11.Response:
    if answer.decision is not None:  # the health path is not a review: the kubelet's probes are not logged
        fields: dict[str, object] = {"client": client, "status": answer.status, **answer.log_fields()}
        detail = fields.pop("detail", None)  # free text goes last, as on the sidecar's connection lines
        fields["duration_ms"] = int((time.monotonic() - started) * 1000)
        if detail:
            fields["detail"] = detail
        log.info("%s", render_kv(fields))
    return http11.Response(answer.status, answer.body, answer.content_type, answer.headers)
