"""End-to-end: `mtlsmesh demo`, the README's main command, passes and leaves nothing behind, in identity mode (the
default: the SVIDs from the CA service, each renewed while the demo runs) and with SVID files (`--files`). The
identity-mode run also writes its page (`--report`), which headless Chromium must render with the picture, every
hop and every identity the run saw."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mtlsmesh.lab import netns, report
from mtlsmesh.lab.pods import child_env
from tests.demo_report import TD, chromium, render_in_chromium
from tests.e2e import harness

pytestmark = pytest.mark.root

HOPS = (("sleep", "productpage"), ("productpage", "details"), ("productpage", "reviews"), ("reviews", "ratings"))
# Shown and checked in both modes: the views of the investigation, then the operator's commands.
VIEWS = (
    "[PASS] every mesh pod runs its sidecar as uid 1337, and no app runs as 1337",
    "[PASS] each mesh pod's sidecar listens on 15000, 15001, 15006, 15021, 15090 as uid 1337, each app on its ports",
    "[PASS] the uid-1337 RETURN, the 127.0.0.6 RETURN and both REDIRECTs counted packets — 4/4 of them counted",
    "MTLSMESH_OUTPUT       ISTIO_OUTPUT",
    *(f"[PASS] mtlsmesh check passes in {pod}" for pod in ("productpage", "details", "reviews", "ratings", "sleep")),
    *(f"[PASS] explain {a} -> {b} agrees with what happened (mTLS to {b})" for a, b in HOPS),
    "[PASS] explain says STRICT refuses a plaintext caller, as productpage's sidecar did with legacy",
)


@pytest.mark.parametrize(
    ("flags", "evidence"),
    [
        (
            (),
            (
                "[PASS] each mesh pod enrolled once with its token",
                "[PASS] no SVID key file exists",
                "[PASS] every sidecar renewed its SVID (a new serial), with its current SVID as credential",
                "[PASS] each sidecar serves its newest SVID",
                "[PASS] the mesh answers with the renewed SVIDs",
                "36/36 checks passed",
            ),
        ),
        (("--files",), ("31/31 checks passed",)),
    ],
)
def test_demo_passes_and_cleans_up(flags: tuple[str, ...], evidence: tuple[str, ...]) -> None:
    out_dir = Path(tempfile.mkdtemp(prefix="mtlsmesh-demo-"))
    page = out_dir / "demo.html"
    with_report = ("--report", str(page)) if not flags else ()
    child = subprocess.Popen(
        [sys.executable, "-m", "mtlsmesh", "demo", "--requests", "2", *flags, *with_report],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    prefix = f"mm{child.pid}a-"  # the demo's only lab
    try:
        out, _ = child.communicate(timeout=240)
        assert child.returncode == 0, out[-3000:]
        assert out.rstrip().endswith("PASS")
        assert "[FAIL]" not in out
        for shown in (
            "MTLSMESH_OUTPUT",
            "application_data",
            "peer_id=spiffe://cluster.local/ns/default/sa/",
            *VIEWS,
            *evidence,
        ):
            assert shown in out
        # The tables: one line per hop with both identities, one line per app, no JSON cut mid-string.
        for caller, callee in HOPS:
            assert re.search(rf"{caller} -> {callee} +{TD}{caller} +{TD}{callee} +yes +yes +2/2\n", out), out
        for app in ("productpage", "details", "reviews", "ratings"):
            assert re.search(rf"\n  {app} +2 +127\.0\.0\.6 +GET /", out)
        assert "first answer: {" not in out
        # Checked before the safety net below: the demo itself must have removed all of it.
        assert not harness.leftovers(prefix)
        if with_report:
            check_page(page.read_text(encoding="utf-8"), page)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        netns.cleanup_stale(prefix)
        shutil.rmtree(out_dir, ignore_errors=True)


def check_page(text: str, page: Path) -> None:
    assert '<span id="verdict" class="pass">PASS</span>' in text and "36/36 checks passed" in text
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it): the page was not rendered")
    dom, shot = render_in_chromium(page, browser)
    try:
        assert "<svg" in dom and 'id="mesh"' in dom
        picture = dom[dom.index('id="mesh"') : dom.index("</svg>")]
        for caller, callee in HOPS:
            arrow = picture[picture.index(f'data-hop="{caller}-{callee}"') :]
            arrow = arrow[: arrow.index("</g>")]
            assert f"from {TD}{caller}" in arrow and f"to {TD}{callee}" in arrow
            assert "mtls to 198.19.0." in arrow
        assert picture.count('class="sidecar"') == 5 and picture.count('class="pod"') == 6
        assert "capture path in productpage" in picture and "owner UID match 1337" in picture
        for pod in ("productpage", "details", "reviews", "ratings", "sleep"):
            assert f"{TD}{pod}" in dom[dom.index('<table id="identities"') :]
        assert dom.count("<details>") >= 10  # logs, rules, capture, check and explain outputs, folded
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        shutil.rmtree(shot.parent, ignore_errors=True)
    assert report.CHAIN_NAMES[0][1] in text
