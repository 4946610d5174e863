"""`mtlsmesh completion`: scripts generated from the parser, and bash really completing with one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtlsmesh.cli import COMMANDS, completion


def complete_in_bash(script: Path, line: str) -> list[str]:
    """What bash's completion function offers for `line` (the cursor at its end), after sourcing `script`."""
    words = line.split(" ")
    probe = (
        f"source {script} || exit 3\n"
        "complete -p mtlsmesh || exit 4\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
        f"COMP_CWORD={len(words) - 1}\n"
        f"_shtab_mtlsmesh mtlsmesh {words[-1]!r} {words[-2]!r}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "complete -o bashdefault -F _shtab_mtlsmesh mtlsmesh"  # what `complete -p` shows
    return lines[1:]


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    path = tmp_path_factory.mktemp("completion") / "mtlsmesh.bash"
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "completion", "bash"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    path.write_text(result.stdout)
    return path


def test_bash_completes_every_subcommand(bash_script: Path) -> None:
    assert sorted(complete_in_bash(bash_script, "mtlsmesh ")) == sorted(COMMANDS)


def test_bash_completes_nested_commands_and_flags(bash_script: Path) -> None:
    assert complete_in_bash(bash_script, "mtlsmesh ca ins") == ["inspect"]
    assert complete_in_bash(bash_script, "mtlsmesh sidecar --con") == ["--config"]
    assert complete_in_bash(bash_script, "mtlsmesh completion t") == ["tcsh"]


@pytest.mark.parametrize("shell", ["zsh", "tcsh"])
def test_other_shells_get_a_script_naming_the_commands(shell: str) -> None:
    text = completion.script(shell)
    assert "mtlsmesh" in text
    assert all(name in text for name in COMMANDS)
    if shell == "zsh":  # shtab's tcsh script completes commands and files only, not flags
        assert "--trust-domain" in text
