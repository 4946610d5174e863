"""The demo's HTML page in a real browser: headless Chromium (Debian's `chromium`) loads it, builds the DOM with
the picture's SVG elements, every hop's arrow with both SPIFFE IDs and every identity in the tables, and takes a
screenshot (into a temp directory, never the repository). The e2e demo test does the same with a real run's page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mtlsmesh.lab import report
from tests.demo_report import check_rendered, chromium, render_in_chromium, sample

BROWSER = chromium()


@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    assert BROWSER is not None
    data = sample()
    page = tmp_path / "demo.html"
    page.write_text(report.render_html(data), encoding="utf-8")
    dom, shot = render_in_chromium(page, BROWSER)
    try:
        check_rendered(dom, shot, data)
    finally:
        shutil.rmtree(shot.parent, ignore_errors=True)
