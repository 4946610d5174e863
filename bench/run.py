"""The benchmark runner: build the lab, run stunnel, haproxy, mtlsmesh and the no-tunnel path round by round,
print medians and ratios.

One run = two namespaces joined by veth, backends in B (echo, http, iperf3), and for each round each pair started
fresh (stunnel, haproxy, mtlsmesh, then no tunnel), measured, and stopped:

1. memory: RSS of both proxy processes before and after opening N idle connections through the tunnel, and their
   PSS when idle;
2. latency: 64-byte round trips on one kept-alive connection, p50/p99;
3. small requests: wrk over 16 kept-alive connections, GETs answered with 1 KiB;
4. throughput: iperf3 through the tunnel with 1 and 4 streams;
5. new connections per second: wrk with `Connection: close`, so every request is a new full mTLS handshake.

Memory comes first so it is measured in a fresh process. During every step the runner also measures the noise:
the CPU used by processes it did not start. Whatever fails in one measurement is reported and the rest goes on;
the lab is torn down on every way out (normal end, Ctrl-C, SIGTERM, an error).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stats
from bench.certs import BenchCerts, issue_bench_certs
from bench.netns import ADDR_A, ADDR_B, Lab, LabError, descendants, pss_kib, rss_kib
from bench.profile import Profiler, find_py_spy
from bench.proxies import BACKEND_PORTS, PAIRS, PairSpec, RunningPair, python_env, start_pair, stop_pair

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {"stunnel": ("stunnel",), "haproxy": ("haproxy",)}  # per tool, beyond what every run needs
ALWAYS_NEEDED = ("ip", "iperf3", "wrk")
METRIC_STEPS = ("mem", "lat", "rps", "tput", "cps")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    iperf_seconds: int
    wrk_seconds: int
    wrk_connections: int
    latency_count: int
    idle_connections: int

    @classmethod
    def full(cls) -> Settings:
        return cls(
            rounds=3, iperf_seconds=5, wrk_seconds=5, wrk_connections=16, latency_count=5000, idle_connections=1000
        )

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=1, iperf_seconds=2, wrk_seconds=2, wrk_connections=8, latency_count=500, idle_connections=100)


Results = dict[str, dict[str, list[float]]]


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived; handled like Ctrl-C."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User+system CPU time of the given processes (all their threads) and their children (a sidecar's workers),
    in seconds."""
    total = 0
    for pid in (member for parent in pids for member in descendants(parent)):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return total / CLK_TCK


def _process_table() -> dict[int, tuple[int, int, int]]:
    """Every process now: pid -> (parent pid, CPU ticks used so far, flags)."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[6]))
    return table


class NoiseMeter:
    """The CPU that processes this run did not start use while a step runs, as a share of one CPU.

    Kernel threads are left out (they carry the network work of the benchmark's own traffic), and so is every
    process descended from the runner. A process that started and ended inside the step is not seen, so this is a
    lower bound.
    """

    def __init__(self) -> None:
        self._start = _process_table()
        self._t0 = time.monotonic()

    def share_of_one_cpu(self) -> float:
        end, elapsed = _process_table(), time.monotonic() - self._t0
        ours = {os.getpid()}
        changed = True
        while changed:  # every descendant of the runner, through any depth
            grown = {pid for pid, (ppid, _, _) in end.items() if ppid in ours}
            changed = not grown <= ours
            ours |= grown
        ticks = 0
        for pid, (_, used, flags) in end.items():
            if pid in ours or flags & PF_KTHREAD or pid == 2:
                continue
            before = self._start.get(pid)
            ticks += used - (before[1] if before is not None else 0)
        return max(0.0, ticks / CLK_TCK / elapsed) if elapsed > 0 else 0.0


class Bench:
    def __init__(
        self,
        lab: Lab,
        certs: BenchCerts,
        settings: Settings,
        workdir: Path,
        metrics: set[str],
        profile_dir: Path | None = None,
    ) -> None:
        self.profile_dir = profile_dir
        self.lab = lab
        self.certs = certs
        self.settings = settings
        self.workdir = workdir
        self.metrics = metrics
        self.env = python_env(REPO_ROOT)
        self.results: Results = {tool: {} for tool in (*stats.TOOLS, *stats.EXTRA_TOOLS)}
        self.errors: list[str] = []
        self.noise: list[float] = []  # one value per measured step, share of one CPU

    def record(self, tool: str, key: str, value: float) -> None:
        self.results[tool].setdefault(key, []).append(value)

    def start_backends(self) -> None:
        tool = [sys.executable, "-m", "bench.loadtools"]
        ns_b = self.lab.ns_b
        # On every address of B, so that the no-tunnel path reaches them from A; the tunnels dial 127.0.0.1.
        for name, argv in (
            ("echo", [*tool, "echo-server", "--host", "0.0.0.0", "--port", str(BACKEND_PORTS["echo"])]),
            ("http", [*tool, "http-server", "--host", "0.0.0.0", "--port", str(BACKEND_PORTS["http"])]),
            ("iperf", ["iperf3", "--server", "--port", str(BACKEND_PORTS["iperf"])]),
        ):
            proc = self.lab.start(ns_b, f"backend-{name}", argv, env=self.env)
            self.lab.wait_listening(proc, [BACKEND_PORTS[name]])

    def round(self, number: int, spec: PairSpec) -> None:
        label = f"r{number}-{spec.tool}"
        try:
            pair = start_pair(self.lab, spec, self.certs, self.workdir, REPO_ROOT, label)
        except LabError as exc:
            self.errors.append(f"{label}: start: {exc}")
            print(f"  {label}: could not start: {exc}", flush=True)
            return
        try:
            steps: list[tuple[str, Callable[[RunningPair], str]]] = [
                ("mem", self.measure_memory),
                ("lat", self.measure_latency),
                ("rps", self.measure_small_requests),
                ("tput", self.measure_throughput),
                ("cps", self.measure_cps),
            ]
            for key, step in steps:
                if key not in self.metrics or (key == "mem" and not pair.procs):
                    continue
                meter = NoiseMeter()
                try:
                    with self._profiled(pair, f"{label}-{key}"):
                        summary = step(pair)
                except LabError as exc:
                    self.errors.append(f"{label}: {key}: {exc}")
                    summary = f"FAILED: {exc}"
                noise = meter.share_of_one_cpu()
                self.noise.append(noise)
                print(f"  {label:14} {key:5} {summary} [noise {noise * 100:.0f}% CPU]", flush=True)
                for proc in pair.procs:
                    if proc.popen.poll() is not None:
                        raise LabError(f"{proc.name} died (exit {proc.popen.returncode}):\n{proc.log_tail()}")
        except LabError as exc:
            self.errors.append(f"{label}: {exc}")
            print(f"  {label}: {exc}", flush=True)
        finally:
            stop_pair(self.lab, pair)

    def _profiled(self, pair: RunningPair, tag: str) -> contextlib.AbstractContextManager[object]:
        if self.profile_dir is None or not pair.spec.tool.startswith("mtlsmesh"):
            return contextlib.nullcontext()
        targets = {role: proc.pid for role, proc in zip(("originator", "terminator"), pair.procs, strict=True)}
        return Profiler(targets, self.profile_dir, tag, py_spy=find_py_spy())

    # --- measurements -------------------------------------------------------------------------------------------

    def measure_memory(self, pair: RunningPair) -> str:
        tool, port = pair.spec.tool, pair.spec.front_ports["echo"]
        # One connection first, so lazily loaded code and first-use allocations are not counted per connection.
        self._latency(pair.spec, count=20, warmup=0)
        time.sleep(0.5)
        before = sum(rss_kib(pid) for pid in pair.pids)
        pss = sum(pss_kib(pid) for pid in pair.pids) / 1024
        self.record(tool, "pss", pss)
        wanted = self.settings.idle_connections
        with self._idle_connections(port, wanted) as opened:
            time.sleep(1.0)  # let both proxies finish their side of the last handshakes
            after = sum(rss_kib(pid) for pid in pair.pids)
        if opened < wanted * 0.95:
            raise LabError(f"only {opened} of {wanted} idle connections were established")
        per_conn = (after - before) / opened
        self.record(tool, "mem", per_conn)
        return f"{per_conn:.1f} KiB/conn (RSS {before} -> {after} KiB, {opened} connections), idle PSS {pss:.1f} MiB"

    @contextlib.contextmanager
    def _idle_connections(self, port: int, count: int) -> Iterator[int]:
        argv = [sys.executable, "-m", "bench.loadtools", "idle", "--port", str(port), "--count", str(count),
                "--max-seconds", "120"]  # fmt: skip
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns_a, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            process_group=0,
        )
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        try:
            ready, _, _ = select.select([popen.stdout], [], [], 150)
            line = popen.stdout.readline() if ready else b""
            if not line:
                if popen.poll() is None:
                    popen.kill()
                popen.wait(timeout=10)
                raise LabError(f"idle: no report: {popen.stderr.read().decode(errors='replace').strip()[-500:]}")
            report = json.loads(line)
            if report["failed"]:
                print(f"    idle: {report['failed']} connections failed, first: {report['first_error']}")
            yield int(report["ready"])
        finally:
            with contextlib.suppress(OSError):
                popen.stdin.close()
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=5)

    def _latency(self, spec: PairSpec, *, count: int, warmup: int) -> dict[str, float]:
        argv = [sys.executable, "-m", "bench.loadtools", "latency", "--host", spec.front_host, "--port",
                str(spec.front_ports["echo"]), "--count", str(count), "--warmup", str(warmup),
                "--max-seconds", "30"]  # fmt: skip
        out = self.lab.run(self.lab.ns_a, argv, timeout=60, env=self.env)
        result: dict[str, float] = json.loads(out)
        return result

    def measure_latency(self, pair: RunningPair) -> str:
        result = self._latency(pair.spec, count=self.settings.latency_count, warmup=200)
        self.record(pair.spec.tool, "p50", result["p50_us"])
        self.record(pair.spec.tool, "p99", result["p99_us"])
        return f"p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us ({result['count']:.0f} round trips)"

    def _iperf(self, pair: RunningPair, streams: int) -> tuple[float, float]:
        seconds = self.settings.iperf_seconds
        argv = ["iperf3", "--client", pair.spec.front_host, "--port", str(pair.spec.front_ports["iperf"]), "--time",
                str(seconds), "--parallel", str(streams), "--json", "--connect-timeout", "5000"]  # fmt: skip
        cpu0 = cpu_seconds(pair.pids)
        out = self.lab.run(self.lab.ns_a, argv, timeout=seconds + 30)
        cpu = cpu_seconds(pair.pids) - cpu0
        try:
            end = json.loads(out)["end"]["sum_received"]
            return float(end["bits_per_second"]) / 1e6, cpu / (float(end["bytes"]) / 1e9)
        except (KeyError, ValueError, ZeroDivisionError) as exc:
            raise LabError(f"iperf3: unexpected output: {out[:300]!r}") from exc

    def measure_throughput(self, pair: RunningPair) -> str:
        one, cpu_gb = self._iperf(pair, 1)
        self.record(pair.spec.tool, "tput1", one)
        if pair.procs:
            self.record(pair.spec.tool, "cpu_gb", cpu_gb)
        four, _ = self._iperf(pair, 4)
        self.record(pair.spec.tool, "tput4", four)
        return f"1 stream {one:.0f} Mbit/s ({cpu_gb:.2f} CPU s/GB), 4 streams {four:.0f} Mbit/s"

    def _wrk(self, pair: RunningPair, path: str, extra: list[str]) -> tuple[float, int, int, float]:
        """One wrk run: (requests/s, requests, failed requests, proxy CPU seconds)."""
        seconds = self.settings.wrk_seconds
        url = f"http://{pair.spec.front_host}:{pair.spec.front_ports['http']}{path}"
        argv = ["wrk", "--threads", "1", "--connections", str(self.settings.wrk_connections), "--duration",
                f"{seconds}s", "--timeout", "5s", *extra, url]  # fmt: skip
        cpu0 = cpu_seconds(pair.pids)
        out = self.lab.run(self.lab.ns_a, argv, timeout=seconds + 30)
        cpu = cpu_seconds(pair.pids) - cpu0
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        if rate is None or total is None:
            raise LabError(f"wrk: unexpected output: {out[:300]!r}")
        requests = int(total.group(1))
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        failed = (sum(int(g) for g in errors.groups()) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
        if requests == 0 or failed > requests * 0.05:
            raise LabError(f"wrk: {requests} requests, {failed} errors: {out.strip()[-300:]!r}")
        return float(rate.group(1)), requests, failed, cpu

    def measure_small_requests(self, pair: RunningPair) -> str:
        rate, requests, failed, cpu = self._wrk(pair, "/1k", [])
        self.record(pair.spec.tool, "rps", rate)
        note = f", {failed} socket errors" if failed else ""
        if not pair.procs:
            return f"{rate:.0f} req/s of 1 KiB{note}"
        self.record(pair.spec.tool, "cpu_req", cpu * 1e6 / requests)
        return f"{rate:.0f} req/s of 1 KiB ({cpu * 1e6 / requests:.0f} CPU us/request{note})"

    def measure_cps(self, pair: RunningPair) -> str:
        rate, requests, failed, cpu = self._wrk(pair, "/", ["--header", "Connection: close"])
        self.record(pair.spec.tool, "cps", rate)
        note = f", {failed} socket errors" if failed else ""
        if not pair.procs:
            return f"{rate:.0f} conn/s{note}"
        self.record(pair.spec.tool, "cpu_conn", cpu * 1000 / requests)
        return f"{rate:.0f} conn/s ({cpu * 1000 / requests:.2f} CPU ms/conn{note})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 1 round, short durations")
    parser.add_argument("--rounds", type=int, help="rounds per tool (default 3, --quick 1)")
    every_step = ",".join(METRIC_STEPS)
    every_tool = ",".join(stats.TOOLS)
    parser.add_argument(
        "--tools",
        default=f"{every_tool},{stats.ONE_WORKER_TOOL}",
        help=f"comma-separated, some of {every_tool},{stats.ONE_WORKER_TOOL} (default: those; mtlsmesh runs its "
        f"default, workers: auto, and {stats.ONE_WORKER_TOOL} one worker), {stats.OPENSSL_TOOL} for record_layer "
        f"openssl and {stats.CLASSIC_TOOL} for key_exchange classic",
    )
    parser.add_argument("--metrics", default=every_step, help=f"comma-separated, some of {every_step} (default: all)")
    parser.add_argument("--idle-connections", type=int, help="idle connections for the memory measurement")
    parser.add_argument("--json", type=Path, help="also write the raw per-round results to this file")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile the mtlsmesh sidecars with py-spy during each step into DIR (slows them: not for results)",
    )
    args = parser.parse_args(argv)
    tools = set(args.tools.split(","))
    if not tools <= {*stats.TOOLS, *stats.EXTRA_TOOLS} or not tools:
        parser.error(f"--tools: expected some of {','.join((*stats.TOOLS, *stats.EXTRA_TOOLS))}, got {args.tools!r}")
    metrics = set(args.metrics.split(","))
    if not metrics <= set(METRIC_STEPS) or not metrics:
        parser.error(f"--metrics: expected some of {every_step}, got {args.metrics!r}")
    if args.rounds is not None and not 1 <= args.rounds <= 50:
        parser.error("--rounds: expected 1..50")
    if args.idle_connections is not None and not 1 <= args.idle_connections <= 10000:
        parser.error("--idle-connections: expected 1..10000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: error: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    tools = args.tools.split(",")
    needed = [*ALWAYS_NEEDED, *(program for tool in tools for program in PROGRAMS.get(tool, ()))]
    missing = [program for program in needed if shutil.which(program) is None]
    if args.py_spy is not None and find_py_spy() is None:
        missing.append("py-spy")
    if missing:
        print(f"bench: error: missing programs: {', '.join(missing)}", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings.full()
    if args.rounds is not None:
        settings = Settings(**{**_asdict(settings), "rounds": args.rounds})
    if args.idle_connections is not None:
        settings = Settings(**{**_asdict(settings), "idle_connections": args.idle_connections})
    specs = [spec for spec in PAIRS if spec.tool in tools]
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()[0]  # the run itself drives the load average to ~5 on two CPUs

    old_handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = Path(tempfile.mkdtemp(prefix="mtlsmesh-bench-"))
    lab = Lab(workdir)
    status = 0
    try:
        lab.build()
        certs = issue_bench_certs(workdir / "certs")
        bench = Bench(lab, certs, settings, workdir, set(args.metrics.split(",")), args.py_spy)
        bench.start_backends()
        print(f"lab: {lab.ns_a} ({ADDR_A}) <-> {lab.ns_b} ({ADDR_B}); {settings}", flush=True)
        for number in range(1, settings.rounds + 1):
            print(f"round {number}/{settings.rounds}", flush=True)
            for spec in specs:
                bench.round(number, spec)
        print()
        print(f"{started:%Y-%m-%d %H:%M} UTC, `{command}`, {os.cpu_count()} CPUs, "
              f"load average {load_before:.2f} before the run")  # fmt: skip
        print(stats.render_noise(bench.noise, os.cpu_count() or 1))
        print(stats.render_table(bench.results))
        extras = (stats.render_workers, stats.render_record_layers, stats.render_key_exchange)
        for extra in (render(bench.results) for render in extras):
            if extra:
                print()
                print(extra)
        print()
        print(stats.render_rounds(bench.results))
        if bench.errors:
            status = 1
            print("\nerrors:")
            for error in bench.errors:
                print(f"  {error}")
        if args.json:
            args.json.write_text(json.dumps({"command": command, "started": started.isoformat(),
                                             "settings": _asdict(settings), "results": bench.results,
                                             "noise": bench.noise, "errors": bench.errors}, indent=2))  # fmt: skip
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\nbench: interrupted ({str(exc) or 'SIGINT'}), cleaning up", file=sys.stderr)
        status = 130
    except LabError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)  # holds the private keys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return status


def _asdict(settings: Settings) -> dict[str, int]:
    return {name: getattr(settings, name) for name in Settings.__slots__}


if __name__ == "__main__":
    raise SystemExit(main())
