"""Pure arithmetic and rendering for the benchmark: medians, percentiles, ratios, the results table.

No I/O here, so the numbers that end up in the table can be checked by reading ten lines.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Every tool a run can measure, in the order of the table's columns. "direct" is the load tool talking to the
# backends with no tunnel at all: the ceiling a tunnel can approach on this machine, not a competitor.
TOOLS: tuple[str, ...] = ("stunnel", "haproxy", "mtlsmesh", "direct")
C_PEERS: tuple[str, ...] = ("stunnel", "haproxy")  # the tunnels written in C that mtlsmesh is measured against
OPENSSL_TOOL = "mtlsmesh-openssl"  # the sidecars with `record_layer: openssl`, only when asked for
ONE_WORKER_TOOL = "mtlsmesh-1w"  # the sidecars with `workers: 1` (`mtlsmesh` runs the default), in every default run
CLASSIC_TOOL = "mtlsmesh-classic"  # the sidecars with `key_exchange: classic`, only when asked for
EXTRA_TOOLS: tuple[str, ...] = (ONE_WORKER_TOOL, OPENSSL_TOOL, CLASSIC_TOOL)

Results = dict[str, dict[str, list[float]]]


class Better(enum.Enum):
    HIGHER = "higher"
    LOWER = "lower"


@dataclass(frozen=True, slots=True)
class Target:
    """A goal for one metric: on the ratio mtlsmesh / best C peer, or on mtlsmesh's own value."""

    text: str  # shown in the table, e.g. ">= 1.0x"
    ratio_min: float | None = None
    ratio_max: float | None = None
    value_max: float | None = None
    against: str = "best"  # the ratio judged: mtlsmesh / "best" C peer, or mtlsmesh / "stunnel"
    tool: str = "mtlsmesh"  # whose median the value target is judged on (e.g. the one-worker pair's PSS)

    def met(self, ratio: float | None, value: float | None) -> bool | None:
        """True/False when the target can be judged from the numbers, None when a number is missing."""
        checks: list[bool] = []
        if self.ratio_min is not None or self.ratio_max is not None:
            if ratio is None:
                return None
            if self.ratio_min is not None:
                checks.append(ratio >= self.ratio_min)
            if self.ratio_max is not None:
                checks.append(ratio <= self.ratio_max)
        if self.value_max is not None:
            if value is None:
                return None
            checks.append(value <= self.value_max)
        return all(checks) if checks else None


AT_MOST_BEST = Target("<= 1.0x", ratio_max=1.0)  # as cheap as the best C peer, or cheaper


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    better: Better
    target: Target | None = None


# The order here is the order of the table. The targets are issue 16's, on the ratio to the best C peer of the row
# unless they say otherwise; the rows it sets none for (CPU per request and per GB) aim at the best C peer's figure.
METRICS: tuple[Metric, ...] = (
    Metric("rps", "1 KiB requests, 16 kept-alive conns", "req/s", Better.HIGHER, Target(">= 1.2x", ratio_min=1.2)),
    # Proxy CPU (both processes of a pair, user+system) per unit of work: steadier than rates on a shared machine.
    Metric("cpu_req", "proxy CPU per 1 KiB request", "CPU us", Better.LOWER, AT_MOST_BEST),
    Metric("p50", "64 B round trip p50", "us", Better.LOWER, AT_MOST_BEST),
    Metric("p99", "64 B round trip p99", "us", Better.LOWER),
    Metric("cps", "new connections (full mTLS)", "conn/s", Better.HIGHER, Target(">= 1.5x", ratio_min=1.5)),
    Metric("cpu_conn", "proxy CPU per new connection", "CPU ms", Better.LOWER, Target("<= 0.7x", ratio_max=0.7)),
    Metric("tput1", "throughput, 1 stream", "Mbit/s", Better.HIGHER,
           Target(">= 1.5x stunnel", ratio_min=1.5, against="stunnel")),
    Metric("tput4", "throughput, 4 streams", "Mbit/s", Better.HIGHER, Target(">= 1.3x", ratio_min=1.3)),
    Metric("cpu_gb", "proxy CPU per GB, 1 stream", "CPU s", Better.LOWER, AT_MOST_BEST),
    Metric("mem", "memory per idle connection", "KiB", Better.LOWER, Target("<= 30 KiB", value_max=30.0)),
    Metric("pss", "PSS of both proxies, idle", "MiB", Better.LOWER,
           Target("<= 40 MiB, 1 worker", value_max=40.0, tool="mtlsmesh-1w")),
)  # fmt: skip


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` in [0, 1]): always one of the samples, never interpolated."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} outside [0, 1]")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(mesh: float | None, other: float | None) -> float | None:
    if mesh is None or other is None or other == 0:
        return None
    return mesh / other


def best_c_peer(metric: Metric, results: Results) -> tuple[str, float] | None:
    """The C peer with the best median for `metric` (highest or lowest, as the metric wants), or None."""
    medians = [(tool, median(results.get(tool, {}).get(metric.key, []))) for tool in C_PEERS]
    known = [(tool, value) for tool, value in medians if value is not None]
    if not known:
        return None
    pick = max if metric.better is Better.HIGHER else min
    return pick(known, key=lambda item: item[1])


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def render_table(results: Results) -> str:
    """A Markdown table: one row per metric, medians over rounds per tool, mtlsmesh against stunnel and against
    the best C peer (named), the target and whether the median meets it.

    `results[tool][metric]` holds one value per round that produced one (a failed round adds nothing).
    """
    header = ("| metric | unit | stunnel | haproxy | mtlsmesh | no tunnel | mtlsmesh/stunnel | mtlsmesh/best C peer "
              "| target | met | rounds (s/h/m/d) |")  # fmt: skip
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for metric in METRICS:
        values = {tool: results.get(tool, {}).get(metric.key, []) for tool in TOOLS}
        medians = {tool: median(values[tool]) for tool in TOOLS}
        mesh = medians["mtlsmesh"]
        best = best_c_peer(metric, results)
        best_ratio = ratio(mesh, best[1]) if best is not None else None
        best_text = "-" if best is None or best_ratio is None else f"{best_ratio:.2f}x ({best[0]})"
        target = metric.target
        met = None
        if target is not None:
            judged = best_ratio if target.against == "best" else ratio(mesh, medians["stunnel"])
            met = target.met(judged, median(results.get(target.tool, {}).get(metric.key, [])))
        cells = " | ".join(_fmt(medians[tool]) for tool in TOOLS)
        rounds = "/".join(str(len(values[tool])) for tool in TOOLS)
        lines.append(
            f"| {metric.label} | {metric.unit} | {cells} | {_fmt_ratio(ratio(mesh, medians['stunnel']))} | "
            f"{best_text} | {target.text if target else '-'} | {_fmt_met(met)} | {rounds} |"
        )
    return "\n".join(lines)


def render_record_layers(results: Results) -> str:
    """The two record paths side by side (empty when the openssl one did not run): medians and openssl/own."""
    return _render_variant(results, OPENSSL_TOOL, ("mtlsmesh (own)", "mtlsmesh (openssl)", "openssl/own", "o/s"))


def render_key_exchange(results: Results) -> str:
    """X25519 alone beside the default hybrid group (empty when the classic pair did not run)."""
    return _render_variant(results, CLASSIC_TOOL, ("mtlsmesh (hybrid)", "mtlsmesh (classic)", "classic/hybrid",
                                                   "h/c"))  # fmt: skip


def render_workers(results: Results) -> str:
    """mtlsmesh with one worker beside the default, `workers: auto` (empty when the one-worker pair did not run)."""
    return _render_variant(results, ONE_WORKER_TOOL, ("mtlsmesh (default workers)", "mtlsmesh (1 worker)",
                                                      "1 worker/default", "d/1"))  # fmt: skip


def _render_variant(results: Results, variant: str, labels: tuple[str, str, str, str]) -> str:
    if not any(results.get(variant, {}).values()):
        return ""
    base_label, variant_label, ratio_label, rounds_label = labels
    lines = [f"| metric | unit | {base_label} | {variant_label} | {ratio_label} | rounds ({rounds_label}) |"]
    lines.append("| --- | --- | ---: | ---: | ---: | --- |")
    for metric in METRICS:
        own_values = results.get("mtlsmesh", {}).get(metric.key, [])
        other_values = results.get(variant, {}).get(metric.key, [])
        own, other = median(own_values), median(other_values)
        lines.append(
            f"| {metric.label} | {metric.unit} | {_fmt(own)} | {_fmt(other)} | {_fmt_ratio(ratio(other, own))} | "
            f"{len(own_values)}/{len(other_values)} |"
        )
    return "\n".join(lines)


def render_rounds(results: Results) -> str:
    """Every round's value, so a reader can see the spread behind each median."""
    lines = []
    for metric in METRICS:
        parts = []
        for tool in (*TOOLS, *EXTRA_TOOLS):
            values = results.get(tool, {}).get(metric.key, [])
            if values:
                parts.append(f"{tool} [{', '.join(_fmt(v) for v in values)}]")
        lines.append(f"{metric.key:8} {metric.unit:7} " + ("  ".join(parts) if parts else "-"))
    return "\n".join(lines)


def render_noise(noise: Sequence[float], cpus: int) -> str:
    """One line on the CPU that processes the benchmark did not start used during its measurements.

    `noise` holds one value per measurement step: the share of one CPU (0.25 = a quarter of a CPU) used by other
    processes while the step ran.
    """
    if not noise:
        return "noise: not measured"
    med, top = median(noise), max(noise)
    assert med is not None
    line = (f"noise (CPU used by processes this run did not start, per step, {len(noise)} steps): median "
            f"{med * 100:.0f}%, max {top * 100:.0f}% of one CPU, on {cpus} CPUs")  # fmt: skip
    if top > 0.25 * cpus or med > 0.1 * cpus:
        line += "; the machine was busy: compare tools within this run only, and rerun on a quiet machine"
    else:
        line += "; a quiet run"
    return line
