"""Pure arithmetic and rendering for the benchmark: medians, percentiles, ratios, the results table.

No I/O here, so the numbers that end up in the table can be checked by reading ten lines.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


class Better(enum.Enum):
    HIGHER = "higher"
    LOWER = "lower"


@dataclass(frozen=True, slots=True)
class Target:
    """A goal for one metric: either on the mtlsmesh/stunnel ratio or on mtlsmesh's own value."""

    text: str  # shown in the table, e.g. ">= 1.3x"
    ratio_min: float | None = None
    ratio_max: float | None = None
    value_max: float | None = None

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


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    better: Better
    target: Target | None = None


# The order here is the order of the table.
METRICS: tuple[Metric, ...] = (
    Metric("tput1", "throughput, 1 stream", "Mbit/s", Better.HIGHER, Target(">= 1.3x", ratio_min=1.3)),
    Metric("tput4", "throughput, 4 streams", "Mbit/s", Better.HIGHER),
    Metric("cps", "new connections (full mTLS)", "conn/s", Better.HIGHER, Target(">= 1.3x", ratio_min=1.3)),
    Metric("p50", "64 B round trip p50", "us", Better.LOWER, Target("<= 1.8x", ratio_max=1.8)),
    Metric("p99", "64 B round trip p99", "us", Better.LOWER),
    Metric("mem", "memory per idle connection", "KiB", Better.LOWER, Target("<= 50 KiB", value_max=50.0)),
    # Proxy CPU (both processes of a pair, user+system) per unit of work: steadier than rates on a shared machine.
    Metric("cpu_gb", "proxy CPU per GB, 1 stream", "CPU s", Better.LOWER),
    Metric("cpu_conn", "proxy CPU per new connection", "CPU ms", Better.LOWER),
)


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


def ratio(mesh: float | None, stunnel: float | None) -> float | None:
    if mesh is None or stunnel is None or stunnel == 0:
        return None
    return mesh / stunnel


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def render_table(results: dict[str, dict[str, list[float]]]) -> str:
    """A Markdown table: one row per metric, medians over rounds, the mtlsmesh/stunnel ratio and the target.

    `results[tool][metric]` holds one value per round that produced one (a failed round adds nothing).
    """
    header = "| metric | unit | stunnel | mtlsmesh | mtlsmesh/stunnel | target | met | rounds (s/m) |"
    lines = [header, "| --- | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for metric in METRICS:
        s_values = results.get("stunnel", {}).get(metric.key, [])
        m_values = results.get("mtlsmesh", {}).get(metric.key, [])
        s_med, m_med = median(s_values), median(m_values)
        r = ratio(m_med, s_med)
        target = metric.target
        met = target.met(r, m_med) if target is not None else None
        lines.append(
            f"| {metric.label} | {metric.unit} | {_fmt(s_med)} | {_fmt(m_med)} | "
            f"{'-' if r is None else f'{r:.2f}x'} | {target.text if target else '-'} | {_fmt_met(met)} | "
            f"{len(s_values)}/{len(m_values)} |"
        )
    return "\n".join(lines)


OPENSSL_TOOL = "mtlsmesh-openssl"  # the sidecars with `record_layer: openssl` (`--tools ...,mtlsmesh-openssl`)


def render_record_layers(results: dict[str, dict[str, list[float]]]) -> str:
    """The two record paths side by side (empty when the openssl one did not run): medians and openssl/own."""
    if not any(results.get(OPENSSL_TOOL, {}).values()):
        return ""
    lines = ["| metric | unit | mtlsmesh (own) | mtlsmesh (openssl) | openssl/own | rounds (o/s) |"]
    lines.append("| --- | --- | ---: | ---: | ---: | --- |")
    for metric in METRICS:
        own_values = results.get("mtlsmesh", {}).get(metric.key, [])
        ssl_values = results.get(OPENSSL_TOOL, {}).get(metric.key, [])
        own, other = median(own_values), median(ssl_values)
        r = ratio(other, own)
        lines.append(
            f"| {metric.label} | {metric.unit} | {_fmt(own)} | {_fmt(other)} | {'-' if r is None else f'{r:.2f}x'} | "
            f"{len(own_values)}/{len(ssl_values)} |"
        )
    return "\n".join(lines)


def render_rounds(results: dict[str, dict[str, list[float]]]) -> str:
    """Every round's value, so a reader can see the spread behind each median."""
    lines = []
    for metric in METRICS:
        parts = []
        for tool in ("stunnel", "mtlsmesh", OPENSSL_TOOL):
            if tool == OPENSSL_TOOL and tool not in results:
                continue
            values = results.get(tool, {}).get(metric.key, [])
            parts.append(f"{tool} [{', '.join(_fmt(v) for v in values)}]")
        lines.append(f"{metric.key:6} {metric.unit:7} " + "  ".join(parts))
    return "\n".join(lines)
