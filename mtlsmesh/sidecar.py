"""The sidecar process: build everything, bind every listener, then serve; drain on SIGTERM.

What it does: `prepare` validates the inputs (config already parsed, credentials loaded and checked) before anything
binds. `serve_sidecar` binds the outbound and inbound listeners, the explicit listeners and the health, metrics and
admin endpoints (a bind failure is a `ConfigError` naming the listener), reports ready, and serves. When `stop` is
set (SIGTERM) it stops accepting, reports not-ready, lets open connections finish for `timeouts.drain` seconds and
then cancels what is left. The admin's POST /drain stops accepting and reports not-ready too, but lets open
connections run to their end and keeps the process (and its endpoints) up until `stop`.

What it does not: parse flags (see `cli.sidecar`) or handle a connection (see `outbound`, `inbound`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from mtlsmesh import admin, expiry, inbound, netio, outbound
from mtlsmesh.config import Config, ExplicitMode, ListenAddr
from mtlsmesh.conventions import InterceptionMode
from mtlsmesh.credentials import CredentialSource
from mtlsmesh.errors import ConfigError
from mtlsmesh.runtime import Dialer, Handler, OrigDstLookup, Runtime, Tracker, serve_listener

log = logging.getLogger("mtlsmesh.sidecar")


@dataclass(frozen=True, slots=True)
class _Listen:
    name: str  # outbound, inbound, explicit name, health, metrics, admin
    path: str  # where in the config file it comes from, for bind errors
    addr: ListenAddr
    direction: str  # outbound / inbound / http
    handler: Handler | None  # None: an HTTP endpoint
    transparent: bool = False  # IP_TRANSPARENT: the inbound capture listener in TPROXY mode


def _plan(cfg: Config) -> list[_Listen]:
    plan: list[_Listen] = []
    if cfg.outbound.enabled:
        plan.append(_Listen("outbound", "outbound.listen", cfg.outbound.listen, "outbound", outbound.handle_outbound))
    if cfg.inbound.enabled:
        tproxy = cfg.inbound.interception_mode is InterceptionMode.TPROXY
        plan.append(_Listen("inbound", "inbound.listen", cfg.inbound.listen, "inbound", inbound.handle_inbound, tproxy))
    for index, entry in enumerate(cfg.explicit):
        handler: Handler
        if entry.mode is ExplicitMode.ORIGINATE:
            handler, direction = functools.partial(outbound.handle_outbound, explicit=entry), "outbound"
        else:
            handler, direction = functools.partial(inbound.handle_inbound, explicit=entry), "inbound"
        plan.append(_Listen(entry.name, f"explicit.{index}.listen", entry.listen, direction, handler))
    for name, addr in (("health", cfg.health_listen), ("metrics", cfg.metrics_listen), ("admin", cfg.admin_listen)):
        if addr is not None:
            plan.append(_Listen(name, f"{name}.listen", addr, "http", None))
    return plan


BACKLOG = 1024


# What socket()/bind() of `[::]` fail with when the kernel has no IPv6 (ipv6.disable=1, or no IPv6 module).
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL)


async def _bind(item: _Listen, *, reuse_port: bool = False) -> list[trio.SocketListener]:
    listeners = [trio.SocketListener(sock) for sock in await bind_sockets(item, reuse_port=reuse_port)]
    try:
        for listener in listeners:
            netio.set_keepalive(listener.socket)  # inherited by every accepted socket (netio.KEEPALIVE_*)
            if item.transparent:
                netio.set_transparent(listener.socket)
    except OSError as exc:
        for listener in listeners:
            listener.socket.close()
        raise ConfigError(
            "inbound.interception_mode",
            f"TPROXY needs a transparent listener, refused: {exc.strerror or exc} (the sidecar needs CAP_NET_ADMIN)",
        ) from exc
    return listeners


async def bind_sockets(item: _Listen, *, reuse_port: bool = False, listen: bool = True) -> list[trio.socket.SocketType]:
    """The one place the sidecar makes its listening sockets: `item.addr` bound (`[::]` dual-stack, falling back to
    0.0.0.0 without IPv6), listening unless `listen` is False. `reuse_port`: SO_REUSEPORT, so that the workers'
    sockets share one port (the kernel spreads new connections over those that listen; a socket bound but not
    listening, as the supervisor's reservation is, is given none). A failure is a `ConfigError` naming the listener."""
    try:
        if item.addr.host == "::":
            try:
                return [await _bind_dual_stack(item.addr.port, reuse_port, listen)]
            except OSError as exc:
                if exc.errno not in _NO_IPV6:
                    raise
                # `[::]` (the default) means "every address this pod has": without IPv6 that is 0.0.0.0.
                log.warning("event=ipv6_unavailable listener=%s error=%r listen=0.0.0.0:%d", item.name, str(exc),
                            item.addr.port)  # fmt: skip
        host = "0.0.0.0" if item.addr.host == "::" else item.addr.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [await _bind_one(family, host, item.addr.port, reuse_port, listen)]
    except OSError as exc:
        hint = " (address in use)" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(item.path, f"cannot listen on {item.addr}: {exc.strerror or exc}{hint}") from exc


async def _bind_one(family: int, host: str, port: int, reuse_port: bool, listen: bool) -> trio.socket.SocketType:
    """One socket on `host:port`. `[::]` serves IPv4 too (IPV6_V6ONLY off; trio's own listeners set it on): one
    capture port for both families. IPv4 clients then show up as ::ffff:a.b.c.d, which `netio.original_dst` sees
    through. Any other IPv6 address is IPv6 only."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def _bind_dual_stack(port: int, reuse_port: bool = False, listen: bool = True) -> trio.socket.SocketType:
    return await _bind_one(socket.AF_INET6, "::", port, reuse_port, listen)


def warn_admin_not_loopback(cfg: Config) -> None:
    if cfg.admin_listen is not None and not ipaddress.ip_address(cfg.admin_listen.host).is_loopback:
        log.warning(
            "event=admin_not_loopback listen=%s hint=%r",
            cfg.admin_listen,
            "every host that reaches this address can read the config and the certificates",
        )


def relay_plan(cfg: Config) -> list[_Listen]:
    """The listeners that carry connections (outbound, inbound, explicit): what each worker binds."""
    return [item for item in _plan(cfg) if item.handler is not None]


def endpoint_plan(cfg: Config) -> list[_Listen]:
    """The HTTP endpoints (health, metrics, admin): served once, by the supervisor when there are workers."""
    return [item for item in _plan(cfg) if item.handler is None]


async def serve_sidecar(
    cfg: Config,
    credentials: CredentialSource,
    *,
    stop: trio.Event | None = None,
    orig_dst: OrigDstLookup = netio.original_dst,
    dial: Dialer = netio.dial,
    admin_token: str | None = None,
    ports: Mapping[str, int] | None = None,
    worker_index: int = 0,
    closed: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[Runtime, admin.State]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind everything, report `(runtime, state)` through `task_status` (`state.bound` has the real ports), serve
    until `stop` is set, then drain and return. The admin's POST /drain drains at once but returns only at `stop`
    (without a `stop` event, the drain is the end). `admin_token`: what the admin port's POSTs must present.

    `ports` makes this a worker (`workers`): only the relay listeners, each on the port named there (what the
    supervisor reserved), with SO_REUSEPORT, counting its connections as worker `worker_index`; no HTTP endpoints
    and no SVID-life warning (the supervisor has those); a setter of `state.drain` stands for POST /drain.
    `closed` is set once the relay listeners are closed (drain or stop)."""
    worker = ports is not None
    rt = Runtime(cfg, credentials, orig_dst=orig_dst, dial=dial, tracker=Tracker(cfg.max_connections))
    if worker:
        rt.stats.as_worker(worker_index)
    state = admin.State(token=admin_token)
    if not worker:  # said once, by the process that owns the config (a supervisor, or the only process)
        warn_admin_not_loopback(cfg)
        for warning in cfg.inbound.warnings():
            log.warning("event=config_warning detail=%r", warning)
    bound: list[tuple[_Listen, list[trio.SocketListener]]] = []
    try:
        plan = _plan(cfg)
        if ports is not None:
            plan = [
                dataclasses.replace(item, addr=ListenAddr(item.addr.host, ports[item.name])) for item in relay_plan(cfg)
            ]
        for item in plan:
            listeners = await _bind(item, reuse_port=worker)
            bound.append((item, listeners))
            host, port = listeners[0].socket.getsockname()[:2]
            state.bound[item.name] = (str(host), int(port))
    except BaseException:
        for _, listeners in bound:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        raise

    async with trio.open_nursery() as top:
        top.start_soon(credentials.serve_reload)
        if cfg.svid_warning > 0 and not worker:
            top.start_soon(expiry.watch_svid_life, credentials, cfg.svid_warning)
        for item, listeners in bound:
            if item.handler is None:
                for listener in listeners:
                    top.start_soon(admin.serve_http, listener, admin.Endpoints(rt, state, item.name))
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for item, listeners in bound:
                    if item.handler is not None:
                        for listener in listeners:
                            accepting.start_soon(
                                serve_listener, rt, listener, item.name, item.direction, item.handler, connections
                            )
                state.ready = True
                log.info(
                    "event=%s spiffe_id=%s listeners=%s",
                    "worker_ready" if worker else "ready",
                    credentials.current.spiffe_id,
                    ",".join(f"{name}={host}:{port}" for name, (host, port) in state.bound.items()),
                )
                task_status.started((rt, state))
                async with trio.open_nursery() as waiters:
                    if stop is not None:
                        waiters.start_soon(_set_when, stop, state.drain)
                    await state.drain.wait()
                    waiters.cancel_scope.cancel()
                state.ready = False
                state.draining = True
                rt.tracker.draining = True
                accepting.cancel_scope.cancel()  # closes the listeners: new connections are refused by the kernel
            if closed is not None:
                closed.set()
            if stop is not None and not stop.is_set():
                # POST /drain: open connections finish in their own time, the endpoints keep answering (health
                # 503), and the process waits for SIGTERM, which gives what is still open `timeouts.drain`.
                log.info("event=draining via=admin open=%d", rt.tracker.active)
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(_log_when_idle, rt)
                    await stop.wait()
                    waiters.cancel_scope.cancel()
            log.info("event=draining open=%d timeout_s=%s", rt.tracker.active, cfg.timeouts.drain)
            with trio.move_on_after(cfg.timeouts.drain):
                await rt.tracker.wait_idle()
            connections.cancel_scope.cancel()
        log.info("event=stopped")
        top.cancel_scope.cancel()


async def _log_when_idle(rt: Runtime) -> None:
    await rt.tracker.wait_idle()
    log.info("event=drained open=0")


async def _set_when(source: trio.Event, target: trio.Event) -> None:
    await source.wait()
    target.set()
