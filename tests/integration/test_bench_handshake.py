"""`python -m bench.handshake` runs its three loops to the end and prints a figure for each."""

from __future__ import annotations

import re

import pytest

from bench import handshake


@pytest.mark.parametrize("flags", [[], ["--auto-chain"], ["--key-exchange", "classic"]])
def test_every_loop_runs_and_reports(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert handshake.main(["--count", "3", *flags]) == 0
    out = capsys.readouterr().out
    for name in ("openssl", "tlsstream", "plain"):
        match = re.search(rf"^  {name} +(\d+) us$", out, re.MULTILINE)
        assert match is not None, out
        assert int(match.group(1)) > 0


def test_a_count_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        handshake.main(["--count", "0"])
    assert exit_info.value.code == 2
    assert "--count must be at least 1" in capsys.readouterr().err
