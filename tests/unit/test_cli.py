"""The command line's entry points: `--version`, and `python -m mtlsmesh` running the same CLI."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import cryptography
import OpenSSL
import pytest

import mtlsmesh
from mtlsmesh.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_version_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    flag = capsys.readouterr().out
    assert main(["version"]) == 0
    assert capsys.readouterr().out == flag  # the flag and the command print the same
    lines = flag.splitlines()
    assert lines[0] == f"mtlsmesh {mtlsmesh.__version__}"
    from cryptography.hazmat.backends.openssl.backend import backend

    shown = {line.split()[0]: line for line in lines[2:]}
    assert backend.openssl_version_text() in shown["openssl"]
    assert f" {OpenSSL.__version__} " in shown["pyOpenSSL"]
    assert f" {cryptography.__version__} " in shown["cryptography"]
    assert f" {platform.python_version()} " in shown["python"]


def test_version_json_is_a_list_of_components(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    by_name = {row["component"]: row["version"] for row in rows}
    assert by_name["mtlsmesh"] == mtlsmesh.__version__
    assert by_name["pyOpenSSL"] == OpenSSL.__version__
    assert by_name["openssl"].startswith("OpenSSL ")


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "mtlsmesh", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: mtlsmesh" in result.stdout


# What each command really runs, in a fresh interpreter: the sidecar up to its config error (it has loaded
# everything it serves with by then), the init step's dry run in full.
IMPORT_PROBE = """
import sys
from mtlsmesh.cli import COMMANDS, build_parser, main
status = main(sys.argv[1:])
import mtlsmesh.sidecar, mtlsmesh.installer  # what serving and applying the rules import, whatever the flags
# Neither the lab nor the module of another subcommand: the CLI imports only the one that runs.
others = {"mtlsmesh.cli." + name for name in ("ca", "check", "completion", "demo", "explain", "inject", "proxy_config",
                                              "status", "uninject", "version", "webhook")}
print(f"{status}|" + ",".join(sorted(m for m in sys.modules if m == "mtlsmesh.lab" or m.startswith("mtlsmesh.lab.")
                                     or m in others)))
"""


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["sidecar", "--config", "/nonexistent/mtlsmesh.yaml"], "2"),
        (["iptables", "--dry-run"], "0"),
        (["--help"], None),
    ],
)
def test_the_sidecar_and_the_init_step_load_no_lab_and_no_other_subcommand(argv: list[str], status: str | None) -> None:
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *argv], capture_output=True, text=True, timeout=60)
    if status is None:  # --help exits inside argparse: check the listing instead
        assert result.returncode == 0
        assert all(name in result.stdout for name in ("ca", "demo", "inject", "iptables", "sidecar"))
        return
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"{status}|", (last, result.stderr)


def test_an_install_without_the_lab_still_runs_and_says_why_demo_cannot(tmp_path: Path) -> None:
    # What the image gets: the package less what its build context leaves out.
    excluded = [
        line.rstrip("/")
        for line in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("mtlsmesh/")
    ]
    assert excluded == ["mtlsmesh/lab"]
    shutil.copytree(ROOT / "mtlsmesh", tmp_path / "mtlsmesh", ignore=shutil.ignore_patterns("__pycache__"))
    for path in excluded:
        shutil.rmtree(tmp_path / path)
    # -S: no site hooks, so not the editable install's finder either (it would find the checkout's lab); the
    # third-party packages come from site-packages as a plain path.
    start = (
        "import runpy, sys; sys.path[:0] = sys.argv[1:3]; del sys.argv[1:3]; "
        "runpy.run_module('mtlsmesh', run_name='__main__', alter_sys=True)"
    )
    paths = [str(tmp_path), sysconfig.get_paths()["purelib"]]

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", "-c", start, *paths, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )

    dry = run("iptables", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "MTLSMESH_OUTPUT" in dry.stdout
    demo = run("demo")
    assert demo.returncode == 2
    assert demo.stderr.strip().splitlines() == [
        "mtlsmesh: error: the pod lab is not installed here (the image leaves it out): run the demo from a checkout"
    ]


def _actions(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    found: list[tuple[str, argparse.Action]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((path, action))
    return found


def test_every_command_has_a_description_and_every_flag_a_help_text() -> None:
    parser = build_parser(None)
    missing = [
        f"{path}: {'/'.join(action.option_strings) or action.dest}"
        for path, action in _actions(parser, "mtlsmesh")
        if not action.help and action.dest != "command" and not action.dest.endswith("_command")
    ]
    assert missing == []
    for name in COMMANDS:
        sub = build_parser([name])._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
        assert sub.description, f"mtlsmesh {name} --help has no description"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_each_command_runs(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mtlsmesh {command}")
