"""The command line's entry points: `--version`, and `python -m mtlsmesh` running the same CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtlsmesh.cli import main


def test_version_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("mtlsmesh ")


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "mtlsmesh", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: mtlsmesh" in result.stdout
