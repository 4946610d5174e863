"""The fuzz harnesses (tests/fuzz), run briefly: a bounded number of inputs each, so that `make test` (and CI) keeps
them working and catches what a short run finds. A developer runs them for minutes (see each harness)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = 5000
LIMIT = 120  # seconds a brief run may take, whatever the machine's load


@pytest.mark.parametrize("harness", ["records_fuzz", "sniff_fuzz"])
def test_a_brief_fuzz_run_finds_nothing(harness: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    args = [sys.executable, "-m", f"tests.fuzz.{harness}", f"-runs={RUNS}", "-max_total_time=60"]
    args.append(f"-artifact_prefix={tmp_path}/")
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {RUNS} runs" in done.stderr, done.stderr[-1000:]
    assert not list(tmp_path.iterdir())  # no crash or timeout input written
