"""Where a sidecar's CPU goes: sample it with py-spy during a measurement and sort the samples into buckets.

The runner's `--py-spy DIR` option records each mtlsmesh process (with native frames, so time inside libssl and
libcrypto is visible) during every measurement step, as collapsed stacks `DIR/<round>-<step>-<role>.txt`.
`python -m bench.profile DIR` prints, per file, the share of samples in each bucket. A sample belongs to the
innermost frame that names a bucket, reading from the leaf: a sample whose leaf is in libcrypto is "OpenSSL C",
one that is in pyOpenSSL's Python code with no OpenSSL frame below is "pyOpenSSL Python code",
and so on. Interpreter frames (libpython) are skipped, so the eval loop's own cost is charged to the Python
function it was running.

Sampling pauses the process (native unwinding needs that), so numbers from a profiled run are not results; py-spy
is an optional tool and not a dependency of the project.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# (bucket, pattern on one collapsed frame), tried in this order on each frame from the leaf outwards.
BUCKETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # pyOpenSSL's OpenSSL is linked into cryptography's _rust.abi3.so; its Rust/pyo3 symbols are mangled (_RN...).
    ("cryptography Rust/pyo3 (X.509, glue)", re.compile(r"^(_RN|_ZN)\S* \(\S*_rust|cryptography_rust|pyo3")),
    ("cffi call glue", re.compile(r"^_cffi_f_|_cffi_backend")),
    ("OpenSSL C (libssl/libcrypto)", re.compile(r"\(\S*(libssl|libcrypto|_rust\.abi3)")),
    ("sockets (libc, socket.py)", re.compile(r"\(libc\.so|\(libpthread|\bsocket\.py|\bselectors\.py")),
    ("pyOpenSSL Python code", re.compile(r"OpenSSL/")),
    ("cryptography Python code", re.compile(r"cryptography/")),
    ("logging", re.compile(r"logging/")),
    ("trio socket layer", re.compile(r"trio/_socket|trio/_highlevel_socket|trio/_highlevel_open")),
    ("trio core (scheduler, epoll, cancel scopes)", re.compile(r"trio/")),
    ("mtlsmesh code", re.compile(r"mtlsmesh/")),
)
# A leaf blocked in the kernel waiting for work is idle time, not CPU: reported apart and left out of the shares.
IDLE = re.compile(r"^(epoll_wait|epoll_pwait|poll|ppoll|select|pselect6?|__futex\w*|futex\w*|pthread_cond_\w*wait|"
                  r"sem_\w*wait|__GI___poll|nanosleep|clock_nanosleep|read_nocancel) \(")  # fmt: skip
IDLE_NAME = "idle (blocked in epoll/poll/futex)"
SKIP = re.compile(r"\(libpython|\(python3|_PyEval|PyObject_|_Py[A-Z]")
OTHER = "other Python"


def bucket_of(frames: Sequence[str]) -> str:
    if frames and IDLE.search(frames[-1]):
        return IDLE_NAME
    for frame in reversed(frames):
        if SKIP.search(frame):
            continue
        for name, pattern in BUCKETS:
            if pattern.search(frame):
                return name
    return OTHER


def summarize(collapsed: str) -> Counter[str]:
    """Samples per bucket from py-spy's collapsed (`--format raw`) output: `frame;frame;...;leaf count` lines."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        counts[bucket_of(stack.split(";"))] += int(number)
    return counts


def top_frames(collapsed: str, limit: int = 12) -> list[tuple[str, int]]:
    """The innermost non-interpreter frames that collect most samples (self time), to name hot functions."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [f for f in stack.split(";") if not SKIP.search(f)]
        if frames and not IDLE.search(frames[-1]):
            counts[frames[-1]] += int(number)
    return counts.most_common(limit)


def render(path: Path) -> str:
    text = path.read_text(errors="replace")
    counts = summarize(text)
    idle = counts.pop(IDLE_NAME, 0)
    total = sum(counts.values())
    lines = [f"{path.name}: {total} busy samples ({idle} idle samples left out)"]
    if total == 0:
        return lines[0]
    for name, count in counts.most_common():
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    lines.append("  hottest frames (self time, busy samples):")
    for frame, count in top_frames(text):
        lines.append(f"    {100 * count / total:5.1f}%  {frame[:110]}")
    return "\n".join(lines)


def find_py_spy() -> str | None:
    """py-spy on PATH, or next to the running interpreter (pip installs it into the virtualenv's bin)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


class Profiler:
    """py-spy attached to some PIDs for the length of a `with` block, writing collapsed stacks."""

    def __init__(self, targets: dict[str, int], outdir: Path, tag: str, *, py_spy: str | None, rate: int = 200) -> None:
        self.py_spy = py_spy or "py-spy"
        self.targets = targets
        self.outdir = outdir
        self.tag = tag
        self.rate = rate
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Profiler:
        self.outdir.mkdir(parents=True, exist_ok=True)
        for role, pid in self.targets.items():
            out = self.outdir / f"{self.tag}-{role}.txt"
            argv = [self.py_spy, "record", "--pid", str(pid), "--native", "--rate", str(self.rate), "--format", "raw",
                    "--output", str(out)]  # fmt: skip
            log = (self.outdir / f"{self.tag}-{role}.py-spy.log").open("wb")
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, process_group=0))
            log.close()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description="Summarize py-spy profiles.")
    parser.add_argument("paths", nargs="+", type=Path, help="collapsed-stack files or directories of them")
    args = parser.parse_args(argv)
    files: list[Path] = []
    for path in args.paths:
        files.extend(sorted(path.glob("*.txt")) if path.is_dir() else [path])
    if not files:
        print("bench.profile: no profiles found", file=sys.stderr)
        return 2
    for path in files:
        print(render(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
