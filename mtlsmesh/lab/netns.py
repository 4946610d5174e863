"""Network namespaces for the pod lab: commands run inside them, sockets opened inside them, stale ones removed.

`socket_in(ns)` opens a socket inside a named namespace without starting a process: a short-lived thread switches
its own network namespace with setns(2) (allowed in a threaded process for network namespaces, and it affects
only that thread), creates the socket and switches back. A socket stays in the namespace it was made in, so the
caller can use it from any thread. Its owner is this process's uid, so the pod's capture rules treat it as an app.

What this module does not do: decide names or addresses (see `topology`), or build pods (see `lab`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from mtlsmesh.errors import LabError

NETNS_DIR = "/run/netns"  # where `ip netns add` bind-mounts named namespaces
CLONE_NEWNET = 0x40000000  # linux/sched.h
COMMAND_TIMEOUT = 20.0

T = TypeVar("T")


def run(
    argv: Sequence[str],
    *,
    input_text: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a command to completion (with exactly `env` as its environment when given, else ours); a non-zero exit
    becomes a LabError carrying its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout:g}s") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {detail[-1] if detail else 'no output'}")
    return done.stdout


def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def namespace_pids(name: str) -> list[int]:
    """PIDs of the processes living in namespace `name` (`ip netns pids`)."""
    try:
        out = run(["ip", "netns", "pids", name])
    except LabError:
        return []
    return [int(word) for word in out.split() if word.isdigit()]


def delete_namespace(name: str) -> None:
    if name in list_namespaces():
        run(["ip", "netns", "del", name])


def stop_pid(pid: int, *, grace: float = 3.0) -> None:
    """SIGTERM one process by PID, then SIGKILL it if it is still there after `grace` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        # A child that has exited but not been reaped is a zombie: gone for our purposes.
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cleanup_stale(prefix: str) -> list[str]:
    """Remove namespaces named `prefix...` left behind by a killed run, ending the processes still inside them,
    and the run's work directory in the temp dir.

    Returns the namespaces and directories removed. Only processes found inside those namespaces are ended,
    each by its PID.
    """
    if len(prefix) < 3:
        raise LabError(f"prefix {prefix!r} is too short to be sure the namespaces are ours")
    removed: list[str] = []
    for name in list_namespaces():
        if name.startswith(prefix):
            for pid in namespace_pids(name):
                stop_pid(pid, grace=1.0)
            delete_namespace(name)
            removed.append(name)
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        path = os.path.join(tmp, entry)
        if entry.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)  # the lab's work dir: configs, SVIDs, logs
            removed.append(path)
    return removed


def stale_prefixes(tag: str) -> list[str]:
    """Lab prefixes `<tag><pid><letter>-` in use by namespaces whose creating process no longer exists."""
    found: set[str] = set()
    for name in list_namespaces():
        if not name.startswith(tag):
            continue
        head = name[len(tag) :].split("-", 1)[0]
        digits = head.rstrip("abcdefghijklmnopqrstuvwxyz")
        if digits.isdigit() and head != digits and not alive(int(digits)):
            found.add(f"{tag}{head}-")
    return sorted(found)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call `fn` on a thread that has entered namespace `ns`; return its result or raise its error."""
    box: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                box.append(fn())
            finally:
                _setns(own)
        except BaseException as exc:  # handed to the caller's thread below
            errors.append(exc)
        finally:
            os.close(own)

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        if isinstance(errors[0], FileNotFoundError):
            raise LabError(f"no network namespace {ns!r}") from errors[0]
        raise errors[0]
    return box[0]


def socket_in(ns: str, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A TCP socket created inside namespace `ns` (see the module docstring)."""
    return run_in_netns(ns, lambda: socket.socket(family, socket.SOCK_STREAM))


def connect_in(ns: str, host: str, port: int, *, timeout: float = 5.0) -> socket.socket:
    """A TCP connection from inside namespace `ns` to host:port (an IPv4 or IPv6 address), with a timeout on connect
    and later I/O."""
    sock = socket_in(ns, socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def wait_port(ns: str, host: str, port: int, *, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Wait until host:port accepts a TCP connection from inside `ns`; LabError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect_in(ns, host, port, timeout=1.0).close()
            return
        except OSError:
            pass
        if alive is not None and not alive():
            raise LabError(f"the process meant to listen on {host}:{port} in {ns} has exited")
        if time.monotonic() > deadline:
            raise LabError(f"nothing listens on {host}:{port} in {ns} after {timeout:g}s")
        time.sleep(0.1)
