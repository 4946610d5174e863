"""`workers: N`: one supervisor and N worker processes serving the same relay listeners through SO_REUSEPORT.

What it does: `supervise` runs in the sidecar's own process. It reserves every relay listener's address (bound with
SO_REUSEPORT, never listening, so the kernel hands it no connection and port 0 is resolved once for all), starts N
workers (`python -m mtlsmesh sidecar --worker-fd FD`, a fresh interpreter each) and hands each, over its own
socketpair, the config, the reserved ports and the current SVID (chain, key and bundle: the key never touches a
disk). Each worker (`run_worker`) binds the relay listeners itself with SO_REUSEPORT and serves them with its own trio
loop and its own TLS contexts (`sidecar.serve_sidecar` with `ports`). The supervisor keeps the one credential
source (the file watcher and SIGHUP, or the identity agent and its CA calls) and sends every new generation to every
worker; it serves the one health, metrics and admin endpoint, and answers GET /status and GET /explain from what
every worker sends back when asked (`Fleet.collect`: open connections, recent outcomes). POST /drain and the log
level of POST /logging are sent to every worker; SIGTERM (or SIGINT) is passed on to each, which drains as a
single process would, and the supervisor waits for them (`timeouts.drain` and a grace period, then SIGKILL). A
worker that exits is logged and started again, after 0.5 s doubling to 30 s while it keeps dying soon after start
(a crash loop shows as `event=worker_exited` lines and `mtlsmesh_worker_restarts_total`). A worker dies with its
supervisor (the CLI sets PR_SET_PDEATHSIG), as a single process killed takes its listeners with it; that signal
follows the thread that forked the worker, so the supervisor forks from its main thread (`WorkerProcess`).
Without it, a worker whose channel reads end-of-file drains and exits.

Metrics: the workers run with `PROMETHEUS_MULTIPROC_DIR` set to a private directory the supervisor makes (on
/dev/shm when it is writable, else the temporary directory) and removes at exit; `metrics.SidecarMetrics.aggregate`
serves their sum.

What it does not: serve a connection (see `sidecar`), share a listening socket (each worker has its own accept
queue), or hand over open connections of a worker that dies (they are lost with it, as with a single process).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import Collector

from mtlsmesh import admin, expiry, handshake, netio, pem, sidecar, svid
from mtlsmesh.config import Config
from mtlsmesh.credentials import Credentials, CredentialSource
from mtlsmesh.errors import MeshError
from mtlsmesh.identity import TrustDomain
from mtlsmesh.recent import Recent
from mtlsmesh.runtime import Runtime, Tracker

log = logging.getLogger("mtlsmesh.workers")

DEFAULT_CAP = 2  # `workers: auto`: the CPUs the process may use (and its CPU quota allows), at most this many
START_TIMEOUT = 30.0  # seconds for a worker to import, bind and report ready
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0  # seconds before restarting a worker that exited; doubled while it keeps dying
STABLE_AFTER = 30.0  # a worker that lived this long is not crash-looping: its next restart waits BACKOFF_MIN again
STOP_GRACE = 5.0  # seconds past `timeouts.drain` the supervisor waits for its workers before SIGKILL
DRAIN_ACK_TIMEOUT = 5.0  # seconds to wait for the workers to close their listeners (POST /drain, SIGTERM)
SNAPSHOT_TIMEOUT = 1.0  # seconds GET /status and GET /explain wait for the workers' connections
# Open connections one worker lists in its answer, at most: the outcomes are bounded by `recent` (256 destinations of
# 8), so the answer stays far below MAX_MESSAGE however many connections a worker holds.
SNAPSHOT_OPEN_MAX = 10_000
FOLLOW_POLL = 0.2  # seconds between the supervisor's looks at the credential source and the log level
_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 16 * 1024 * 1024


def resolve(
    cfg: Config, cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """How many workers: the config's number, or for `auto` (0) the CPUs this process may run on, capped: the CPUs
    it may be scheduled on, and fewer when its cgroup's CPU quota (a pod's `resources.limits.cpu`) allows fewer."""
    if cfg.workers:
        return cfg.workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpus(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, min(cpus, DEFAULT_CAP))


def cgroup_cpus(root: Path, proc_cgroup: Path) -> int | None:
    """The CPUs this process's cgroup quota allows, rounded up (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), looked up at the process's own cgroup and then at the root a container sees; None when
    there is no quota or none can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths: dict[str, str] = {}  # controller ("" for v2's unified line) -> the process's cgroup path
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path.lstrip("/")
    v2 = [root / paths[""] / "cpu.max"] if "" in paths else []
    for cpu_max in [*v2, root / "cpu.max"]:
        with contextlib.suppress(OSError, ValueError, IndexError, ZeroDivisionError):
            fields = cpu_max.read_text().split()  # "max 100000", or "150000 100000": 1.5 CPUs
            return None if fields[0] == "max" else max(1, -(-int(fields[0]) // int(fields[1])))
    v1 = root / "cpu" / paths["cpu"] if "cpu" in paths else None
    for directory in [d for d in (v1, root / "cpu") if d is not None]:
        with contextlib.suppress(OSError, ValueError):
            quota_us = int((directory / "cpu.cfs_quota_us").read_text())
            period_us = int((directory / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 or period_us <= 0 else max(1, -(-quota_us // period_us))
    return None


# --- the channel between the supervisor and one worker ------------------------------------------------------------


class Channel:
    """Length-prefixed messages `(kind, payload)` over one end of a socketpair. Both ends are our own processes
    (the supervisor and the worker it started), so the payload is a pickle."""

    def __init__(self, sock: socket.socket) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buffer = bytearray()
        self._sending = trio.Lock()

    async def send(self, kind: str, payload: object = None) -> None:
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        async with self._sending:
            await self.stream.send_all(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> tuple[str, Any] | None:
        """The next message; None at end-of-file (the other process is gone)."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buffer)
                if length > MAX_MESSAGE:
                    raise ValueError(f"message of {length} bytes")
                if len(self._buffer) >= _LENGTH.size + length:
                    data = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
                    del self._buffer[: _LENGTH.size + length]
                    kind, payload = pickle.loads(data)
                    return str(kind), payload
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not chunk:
                return None
            self._buffer += chunk

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def credentials_message(current: Credentials) -> dict[str, bytes]:
    """One generation as PEM: what a worker builds its own TLS contexts from."""
    material = current.material
    return {
        "chain": pem.render_certificates(material.chain),
        "key": pem.render_private_key(material.key),
        "roots": pem.render_certificates(material.roots),
    }


def credentials_from_message(message: dict[str, bytes]) -> Credentials:
    """A worker's own `Credentials` (fresh SSL contexts) for a generation the supervisor checked already."""
    source = "the supervisor's credentials"
    chain = pem.parse_certificates(message["chain"], source)
    roots = pem.parse_certificates(message["roots"], source)
    key = pem.parse_private_key(message["key"], source)
    leaf = chain[0]
    material = handshake.Material(chain, key, roots)
    return Credentials(
        spiffe_id=svid.leaf_spiffe_id(leaf, source),
        material=material,
        server_context=handshake.build_context(material, handshake.Side.SERVER),
        client_context=handshake.build_context(material, handshake.Side.CLIENT),
        not_after=leaf.not_valid_after_utc,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        stamp=(),
    )


class SharedCredentials:
    """A worker's `CredentialSource`: the generations its supervisor sends (`update`); it fetches nothing."""

    def __init__(self, initial: Credentials, trust_domain: TrustDomain) -> None:
        self.current = initial
        self.trust_domain = trust_domain
        self.reloads = 0
        self.reload_failures = 0

    def update(self, message: dict[str, bytes]) -> None:
        try:
            fresh = credentials_from_message(message)
        except Exception as exc:  # the supervisor checked it; a failure here keeps the old one, loudly
            self.reload_failures += 1
            log.error("event=reload_refused reason=%r keeping=%s", str(exc), self.current.fingerprint)
            return
        self.current = fresh
        self.reloads += 1
        log.debug("event=credentials_received sha256=%s", fresh.fingerprint)

    async def serve_reload(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


# --- the worker -----------------------------------------------------------------------------------------------------


async def run_worker(fd: int, stop: trio.Event, configure: Callable[[Config], None]) -> None:
    """A worker's life: read the config, ports and SVID from the supervisor on `fd`, `configure` (logging), serve
    until `stop` (SIGTERM) or the supervisor's end, follow its messages meanwhile."""
    channel = Channel(socket.socket(fileno=fd))
    first = await channel.receive()
    if first is None or first[0] != "init":
        raise MeshError("the worker got no start message from its supervisor")
    init: dict[str, Any] = first[1]
    cfg: Config = init["config"]
    configure(cfg)
    credentials = SharedCredentials(credentials_from_message(init["credentials"]), cfg.trust_domain)
    index: int = init["index"]
    closed = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serve(*, task_status: trio.TaskStatus[tuple[Runtime, admin.State]]) -> None:
            await sidecar.serve_sidecar(
                cfg,
                credentials,
                stop=stop,
                ports=init["ports"],
                worker_index=index,
                closed=closed,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()

        rt, state = await nursery.start(serve)
        await channel.send("ready", os.getpid())
        nursery.start_soon(_follow, channel, credentials, rt, state, stop)
        nursery.start_soon(_report_closed, channel, closed)
    await channel.aclose()


async def _report_closed(channel: Channel, closed: trio.Event) -> None:
    """Tell the supervisor when the relay listeners are closed (drain or stop): it reports not-ready only once
    every worker has, so that nothing is accepted after health says 503."""
    await closed.wait()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await channel.send("closed")


async def _follow(
    channel: Channel, credentials: SharedCredentials, rt: Runtime, state: admin.State, stop: trio.Event
) -> None:
    while True:
        message = await channel.receive()
        if message is None:
            if not stop.is_set():
                log.warning("event=supervisor_gone action=drain")
                stop.set()
            return
        kind, payload = message
        if kind == "credentials":
            credentials.update(payload)
        elif kind == "drain":
            state.drain.set()
        elif kind == "log_level":
            logging.getLogger("mtlsmesh").setLevel(str(payload).upper())
        elif kind == "snapshot":  # GET /status or /explain on the supervisor: this worker's connections
            outcomes, open_rows = rt.recent.snapshot()
            reply = {"recent": (outcomes, open_rows[:SNAPSHOT_OPEN_MAX]), "active": dict(rt.stats.active)}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await channel.send("snapshot", (payload, reply))


# --- the supervisor -------------------------------------------------------------------------------------------------


class WorkerProcess:
    """One worker's process, started from the supervisor's main thread.

    Not `trio.lowlevel.open_process`: that forks from a thread of trio's thread cache, and PR_SET_PDEATHSIG (which
    the worker sets, `cli.sidecar.die_with_parent`) fires when the *thread* that forked the worker ends, not its
    process. trio ends a cached thread after it has been idle for 10 s, so every worker was SIGKILLed about 10 s
    after it started (and again after each restart) while its supervisor lived on: connections reset, and while
    both were down, refused. The main thread lives as long as the supervisor. `Popen` blocks the supervisor's loop
    while it forks and execs (0.3-0.4 ms measured); the exit is awaited on a pidfd (polled where there is none)."""

    POLL = 0.05  # seconds between looks at a worker's status without a pidfd

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._waiting = trio.Lock()
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # os.pidfd_open: Linux 5.3 and Python 3.9 on
            self._pidfd = os.pidfd_open(popen.pid)

    @classmethod
    def start(cls, argv: Sequence[str], *, pass_fds: Sequence[int], env: dict[str, str]) -> WorkerProcess:
        return cls(subprocess.Popen(argv, pass_fds=pass_fds, env=env))  # in this (the main) thread: see above

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Its exit status, once it has exited (and been reaped)."""
        async with self._waiting:
            while self.popen.poll() is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    await trio.sleep(self.POLL)
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return self.popen.returncode

    def send_signal(self, signum: int) -> None:
        if self.popen.returncode is None:
            self.popen.send_signal(signum)  # Popen checks, so a reaped pid is never signalled

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass(slots=True)
class _Pending:
    expected: int
    replies: list[dict[str, Any]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(slots=True)
class _Worker:
    index: int
    process: WorkerProcess
    channel: Channel
    started: float
    ready: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)  # its relay listeners are closed (after "drain")
    exited: trio.Event = field(default_factory=trio.Event)


def metrics_directory() -> str:
    """A private directory (0700) for the workers' metric files: on /dev/shm (memory) when it is writable."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK) else None
    try:
        return tempfile.mkdtemp(prefix="mtlsmesh-metrics-", dir=base)
    except OSError as exc:
        raise MeshError(f"workers: cannot make a directory for the workers' metrics: {exc.strerror or exc}") from exc


class Fleet:
    """The supervisor's workers: started, watched, restarted, told what changed, stopped."""

    def __init__(
        self, cfg: Config, credentials: CredentialSource, command: Sequence[str], ports: dict[str, int], path: str
    ) -> None:
        self.cfg, self.credentials, self.command, self.ports, self.path = cfg, credentials, command, ports, path
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self.stopping = False
        self.draining = False
        self._asked = itertools.count()
        self._pending: dict[int, _Pending] = {}  # snapshot requests waiting for the workers' answers

    async def collect(self) -> admin.WorkersView:
        """What every live worker has open and has seen lately, merged (GET /status, GET /explain): one request
        to each, answers awaited for SNAPSHOT_TIMEOUT at most (a busy or exiting worker is left out, and counted)."""
        asked = list(self.live())
        number = next(self._asked)
        pending = self._pending[number] = _Pending(len(asked))
        try:
            with trio.move_on_after(SNAPSHOT_TIMEOUT):  # the asking too: a worker that does not read holds no one
                for worker in asked:
                    try:
                        await worker.channel.send("snapshot", number)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pending.expected -= 1  # gone: not waited for
                if len(pending.replies) < pending.expected:
                    await pending.done.wait()
        finally:
            del self._pending[number]
        active: collections.Counter[str] = collections.Counter()
        for reply in pending.replies:
            active.update(reply["active"])
        recent = Recent.merge([reply["recent"] for reply in pending.replies])
        return admin.WorkersView(recent, active, asked=len(asked), answered=len(pending.replies))

    def live(self) -> Iterator[_Worker]:
        return (w for w in self.workers.values() if w.ready.is_set() and not w.exited.is_set())

    async def broadcast(self, kind: str, payload: object = None) -> None:
        for worker in list(self.live()):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await worker.channel.send(kind, payload)  # else it is exiting: its restart gets the current state

    async def drain(self) -> None:
        """POST /drain to every worker; back when each has closed its listeners (or DRAIN_ACK_TIMEOUT passed)."""
        draining = list(self.live())
        await self.broadcast("drain")
        await _wait_closed(draining)

    async def _spawn(self, index: int) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.path}
            argv = [part.replace("{fd}", str(child.fileno())) for part in self.command]
            process = WorkerProcess.start(argv, pass_fds=(child.fileno(),), env=env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker = _Worker(index, process, Channel(parent), trio.current_time())
        init = {
            "config": self.cfg,
            "ports": self.ports,
            "index": index,
            "credentials": credentials_message(self.credentials.current),
        }
        try:
            await worker.channel.send("init", init)
            await worker.channel.send("log_level", logging.getLevelName(logging.getLogger("mtlsmesh").level).lower())
            if self.draining:
                await worker.channel.send("drain")
        except (trio.BrokenResourceError, OSError):
            pass  # it died at once: seen as its exit
        return worker

    async def keep(self, index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run worker `index` until the fleet stops, restarting it when it exits. `task_status` is reported when
        the first one is ready; if the first one exits before that, the sidecar does not start (MeshError)."""
        backoff, first = BACKOFF_MIN, True
        while True:
            try:
                worker = self.workers[index] = await self._spawn(index)
            except OSError as exc:  # fork or exec refused (a pids limit, no memory): a sidecar error, not a crash
                if first:
                    raise MeshError(f"worker {index} could not be started: {exc.strerror or exc}") from exc
                log.warning("event=worker_start_failed worker=%d error=%r retry_in_s=%.1f", index, str(exc), backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                if self.stopping:
                    return
                continue
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, worker)
                nursery.start_soon(self._wait_exit, worker)
                if first:
                    with trio.move_on_after(START_TIMEOUT):
                        await _first_of(worker.ready, worker.exited)
                    if not worker.ready.is_set():
                        with trio.CancelScope(shield=True):
                            await _end(worker.process)
                        status = worker.process.returncode
                        raise MeshError(f"worker {index} did not start (exit status {status}); see its log above")
                    task_status.started()
                    first = False
                await worker.exited.wait()
                nursery.cancel_scope.cancel()
            await worker.channel.aclose()
            mark_process_dead(worker.process.pid, self.path)  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            lived = trio.current_time() - worker.started
            if lived >= STABLE_AFTER:
                backoff = BACKOFF_MIN
            self.restarts += 1
            log.warning(
                "event=worker_exited worker=%d pid=%d status=%s lived_s=%.1f restart_in_s=%.1f restarts=%d",
                index, worker.process.pid, worker.process.returncode, lived, backoff, self.restarts,
            )  # fmt: skip
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self.stopping:
                return

    async def _read(self, worker: _Worker) -> None:
        while (message := await worker.channel.receive()) is not None:
            if message[0] == "ready":
                worker.ready.set()
                log.info("event=worker_started worker=%d pid=%d", worker.index, worker.process.pid)
            elif message[0] == "closed":
                worker.closed.set()
            elif message[0] == "snapshot":
                number, reply = message[1]
                pending = self._pending.get(number)
                if pending is not None:
                    pending.replies.append(reply)
                    if len(pending.replies) >= pending.expected:
                        pending.done.set()

    async def _wait_exit(self, worker: _Worker) -> None:
        await worker.process.wait()
        worker.exited.set()

    async def terminate(self) -> None:
        """SIGTERM to every worker (each stops accepting and drains for `timeouts.drain`); back when each has
        closed its listeners (or DRAIN_ACK_TIMEOUT passed)."""
        self.stopping = True
        for worker in self.workers.values():
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        await _wait_closed(list(self.workers.values()))

    async def wait_stopped(self) -> None:
        """Wait for every worker to exit; SIGKILL what is left after `timeouts.drain` and STOP_GRACE."""
        with trio.move_on_after(self.cfg.timeouts.drain + STOP_GRACE):
            for worker in self.workers.values():
                await worker.process.wait()
        for worker in self.workers.values():
            if worker.process.returncode is None:
                log.warning("event=worker_killed worker=%d pid=%d", worker.index, worker.process.pid)
                worker.process.kill()
                await worker.process.wait()


async def _wait_closed(workers: list[_Worker]) -> None:
    with trio.move_on_after(DRAIN_ACK_TIMEOUT):
        for worker in workers:
            await _first_of(worker.closed, worker.exited)


async def _first_of(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


async def _end(process: WorkerProcess) -> None:
    if process.returncode is None:
        process.kill()
    await process.wait()


class _FleetCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self):  # type: ignore[no-untyped-def]  # prometheus_client's own signature is untyped
        yield GaugeMetricFamily(
            "mtlsmesh_workers",
            "Worker processes serving the relay listeners now.",
            value=sum(1 for _ in self.fleet.live()),
        )
        yield CounterMetricFamily(
            "mtlsmesh_worker_restarts", "Worker processes started again after they exited.", value=self.fleet.restarts
        )


async def supervise(
    cfg: Config,
    credentials: CredentialSource,
    count: int,
    command: Sequence[str],
    *,
    stop: trio.Event,
    admin_token: str | None = None,
    task_status: trio.TaskStatus[tuple[Runtime, admin.State, Fleet]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The supervisor: reserve, start `count` workers with `command` (`{fd}` stands for the channel's descriptor),
    serve the endpoints and the credentials, until `stop`; see the module docstring."""
    reservations: list[trio.socket.SocketType] = []
    endpoints: list[tuple[str, trio.SocketListener]] = []
    ports: dict[str, int] = {}
    state = admin.State(token=admin_token)
    sidecar.warn_admin_not_loopback(cfg)
    try:
        for item in sidecar.relay_plan(cfg):
            sockets = await sidecar.bind_sockets(item, reuse_port=True, listen=False)
            reservations.extend(sockets)
            host, port = sockets[0].getsockname()[:2]
            ports[item.name] = int(port)
            state.bound[item.name] = (str(host), int(port))
        for item in sidecar.endpoint_plan(cfg):
            for sock in await sidecar.bind_sockets(item):
                endpoints.append((item.name, trio.SocketListener(sock)))
                host, port = sock.getsockname()[:2]
                state.bound.setdefault(item.name, (str(host), int(port)))
        path = metrics_directory()
    except BaseException:
        for sock in reservations:
            sock.close()
        for _, listener in endpoints:
            await trio.aclose_forcefully(listener)
        raise
    try:
        fleet = Fleet(cfg, credentials, command, ports, path)
        state.workers = fleet.collect
        rt = Runtime(cfg, credentials, orig_dst=netio.original_dst, tracker=Tracker(cfg.max_connections))
        rt.stats.aggregate(path, _FleetCollector(fleet))
        async with trio.open_nursery() as top:
            top.start_soon(credentials.serve_reload)
            if cfg.svid_warning > 0:
                top.start_soon(expiry.watch_svid_life, credentials, cfg.svid_warning)
            for name, listener in endpoints:
                top.start_soon(admin.serve_http, listener, admin.Endpoints(rt, state, name))
            async with trio.open_nursery() as workers:
                for index in range(count):
                    await workers.start(fleet.keep, index)
                top.start_soon(_follow_source, fleet, credentials)
                state.ready = True
                pids = ",".join(str(w.process.pid) for w in fleet.workers.values())
                log.info(
                    "event=ready spiffe_id=%s workers=%d pids=%s listeners=%s",
                    credentials.current.spiffe_id,
                    count,
                    pids,
                    ",".join(f"{name}={host}:{port}" for name, (host, port) in state.bound.items()),
                )
                task_status.started((rt, state, fleet))
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(_set_when, stop, state.drain)
                    await state.drain.wait()
                    waiters.cancel_scope.cancel()
                if not stop.is_set():
                    log.info("event=draining via=admin workers=%d", count)
                    fleet.draining = True
                    await fleet.drain()
                    state.ready = False
                    state.draining = True
                    await stop.wait()
                log.info("event=draining workers=%d timeout_s=%s", count, cfg.timeouts.drain)
                await fleet.terminate()
                state.ready = False
                state.draining = True
                await fleet.wait_stopped()
                workers.cancel_scope.cancel()  # a restart waiting out its backoff is not started
            log.info("event=stopped")
            top.cancel_scope.cancel()
    finally:
        for sock in reservations:
            sock.close()
        shutil.rmtree(path, ignore_errors=True)


async def _follow_source(fleet: Fleet, credentials: CredentialSource) -> None:
    """Send every new generation of credentials, and every change of the log level, to every worker."""
    current, level = credentials.current, logging.getLogger("mtlsmesh").level
    while True:
        await trio.sleep(FOLLOW_POLL)
        if credentials.current is not current:
            current = credentials.current
            await fleet.broadcast("credentials", credentials_message(current))
            log.info("event=credentials_shared workers=%d sha256=%s", sum(1 for _ in fleet.live()), current.fingerprint)
        if logging.getLogger("mtlsmesh").level != level:
            level = logging.getLogger("mtlsmesh").level
            await fleet.broadcast("log_level", logging.getLevelName(level).lower())


async def _set_when(source: trio.Event, target: trio.Event) -> None:
    await source.wait()
    target.set()
