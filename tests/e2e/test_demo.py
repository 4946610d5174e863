"""End-to-end: `mtlsmesh demo`, the README's main command, passes and leaves nothing behind, in identity mode (the
default: the SVIDs from the CA service, each renewed while the demo runs) and with SVID files (`--files`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtlsmesh.lab import netns
from mtlsmesh.lab.pods import child_env
from tests.e2e import harness

pytestmark = pytest.mark.root


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
                "23/23 checks passed",
            ),
        ),
        (("--files",), ("18/18 checks passed",)),
    ],
)
def test_demo_passes_and_cleans_up(flags: tuple[str, ...], evidence: tuple[str, ...]) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "mtlsmesh", "demo", "--requests", "2", *flags],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    prefix = f"mm{child.pid}a-"  # the demo's only lab
    try:
        out, _ = child.communicate(timeout=180)
        assert child.returncode == 0, out[-3000:]
        assert out.rstrip().endswith("PASS")
        assert "[FAIL]" not in out
        for shown in (
            "MTLSMESH_OUTPUT",
            "application_data",
            "peer_id=spiffe://cluster.local/ns/default/sa/",
            *evidence,
        ):
            assert shown in out
        # Checked before the safety net below: the demo itself must have removed all of it.
        assert not harness.leftovers(prefix)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        netns.cleanup_stale(prefix)
