"""Two network namespaces joined by a veth pair, and the processes the benchmark runs inside them.

`Lab` owns everything it creates: the namespaces (named with a tag and our PID so parallel runs never collide),
the processes it starts (ended by PID, never by name) and their log files. `Lab.close()` is idempotent and is
called from a `finally`, so namespaces and processes go away on normal exit, on Ctrl-C and on any failure.
Deleting a namespace does not kill the processes inside it, so processes are ended first.

It deliberately does not route anything out: the veth pair has addresses from 198.18.0.0/15 (RFC 2544
benchmarking space) and no default route.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TAG = "mtb"  # short prefix for every name this benchmark creates
ADDR_A = "198.18.9.1"
ADDR_B = "198.18.9.2"
PREFIX_LEN = 30

# Per-namespace sysctls: a connection-per-request load leaves many sockets in TIME_WAIT on one 4-tuple family, so
# the ephemeral range is wide; the ports the backends and the pairs listen on (7001-8603) are kept out of it, or a
# pair started after another's connection step finds its port taken by a connection's source port.
NS_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65000",
    "net.ipv4.ip_local_reserved_ports": "7000-8999",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.core.somaxconn": "4096",
    "net.ipv4.tcp_max_syn_backlog": "4096",
}

TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10


class LabError(Exception):
    """The lab could not be built or a process in it failed; the message says which and why."""


def _run(argv: Sequence[str], *, timeout: float = 15.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of `pid` (read from its /proc/net/tcp{,6})."""
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in (task / "children").read_text().split())
        found.append(current)
    return found


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` and all its descendants, in KiB."""
    total = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def pss_kib(pid: int) -> int:
    """Proportional set size of `pid` and all its descendants, in KiB: shared pages split among their users."""
    total = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


class Lab:
    """Namespaces `<tag><pid>a` and `<tag><pid>b`, veth `<tag><pid>a` (in A) <-> `<tag><pid>b` (in B)."""

    def __init__(self, workdir: Path) -> None:
        stem = f"{TAG}{os.getpid()}"
        self.ns_a = f"{stem}a"
        self.ns_b = f"{stem}b"
        self.workdir = workdir
        self._created: list[str] = []
        self._procs: list[Proc] = []

    def build(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
        # Create the pair inside A directly so no interface ever appears in the caller's namespace.
        _run(["ip", "-n", self.ns_a, "link", "add", self.ns_a, "type", "veth", "peer", "name", self.ns_b,
              "netns", self.ns_b])  # fmt: skip
        for ns, addr in ((self.ns_a, ADDR_A), (self.ns_b, ADDR_B)):
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", ns])
            _run(["ip", "-n", ns, "link", "set", ns, "up"])
            for key, value in NS_SYSCTLS.items():
                _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])

    def start(self, ns: str, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Proc:
        """Start `argv` inside `ns` (`ip netns exec` execs, so the PID is the program's own)."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            # Own process group: a terminal's Ctrl-C reaches only the runner, which then ends these in order.
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
            )
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
        """Run `argv` in `ns` to completion (bounded by `timeout`) and return its stdout."""
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            process_group=0,
        )
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _end(popen)
            raise LabError(f"{argv[0]}: no result within {timeout:.0f}s") from exc
        except BaseException:
            _end(popen)
            raise
        if popen.returncode != 0:
            tail = (err or out).decode(errors="replace").strip().splitlines()[-5:]
            raise LabError(f"{argv[0]}: exit {popen.returncode}: {' | '.join(tail)}")
        return out.decode(errors="replace")

    def wait_listening(self, proc: Proc, ports: Sequence[int], *, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.popen.poll() is not None:
                raise LabError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            missing = set(ports) - listening_ports(proc.pid)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise LabError(f"{proc.name} not listening on {sorted(missing)} after {timeout:.0f}s:\n"
                               f"{proc.log_tail()}")  # fmt: skip
            time.sleep(0.05)

    def stop(self, proc: Proc) -> None:
        _end(proc.popen)
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self._procs):
            _end(proc.popen)
        self._procs.clear()
        for ns in reversed(self._created):
            with contextlib.suppress(LabError):
                _run(["ip", "netns", "del", ns])
        self._created.clear()


def _end(popen: subprocess.Popen[bytes]) -> None:
    """End one process we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        popen.wait(timeout=5)
