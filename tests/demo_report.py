"""A demo report as the demo gathers it (bookinfo's pods and hops), and the headless-Chromium check of its page,
shared by the unit, integration and end-to-end tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mtlsmesh.lab import report

TD = "spiffe://cluster.local/ns/default/sa/"
CHROMIUM_TIMEOUT = 90.0  # a cold start on a loaded machine takes seconds; this bounds a hung one


def sample(*, evidence: str = "Chain OUTPUT (policy ACCEPT)") -> report.DemoReport:
    names = ("productpage", "details", "reviews", "ratings", "sleep")
    pods = tuple(report.Pod(name, f"198.18.0.{10 + i}", TD + name, (name,)) for i, name in enumerate(names))
    pods += (report.Pod("legacy", "198.18.0.15", None, ("legacy",)),)
    calls = (("sleep", "productpage"), ("productpage", "details"), ("productpage", "reviews"), ("reviews", "ratings"))
    hops = tuple(
        report.Hop(a, b, f"198.19.0.{10 + names.index(b)}:9080", "mtls", TD + a, TD + b, TD + b, TD + a, 2, 2)
        for a, b in calls
    )
    rules = (
        report.Rule("OUTPUT", 15, "MTLSMESH_OUTPUT", "", "every TCP packet the pod sends"),
        report.Rule("MTLSMESH_OUTPUT", 2, "RETURN", "out lo from 127.0.0.6", "the inbound sidecar's dial to the app"),
        report.Rule("MTLSMESH_OUTPUT", 6, "RETURN", "owner UID match 1337", "the sidecar's own connections"),
        report.Rule("MTLSMESH_OUTPUT", 0, "RETURN", "to 127.0.0.1", ""),
        report.Rule("MTLSMESH_REDIRECT", 4, "REDIRECT", "redir ports 15001", "to the outbound sidecar"),
    )
    return report.DemoReport(
        title="mtlsmesh demo: bookinfo",
        pods=pods,
        hops=hops,
        flows=(report.Flow("198.18.0.10:43208 -> 198.18.0.12:9080", 2320, "handshake x1, application_data x5"),),
        sockets=(report.Socket("productpage", "0.0.0.0:15001", 1337, 101, "python", "outbound listener"),),
        processes=(report.Process("productpage", 101, 1337, "python -m mtlsmesh sidecar --config sidecar.yaml"),),
        rules_pod="productpage",
        rules=rules,
        checks=(report.CheckLine("every request answered", True, "2/2"),),
        evidence=(report.Evidence("iptables -t nat -L -v -n", evidence),),
    )


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(page: Path, browser: str) -> tuple[str, Path]:
    """Load the page in headless Chromium: (the DOM it built, a screenshot in a temp directory outside the
    repository). Chromium runs with its own profile directory, removed by the caller's temp dir."""
    work = Path(tempfile.mkdtemp(prefix="mtlsmesh-report-"))
    base = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={work / 'profile'}",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT,
        check=True,
    ).stdout
    shot = work / "report.png"
    subprocess.run(
        [*base, "--window-size=1400,1800", f"--screenshot={shot}", page.resolve().as_uri()],
        capture_output=True,
        timeout=CHROMIUM_TIMEOUT,
        check=True,
        cwd=work,
    )
    return dom, shot


def check_rendered(dom: str, shot: Path, data: report.DemoReport) -> None:
    """The page rendered: the picture's SVG elements are in the DOM Chromium built, every hop has its arrow with
    both SPIFFE IDs on it, every identity is in the tables, and the screenshot is a real PNG image."""
    assert re.search(r"<svg[^>]*\bid=\"mesh\"", dom), dom[:2000]
    picture = dom[dom.index('id="mesh"') : dom.index("</svg>")]
    assert picture.count('class="pod"') == len(data.pods)
    assert picture.count('class="sidecar"') == sum(pod.spiffe_id is not None for pod in data.pods)
    assert picture.count("<line ") >= len(data.hops)
    for hop in data.hops:
        arrow = picture[picture.index(f'data-hop="{hop.caller}-{hop.callee}"') :]
        arrow = arrow[: arrow.index("</g>")]
        assert f"from {hop.source_id}" in arrow and f"to {hop.destination_id}" in arrow, arrow
    tables = dom[dom.index('<table id="identities"') :]
    for hop in data.hops:
        assert f"{hop.caller} -&gt; {hop.callee}" in tables
        assert hop.source_id in tables and hop.destination_id in tables
    for pod in data.pods:
        assert f'data-pod="{pod.name}"' in picture
    assert "<details>" in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
