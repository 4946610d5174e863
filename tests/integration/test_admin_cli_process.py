"""`mtlsmesh drain` and `mtlsmesh log-level`, run as processes against a real `python -m mtlsmesh sidecar` process
(an explicit terminate listener in front of an echo app, as in test_admin_process): the token read from the file
the sidecar wrote, the state printed (text and `--json`), and each refusal as one line: no token file, a file this
uid cannot read, a wrong token, a sidecar without a token, an admin port that does not answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.integration.mesh import app_server, echo
from tests.integration.test_sidecar_process import ROOT, http_status, mtls_client, sidecar_process, write_config
from tests.pki import Pki

IO = 10.0


def cli(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtlsmesh", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        user=user,
    )


async def acli(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: cli(*args, user=user))


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command prints: exit status 2, no traceback, nothing on stdout."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtlsmesh: error: "), lines
    return lines[0].removeprefix("mtlsmesh: error: ")


async def test_log_level_and_drain_against_a_real_sidecar(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    token_file = tmp_path / "run" / "token"
    async with app_server(echo) as (app_port, _seen):
        config = write_config(tmp_path / "config.yaml", pki, app_port)
        async with sidecar_process(config, "--admin-token-file", str(token_file)) as (process, ports, lines):
            admin = f"127.0.0.1:{ports['admin']}"
            flags = ("--admin", admin, "--token-file", str(token_file))

            shown = await acli("log-level", "--admin", admin)  # reading needs no token
            assert (shown.returncode, shown.stdout) == (0, f"sidecar at {admin}: log level info\n")
            changed = await acli("log-level", "debug", *flags, "--json")
            assert changed.returncode == 0, changed.stderr
            assert json.loads(changed.stdout) == [{"admin": admin, "log_level": "debug", "changed": True}]
            assert any("event=log_level level=debug via=admin" in line for line in lines)

            # A token that is not this process's: refused by the sidecar, explained by the CLI.
            stale = tmp_path / "stale-token"
            stale.write_text("not-the-token\n")
            refused = one_error(await acli("log-level", "error", "--admin", admin, "--token-file", str(stale)))
            assert refused.startswith(f"POST /logging?level=error on {admin}: 403, the sidecar refused the token in")
            missing = one_error(await acli("drain", "--admin", admin, "--token-file", str(tmp_path / "nope")))
            assert missing.startswith(f"no admin token file {tmp_path / 'nope'}: the sidecar writes it at start")
            if os.geteuid() == 0:  # another uid cannot read the file (mode 0600, in our private temp dir)
                denied = one_error(await acli("drain", *flags, user=65534))
                assert (
                    denied == f"cannot read the admin token {token_file}: permission denied (run as uid 1337 or root)"
                )
            assert await http_status(ports["health"]) == 200  # none of the refused POSTs drained it

            # Drain with a connection open: --wait gives up after its timeout (exit 1) and says what is open.
            open_conn = await mtls_client(pki, ports["web"])
            await open_conn.send_all(b"before")
            assert await open_conn.receive_some(100) == b"before"
            waited = await acli("drain", *flags, "--wait", "--timeout", "1s", "--json")
            assert waited.returncode == 1, waited.stderr
            assert json.loads(waited.stdout) == [
                {"admin": admin, "draining": True, "ready": False, "open_inbound": 1, "open_outbound": 0}
            ]
            assert await http_status(ports["health"]) == 503
            await open_conn.send_all(b"while draining")  # the open connection still works
            assert await open_conn.receive_some(100) == b"while draining"
            await open_conn.send_eof()
            assert await open_conn.receive_some(100) == b""
            await open_conn.aclose()
            done = await acli("drain", *flags, "--wait")
            assert done.returncode == 0, done.stderr
            assert done.stdout == (
                f"sidecar at {admin}: draining, health not ready (503), 0 inbound and 0 outbound connections open\n"
            )
            assert process.returncode is None  # drained, and still up until SIGTERM
            process.send_signal(signal.SIGTERM)
        assert process.returncode == 0
    assert sum("event=drain_requested via=admin" in line for line in lines) == 1
    assert not any("Traceback" in line for line in lines)


async def test_a_sidecar_without_a_token_and_one_that_does_not_answer(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("whatever\n")
    async with app_server(echo) as (app_port, _seen):
        config = write_config(tmp_path / "config.yaml", pki, app_port)
        async with sidecar_process(config) as (process, ports, _lines):  # no token file: POSTs are off
            admin = f"127.0.0.1:{ports['admin']}"
            off = one_error(await acli("drain", "--admin", admin, "--token-file", str(token_file)))
            assert off == (
                f"POST /drain on {admin}: 403, the sidecar has no admin token (it was started without a token file: "
                "--admin-token-file or MTLSMESH_ADMIN_TOKEN_FILE)"
            )
            assert await http_status(ports["health"]) == 200
            process.send_signal(signal.SIGTERM)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    try:
        port = closed.getsockname()[1]
        silent = one_error(await acli("drain", "--admin", f"127.0.0.1:{port}", "--token-file", str(token_file)))
    finally:
        closed.close()
    assert silent == f"the sidecar's admin endpoint 127.0.0.1:{port} did not answer POST /drain: Connection refused"


@pytest.mark.parametrize("argv", [["log-level", "loud"], ["drain", "--timeout", "soon"]])
def test_bad_arguments_are_refused_before_anything_is_sent(argv: list[str]) -> None:
    result = cli(*argv, "--admin", "127.0.0.1:9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "loud" in result.stderr or "'soon' is not a duration" in result.stderr
