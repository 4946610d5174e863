"""`python -m bench.datapath` runs its three loops to the end and prints a figure for each."""

from __future__ import annotations

import re

import pytest

from bench import datapath


def test_every_loop_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert datapath.main(["--requests", "20", "--megabytes", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for name, unit in (("request", "us"), ("request-plain", "us"), ("stream", "s/GB")):
        match = re.search(rf"^  {name} +min +([\d.]+) {unit} +median +([\d.]+) {unit}$", out, re.MULTILINE)
        assert match is not None, out
        assert float(match.group(1)) > 0


@pytest.mark.parametrize("flag", ["--requests", "--megabytes", "--repeat"])
def test_a_count_below_one_is_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        datapath.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err
