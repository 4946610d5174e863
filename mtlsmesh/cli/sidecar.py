"""`mtlsmesh sidecar`: run the outbound and inbound sidecar of one pod.

Every flag may also come from the environment (MTLSMESH_CONFIG, MTLSMESH_CERT, ...); a flag beats its variable, and
both beat the config file. Everything is validated (config, flags, credentials) before any listener binds; a bad
input is one line `mtlsmesh: error: ...` and exit status 2. Logs go to stderr, one key=value line per connection.

Signals: SIGTERM and SIGINT drain and stop; SIGHUP reloads the SVID files now (file mode), or in identity mode
renews the SVID from the CA service now (before the first SVID it logs that enrolment is still retrying). The admin
port's POST token is written at start to `--admin-token-file` (mode 0600, our uid) and removed at exit.

What it does not: serve connections (see `sidecar`, which this module hands the validated config to).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import sys
import time
from typing import TYPE_CHECKING

import prometheus_client
import trio

from mtlsmesh import admin, relay
from mtlsmesh.cli import stop_on_signals, unwrap_mesh_errors
from mtlsmesh.config import Config, CredentialFiles, Mode, load_config
from mtlsmesh.conventions import ADMIN_TOKEN_FILE, LOG_FORMAT, LOG_FORMATS, LOG_LEVELS, InterceptionMode
from mtlsmesh.credentials import CredentialSource, CredentialStore
from mtlsmesh.errors import ConfigError
from mtlsmesh.identity import parse_trust_domain
from mtlsmesh.sidecar import serve_sidecar

if TYPE_CHECKING:
    from mtlsmesh.agent import IdentityAgent

# Identity mode (`agent`, with the CA client and HTTP/1.1) and the workers' supervisor are imported only by a sidecar
# that uses them: what an idle sidecar costs in memory is mostly the code it has loaded.

# glibc malloc: blocks at least this big get their own mmap, and free memory above this much at the top of the heap
# is handed back to the kernel (mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; see tune_malloc()).
MALLOC_MMAP_THRESHOLD = 2 * relay.CHUNK
MALLOC_TRIM_THRESHOLD = 4 * relay.CHUNK
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
GC_YOUNG_THRESHOLD = 7000  # gc.set_threshold's first value; Python's default is 700 (see run())

# flag dest → environment variable
ENV = {
    "config": "MTLSMESH_CONFIG",
    "cert": "MTLSMESH_CERT",
    "key": "MTLSMESH_KEY",
    "bundle": "MTLSMESH_BUNDLE",
    "trust_domain": "MTLSMESH_TRUST_DOMAIN",
    "inbound_mode": "MTLSMESH_INBOUND_MODE",
    "interception_mode": "MTLSMESH_INTERCEPTION_MODE",
    "log_level": "MTLSMESH_LOG_LEVEL",
    "admin_token_file": "MTLSMESH_ADMIN_TOKEN_FILE",
    "log_format": "MTLSMESH_LOG_FORMAT",
}
# Where the admin token goes when no flag or variable names a file: a directory the pod mounts for it (an emptyDir,
# the proxy's root filesystem being read-only). Used only when that directory exists: without it POSTs are refused.
DEFAULT_ADMIN_TOKEN_FILE = ADMIN_TOKEN_FILE


class LineFormatter(logging.Formatter):
    """`logging.Formatter` with the date and time of `ts=` rendered once per second instead of once per line (the
    text is the same: the milliseconds are still the record's own)."""

    _second: tuple[int, str] = (-1, "")  # (whole second, its rendering); one tuple, so it is swapped atomically

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached, text = self._second
        if cached != second:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"  # what logging.Formatter.default_msec_format "%s,%03d" gives


class JsonFormatter(logging.Formatter):
    """`log.format: json`: one JSON object per line. `ts` (RFC 3339 UTC, milliseconds), `level` and `logger` first;
    then a connection's fields under the names of its text line (`runtime.ConnRecord.fields`), or an event's
    key=value pairs as they were written (values as text), or, for a message that is not key=value, `msg`."""

    def format(self, record: logging.LogRecord) -> str:
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "ts": f"{moment}.{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name
        }  # fmt: skip
        args = record.args
        fields = getattr(args[0], "fields", None) if isinstance(args, tuple) and len(args) == 1 else None
        if callable(fields):
            out.update(fields())
        else:
            message = record.getMessage()
            pairs = parse_kv(message)
            out.update(pairs if pairs is not None else {"msg": message})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


_KV = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[^ ]*)(?: +|$)')


def parse_kv(text: str) -> dict[str, str] | None:
    """`event=x reason="a b"` as {"event": "x", "reason": "a b"}; None when `text` is not wholly key=value pairs.
    Values quoted by `runtime.render_kv` (double quotes) or `%r` (single or double) are unquoted."""
    out: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _KV.match(text, position)
        if match is None or match.end() == position:
            return None
        value = match[2]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
        out[match[1]] = value
        position = match.end()
    return out or None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser("sidecar", help=help_text, description=__doc__)
    parser.add_argument("--config", metavar="FILE", help="the sidecar YAML config (env MTLSMESH_CONFIG)")
    parser.add_argument("--cert", metavar="FILE", help="SVID chain, leaf first (env MTLSMESH_CERT)")
    parser.add_argument("--key", metavar="FILE", help="SVID private key (env MTLSMESH_KEY)")
    parser.add_argument("--bundle", metavar="FILE", help="trust bundle (env MTLSMESH_BUNDLE)")
    parser.add_argument("--trust-domain", metavar="TD", help="trust domain (env MTLSMESH_TRUST_DOMAIN)")
    parser.add_argument(
        "--inbound-mode", metavar="MODE", help="strict | permissive | disable (env MTLSMESH_INBOUND_MODE)"
    )
    parser.add_argument(
        "--interception-mode",
        metavar="MODE",
        help="REDIRECT | TPROXY, as the init step's (env MTLSMESH_INTERCEPTION_MODE)",
    )
    parser.add_argument("--log-level", metavar="LEVEL", help=f"{' | '.join(LOG_LEVELS)} (env MTLSMESH_LOG_LEVEL)")
    parser.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="where to write the token the admin port's POSTs need (env MTLSMESH_ADMIN_TOKEN_FILE; default "
        f"{DEFAULT_ADMIN_TOKEN_FILE} when its directory exists)",
    )
    parser.add_argument(
        "--log-format", metavar="FORMAT", help="text (key=value) | json, one object per line (env MTLSMESH_LOG_FORMAT)"
    )
    # The supervisor starts its workers with this (`workers`); not for people.
    parser.add_argument("--worker-fd", metavar="FD", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def _value(args: argparse.Namespace, name: str) -> str | None:
    flag = getattr(args, name)
    if flag is not None:
        return str(flag)
    env = os.environ.get(ENV[name])
    return env if env else None


def build_config(args: argparse.Namespace) -> Config:
    """The config file with flag/environment overrides applied; raises ConfigError naming the flag."""
    path = _value(args, "config")
    if path is None:
        raise ConfigError("--config", "a config file is required (or MTLSMESH_CONFIG)")
    cfg = load_config(path)
    trust_domain = _value(args, "trust_domain")
    if trust_domain is not None:
        try:
            cfg = dataclasses.replace(cfg, trust_domain=parse_trust_domain(trust_domain))
        except Exception as exc:
            raise ConfigError("--trust-domain", str(exc)) from exc
    mode = _value(args, "inbound_mode")
    if mode is not None:
        try:
            inbound_mode = Mode(mode.lower())
        except ValueError:
            raise ConfigError("--inbound-mode", "expected one of strict, permissive, disable") from None
        cfg = dataclasses.replace(cfg, inbound=dataclasses.replace(cfg.inbound, mode=inbound_mode))
    interception = _value(args, "interception_mode")
    if interception is not None:
        try:
            chosen = InterceptionMode(interception.upper())
        except ValueError:
            raise ConfigError("--interception-mode", "expected one of REDIRECT, TPROXY") from None
        cfg = dataclasses.replace(cfg, inbound=dataclasses.replace(cfg.inbound, interception_mode=chosen))
    files = {name: _value(args, name) for name in ("cert", "key", "bundle")}
    if any(files.values()) and cfg.identity is not None:
        flag = next(f"--{name}" for name, value in files.items() if value)
        raise ConfigError(flag, "the config's identity section gets the SVID from the CA; no SVID files apply")
    if any(files.values()):
        base = cfg.credentials
        missing = [name for name, value in files.items() if value is None and base is None]
        if missing:
            raise ConfigError(f"--{missing[0]}", "no credentials in the config file: give --cert, --key and --bundle")
        cfg = dataclasses.replace(
            cfg,
            credentials=CredentialFiles(
                cert=files["cert"] or (base.cert if base else ""),
                key=files["key"] or (base.key if base else ""),
                bundle=files["bundle"] or (base.bundle if base else ""),
                reload_interval=base.reload_interval if base else 2.0,
            ),
        )
    if cfg.credentials is None and cfg.identity is None:
        raise ConfigError(
            "credentials",
            "the sidecar needs cert, key and bundle (config or --cert/--key/--bundle), or an identity section",
        )
    level = _value(args, "log_level")
    if level is not None:
        if level.lower() not in LOG_LEVELS:
            raise ConfigError("--log-level", f"expected one of {', '.join(LOG_LEVELS)}")
        cfg = dataclasses.replace(cfg, log_level=level.lower())
    log_format = _value(args, "log_format")
    if log_format is not None:
        if log_format.lower() not in LOG_FORMATS:
            raise ConfigError("--log-format", f"expected one of {', '.join(LOG_FORMATS)}")
        cfg = dataclasses.replace(cfg, log_format=log_format.lower())
    return cfg


def tune_malloc() -> bool:
    """Keep the relay's read buffers on the heap; False where malloc is not glibc's (nothing changed then).

    A plain socket is read with os.read(fd, relay.CHUNK): Python allocates the whole CHUNK, the kernel fills part
    of it, and the bytes object shrinks to what came. glibc serves a block that size (over its default 128 KiB
    threshold) with its own mmap, so each read cost mmap, a page fault, mremap and munmap: 15 us instead of 2.5 for
    a 64-byte read in a loop (glibc raises the threshold by itself only after freeing a big block unshrunk, which
    small reads never do). With the thresholds above such blocks come from the heap and go back to it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "worker_fd", None) is not None:
        return run_worker(args.worker_fd)
    cfg = build_config(args)
    # Everything that can be checked before anything binds is: the SVID files, or the identity agent's bundle.
    credentials: CredentialStore | IdentityAgent
    agent: IdentityAgent | None = None
    if cfg.identity is not None:
        from mtlsmesh.agent import IdentityAgent

        credentials = agent = IdentityAgent(cfg.identity, cfg.trust_domain)
    else:
        assert cfg.credentials is not None
        credentials = CredentialStore.load(cfg.credentials, cfg.trust_domain)
    configure_logging(cfg)
    tune_process()
    token_file, token = _admin_token(_value(args, "admin_token_file"))
    count = 1
    if cfg.workers != 1:
        from mtlsmesh import workers

        count = workers.resolve(cfg)

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, stop, "mtlsmesh.sidecar")
            await nursery.start(reload_on_sighup, credentials)
            if agent is not None:
                # The first SVID before anything binds: the kubelet sees no health port until it is there.
                async with trio.open_nursery() as enrolling:
                    enrolling.start_soon(_cancel_when, stop, enrolling.cancel_scope)
                    await agent.enroll()
                    enrolling.cancel_scope.cancel()
                if stop.is_set():
                    nursery.cancel_scope.cancel()
                    return
            if count == 1:
                await serve_sidecar(cfg, credentials, stop=stop, admin_token=token)
            else:
                from mtlsmesh import workers

                await workers.supervise(cfg, credentials, count, WORKER_COMMAND, stop=stop, admin_token=token)
            nursery.cancel_scope.cancel()

    try:
        with unwrap_mesh_errors():
            trio.run(main)
    finally:
        if token_file is not None and token is not None:
            admin.remove_token(token_file, token)
    return 0


# How the supervisor starts a worker: this interpreter, this command, the channel's descriptor for {fd}.
WORKER_COMMAND = (sys.executable, "-m", "mtlsmesh", "sidecar", "--worker-fd", "{fd}")


def run_worker(fd: int) -> int:
    """A worker process (`workers`): everything it needs comes from its supervisor over `fd`. It drains on SIGTERM
    (which the supervisor passes on) and leaves SIGHUP to the supervisor."""
    from mtlsmesh import workers

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent()
    tune_process()

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, stop, "mtlsmesh.sidecar")
            await workers.run_worker(fd, stop, configure_logging)
            nursery.cancel_scope.cancel()

    with unwrap_mesh_errors():
        trio.run(main)
    return 0


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> bool:
    """SIGKILL this process when its parent (the supervisor) dies, as a single sidecar process killed would take
    its listeners with it; False where prctl is missing (the worker then stops when its channel closes)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    return bool(prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0)


def configure_logging(cfg: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.log_format == "json" else LineFormatter(LOG_FORMAT))
    # A busy sidecar writes a line per connection: leave out what every record would otherwise look up (thread,
    # process and multiprocessing names) and LOG_FORMAT never shows.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger("mtlsmesh")
    root.addHandler(handler)
    root.setLevel(cfg.log_level.upper())
    root.propagate = False


def tune_process() -> None:
    # The cyclic garbage collector: what was built at start-up (config, credentials, modules) lives as long as the
    # process, so it is left out of every later collection; and the young generation is collected after 7,000 net
    # new objects instead of 700. Each connection allocates and frees a few hundred (tasks, frames, sockets), so
    # with 700 the count crossed the threshold again and again while connections were in flight and every
    # collection walked the objects of the open ones; with 7,000 a collection is rare and almost everything a
    # connection made is freed by reference counting before it. Garbage in cycles waits a little longer.
    # Start-up's garbage (the YAML, the PEM files, import machinery) is collected first, not frozen with the rest.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    tune_malloc()
    # One series per label set: the `_created` twin of every counter would double them for no reader of ours.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    release_free_memory()


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim(0)): what start-up allocated and freed
    would otherwise stay in an idle sidecar's resident memory (about 1 MiB). False where malloc is not glibc's."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
    return True


def _admin_token(flag: str | None) -> tuple[str | None, str | None]:
    """(file, token): the token written to the named file (an error there is fatal: it was asked for), or to the
    default one when its directory exists; (None, None) otherwise, and the admin port then refuses every POST."""
    log = logging.getLogger("mtlsmesh.sidecar")
    if flag is not None:
        return flag, admin.write_token(flag)
    if not os.path.isdir(os.path.dirname(DEFAULT_ADMIN_TOKEN_FILE)):
        log.debug("event=admin_token_disabled reason=%r", f"no {os.path.dirname(DEFAULT_ADMIN_TOKEN_FILE)}")
        return None, None
    try:
        return DEFAULT_ADMIN_TOKEN_FILE, admin.write_token(DEFAULT_ADMIN_TOKEN_FILE)
    except ConfigError as exc:
        log.warning("event=admin_token_disabled reason=%r", exc.message)
        return None, None


async def reload_on_sighup(
    credentials: CredentialSource, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGHUP: reload the SVID files at once, whether or not they look changed, and log what became of it (the
    store logs `credentials_reloaded` or `reload_refused` as a poll would). In identity mode, a renewal now
    (`IdentityAgent.renew_now`; the agent logs `svid_renewed`, or `svid_renewal_failing` as a scheduled one would)."""
    log = logging.getLogger("mtlsmesh.sidecar")
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            if isinstance(credentials, CredentialStore):
                swapped = credentials.check_once(force=True)
                log.info("event=signal signal=SIGHUP action=reload result=%s", "reloaded" if swapped else "refused")
                continue
            from mtlsmesh.agent import IdentityAgent  # the other source: identity mode, which has loaded it already

            if isinstance(credentials, IdentityAgent) and credentials.renew_now():
                log.info("event=signal signal=SIGHUP action=renew result=requested")
            else:
                log.info(
                    "event=signal signal=SIGHUP action=none reason=%r",
                    "identity mode: no SVID yet, enrolment is still retrying",
                )


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
