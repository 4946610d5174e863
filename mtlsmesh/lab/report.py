"""The demo's views, as text tables and as one self-contained HTML page (`mtlsmesh demo --report FILE.html`).

Pure: the demo gathers what it saw into a `DemoReport` (frozen values, plain strings and numbers) and this module
turns it into text (`table`) or HTML (`render_html`), touching no file, socket or process. The page has no
external resource (inline CSS, an inline SVG picture, no script): the picture shows the pods with their app and
sidecar, one arrow per call with the SPIFFE IDs on it, and the capture path of one pod with its rules' packet
counters; the tables follow, and the raw evidence is folded below in `<details>` elements. Everything taken from
the run is escaped, so a log line or a SPIFFE ID cannot add markup.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

from mtlsmesh.conventions import INBOUND_PORT, OUTBOUND_PORT, PROXY_UID

# Our chain names and the ones Istio's init step creates for the same job.
CHAIN_NAMES = (
    ("MTLSMESH_OUTPUT", "ISTIO_OUTPUT", "nat OUTPUT jumps here: what an app sends out"),
    ("MTLSMESH_REDIRECT", "ISTIO_REDIRECT", "REDIRECT to the outbound listener (15001)"),
    ("MTLSMESH_INBOUND", "ISTIO_INBOUND", "nat PREROUTING jumps here: what arrives for the pod"),
    ("MTLSMESH_IN_REDIRECT", "ISTIO_IN_REDIRECT", "REDIRECT to the inbound listener (15006)"),
    ("MTLSMESH_DIVERT", "ISTIO_DIVERT", "TPROXY mode: mark packets of connections already diverted"),
    ("MTLSMESH_TPROXY", "ISTIO_TPROXY", "TPROXY mode: hand new inbound connections to 15006"),
)


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    ip: str
    spiffe_id: str | None  # None: outside the mesh (no sidecar)
    apps: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Hop:
    caller: str
    callee: str
    target: str  # the address the caller's app dialed (a Service VIP and port)
    decision: str  # as the callee's sidecar logged it (mtls, passthrough, refuse, ...); "" when not seen
    source_id: str  # the caller's SPIFFE ID
    destination_id: str  # the callee's SPIFFE ID
    logged_by_caller: str  # the peer ID the caller's sidecar logged (the server's), "" when not seen
    logged_by_callee: str  # the peer ID the callee's sidecar logged (the client's), "" when not seen
    metrics_out: float = 0.0  # opened connections with both principals, on the caller's sidecar
    metrics_in: float = 0.0  # the same on the callee's sidecar
    security_policy: str = "mutual_tls"


@dataclass(frozen=True, slots=True)
class Flow:
    flow: str  # "a:p -> b:q"
    size: int
    records: str  # "handshake x1, application_data x5"


@dataclass(frozen=True, slots=True)
class Socket:
    pod: str
    address: str  # "0.0.0.0:15001"
    uid: int
    pid: int | None
    command: str
    role: str  # what listens there (outbound listener, an app, ...)


@dataclass(frozen=True, slots=True)
class Process:
    pod: str
    pid: int
    uid: int
    command: str


@dataclass(frozen=True, slots=True)
class Rule:
    chain: str
    packets: int
    target: str
    match: str  # the rest of the rule as `iptables -L -v -n` prints it
    note: str  # why this rule matters; "" for the rest


@dataclass(frozen=True, slots=True)
class CheckLine:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Evidence:
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class DemoReport:
    title: str
    pods: tuple[Pod, ...]
    hops: tuple[Hop, ...]
    flows: tuple[Flow, ...] = ()
    sockets: tuple[Socket, ...] = ()
    processes: tuple[Process, ...] = ()
    rules_pod: str = ""  # the pod whose capture rules are shown
    rules: tuple[Rule, ...] = ()
    checks: tuple[CheckLine, ...] = ()
    evidence: tuple[Evidence, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)


# ---------------------------------------------------------------------------------------------------------------
# Text

Grid = tuple[tuple[str, ...], Sequence[tuple[str, ...]]]  # a table's headers and rows


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    """Aligned columns: a header line, a rule of dashes, one line per row (the last column is not padded)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns")
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(row: Sequence[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        return (indent + "  ".join([*padded, row[-1]])).rstrip()

    return [line(list(headers)), line(["-" * width for width in widths]), *(line(row) for row in cells)]


def hop_rows(hops: Sequence[Hop]) -> Grid:
    headers = ("caller", "callee", "dialed", "decision", "policy")
    return headers, [(h.caller, h.callee, h.target, h.decision or "(not seen)", h.security_policy) for h in hops]


def identity_rows(hops: Sequence[Hop]) -> Grid:
    """Each hop's two SPIFFE IDs, and whether each sidecar's log and metrics named them."""

    def seen(logged: str, expected: str) -> str:
        return "yes" if logged == expected else f"NO ({logged or 'nothing'})"

    headers = ("hop", "source (client)", "destination (server)", "caller log", "callee log", "metrics out/in")
    rows = [
        (
            f"{h.caller} -> {h.callee}",
            h.source_id,
            h.destination_id,
            seen(h.logged_by_caller, h.destination_id),
            seen(h.logged_by_callee, h.source_id),
            f"{h.metrics_out:g}/{h.metrics_in:g}",
        )
        for h in hops
    ]
    return headers, rows


def flow_rows(flows: Sequence[Flow]) -> Grid:
    return ("flow", "bytes", "TLS records"), [(f.flow, str(f.size), f.records or "none") for f in flows]


def socket_rows(sockets: Sequence[Socket]) -> Grid:
    headers = ("pod", "listening on", "uid", "pid/command", "what")
    rows = [
        (s.pod, s.address, str(s.uid), f"{s.pid if s.pid is not None else '?'}/{s.command}", s.role) for s in sockets
    ]
    return headers, rows


def process_rows(processes: Sequence[Process]) -> Grid:
    return ("pod", "pid", "uid", "command"), [(p.pod, str(p.pid), str(p.uid), p.command) for p in processes]


def rule_rows(rules: Sequence[Rule]) -> Grid:
    headers = ("chain", "pkts", "target", "match", "why it matters")
    return headers, [(r.chain, str(r.packets), r.target, r.match, r.note) for r in rules]


def chain_rows() -> Grid:
    return ("mtlsmesh", "Istio", "role"), [tuple(row) for row in CHAIN_NAMES]


# ---------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; color: #1b1f24; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccd; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #eef1f6; } td.num { text-align: right; } tr.note td { background: #fff7df; }
code, pre, td { font-family: ui-monospace, monospace; } th { font-family: system-ui, sans-serif; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
.pass { color: #11772d; font-weight: bold; } .fail { color: #b3141e; font-weight: bold; }
details { margin: 0.4em 0; } summary { cursor: pointer; font-weight: 600; }
svg text { font-family: ui-monospace, monospace; }
svg .hop text { paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
"""

_POD_W, _POD_H, _COL_GAP, _ROW_GAP, _MARGIN = 250, 120, 300, 40, 20


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _layout(pods: Sequence[Pod], hops: Sequence[Hop]) -> dict[str, tuple[int, int]]:
    """Column = the call depth (a pod no one calls starts at 0), row = order within the column; pods in no hop
    go below the first column."""
    depth: dict[str, int] = {}
    callees = {hop.callee for hop in hops}
    for hop in hops:
        if hop.caller not in callees:
            depth.setdefault(hop.caller, 0)
    for _ in range(len(hops) + 1):  # bounded relaxation over the (acyclic) calls
        for hop in hops:
            if hop.caller in depth:
                depth[hop.callee] = max(depth.get(hop.callee, 0), depth[hop.caller] + 1)
    rows: dict[int, int] = {}
    spots: dict[str, tuple[int, int]] = {}
    for pod in sorted(pods, key=lambda p: p.name not in depth):  # stable: the pods in a hop first
        column = depth.get(pod.name, 0)
        spots[pod.name] = (column, rows.get(column, 0))
        rows[column] = rows.get(column, 0) + 1
    return spots


def _xy(spot: tuple[int, int]) -> tuple[int, int]:
    column, row = spot
    return _MARGIN + column * (_POD_W + _COL_GAP), _MARGIN + row * (_POD_H + _ROW_GAP)


def render_svg(report: DemoReport) -> str:
    """The picture: pods (an app box and, for mesh pods, a sidecar box), an arrow per hop from the caller's
    sidecar to the callee's with both SPIFFE IDs on it, and the capture path of `rules_pod` with its counters."""
    spots = _layout(report.pods, report.hops)
    columns = max((c for c, _ in spots.values()), default=0) + 1
    rows = max((r for _, r in spots.values()), default=0) + 1
    width = 2 * _MARGIN + columns * _POD_W + (columns - 1) * _COL_GAP
    path_rules = [rule for rule in report.rules if rule.note]
    path_top = _MARGIN + rows * (_POD_H + _ROW_GAP) + 10
    height = path_top + (40 + 26 * len(path_rules) if path_rules else 0) + _MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="mesh" role="img" viewBox="0 0 {width} {height}"'
        f' width="100%" aria-label="the mesh: pods, sidecars and calls">',
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7'"
        " orient='auto-start-reverse'><path d='M 0 0 L 10 5 L 0 10 z' fill='#2457a6'/></marker></defs>",
    ]
    for pod in report.pods:
        x, y = _xy(spots[pod.name])
        mesh = pod.spiffe_id is not None
        fill = "#f3f7ff" if mesh else "#f4f4f4"
        out.append(f'<g class="pod" data-pod="{_esc(pod.name)}">')
        dashed = "" if mesh else ' stroke-dasharray="6 4"'
        out.append(
            f'<rect x="{x}" y="{y}" width="{_POD_W}" height="{_POD_H}" rx="8" fill="{fill}" stroke="#55607a"{dashed}/>'
        )
        out.append(f'<text x="{x + 10}" y="{y + 20}" font-size="15" font-weight="bold">{_esc(pod.name)}</text>')
        out.append(f'<text x="{x + 10}" y="{y + 38}" font-size="11">{_esc(pod.ip)}</text>')
        apps = ", ".join(pod.apps) or "(no app)"
        out.append(f'<rect x="{x + 10}" y="{y + 48}" width="105" height="60" rx="4" fill="#fff" stroke="#8890a0"/>')
        out.append(f'<text x="{x + 16}" y="{y + 66}" font-size="11">app</text>')
        out.append(f'<text x="{x + 16}" y="{y + 82}" font-size="10">{_esc(apps[:16])}</text>')
        if mesh:
            out.append(
                f'<rect class="sidecar" x="{x + 125}" y="{y + 48}" width="115" height="60" rx="4" fill="#dfe9ff"'
                ' stroke="#2457a6"/>'
            )
            out.append(f'<text x="{x + 131}" y="{y + 66}" font-size="11">sidecar uid {PROXY_UID}</text>')
            out.append(f'<text x="{x + 131}" y="{y + 82}" font-size="10">out :{OUTBOUND_PORT}</text>')
            out.append(f'<text x="{x + 131}" y="{y + 97}" font-size="10">in  :{INBOUND_PORT}</text>')
        else:
            out.append(f'<text x="{x + 125}" y="{y + 80}" font-size="10">outside the mesh</text>')
        out.append("</g>")
    for index, hop in enumerate(report.hops):
        if hop.caller not in spots or hop.callee not in spots:
            continue
        x1, y1 = _xy(spots[hop.caller])
        x2, y2 = _xy(spots[hop.callee])
        sx, sy = x1 + _POD_W, y1 + 78 + 6 * (index % 3) - 6
        ex, ey = x2, y2 + 78
        ok = hop.decision == "mtls" and hop.logged_by_callee == hop.source_id
        colour = "#2457a6" if ok else "#b3141e"
        mx, my = (sx + ex) / 2, (sy + ey) / 2
        out.append(f'<g class="hop" data-hop="{_esc(hop.caller)}-{_esc(hop.callee)}">')
        out.append(
            f'<line x1="{sx}" y1="{sy}" x2="{ex}" y2="{ey}" stroke="{colour}" stroke-width="2"'
            ' marker-end="url(#arrow)"/>'
        )
        out.append(
            f'<text x="{mx:.0f}" y="{my - 20:.0f}" font-size="10" text-anchor="middle" fill="{colour}">'
            f"{_esc(hop.decision or 'not seen')} to {_esc(hop.target)}</text>"
        )
        out.append(
            f'<text x="{mx:.0f}" y="{my - 8:.0f}" font-size="9.5" text-anchor="middle">'
            f"from {_esc(hop.source_id)}</text>"
        )
        out.append(
            f'<text x="{mx:.0f}" y="{my + 14:.0f}" font-size="9.5" text-anchor="middle">'
            f"to {_esc(hop.destination_id)}</text>"
        )
        out.append("</g>")
    if path_rules:
        out.append('<g class="chain-path">')
        out.append(
            f'<text x="{_MARGIN}" y="{path_top + 14}" font-size="13" font-weight="bold">'
            f"capture path in {_esc(report.rules_pod)} (nat table, packet counters)</text>"
        )
        for index, rule in enumerate(path_rules):
            y = path_top + 30 + 26 * index
            out.append(
                f'<rect class="rule" x="{_MARGIN}" y="{y}" width="{width - 2 * _MARGIN}" height="22" rx="3"'
                ' fill="#fff7df" stroke="#c9a640"/>'
            )
            out.append(
                f'<text x="{_MARGIN + 8}" y="{y + 15}" font-size="11">'
                f"{_esc(rule.chain)} → {_esc(rule.target)}  [{rule.packets} pkts]  {_esc(rule.match)}"
                f"  — {_esc(rule.note)}</text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


_NUM = ' class="num"'


def _html_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], css_id: str, highlight: Sequence[bool] = ()
) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        marked = ' class="note"' if index < len(highlight) and highlight[index] else ""
        cells = "".join(f"<td{_NUM if cell.isdigit() else ''}>{_esc(cell)}</td>" for cell in row)
        body.append(f"<tr{marked}>{cells}</tr>")
    return f'<table id="{css_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(report: DemoReport) -> str:
    """The whole page: one string, nothing to fetch."""
    verdict = "PASS" if report.passed else "FAIL"
    passed = sum(check.ok for check in report.checks)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(report.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(report.title)}</h1>",
        f'<p>Result: <span id="verdict" class="{verdict.lower()}">{verdict}</span>, '
        f"{passed}/{len(report.checks)} checks passed.</p>",
        "<h2>The mesh</h2>",
        render_svg(report),
        "<h2>Pods</h2>",
        _html_table(
            ("pod", "address", "identity", "apps"),
            [(p.name, p.ip, p.spiffe_id or "outside the mesh", ", ".join(p.apps)) for p in report.pods],
            "pods",
        ),
        "<h2>Hops</h2>",
        _html_table(*hop_rows(report.hops), "hops"),
        "<h2>Identities on each hop</h2>",
        _html_table(*identity_rows(report.hops), "identities"),
    ]
    if report.flows:
        parts += ["<h2>The wire</h2>", _html_table(*flow_rows(report.flows), "flows")]
    if report.sockets:
        parts += ["<h2>Listening sockets</h2>", _html_table(*socket_rows(report.sockets), "sockets")]
    if report.processes:
        parts += ["<h2>Processes</h2>", _html_table(*process_rows(report.processes), "processes")]
    if report.rules:
        headers, rows = rule_rows(report.rules)
        parts += [
            f"<h2>Capture rules in {_esc(report.rules_pod)}</h2>",
            _html_table(headers, rows, "rules", [bool(rule.note) for rule in report.rules]),
            _html_table(*chain_rows(), "chain-names"),
        ]
    if report.checks:
        parts.append("<h2>Checks</h2><ul id='checks'>")
        for check in report.checks:
            mark = '<span class="pass">PASS</span>' if check.ok else '<span class="fail">FAIL</span>'
            detail = f" — {_esc(check.detail)}" if check.detail else ""
            parts.append(f"<li>{mark} {_esc(check.name)}{detail}</li>")
        parts.append("</ul>")
    if report.evidence:
        parts.append("<h2>Raw evidence</h2>")
        for item in report.evidence:
            parts.append(f"<details><summary>{_esc(item.title)}</summary><pre>{_esc(item.text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
