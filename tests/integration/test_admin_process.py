"""The admin port of a real `python -m mtlsmesh sidecar` process, asked by real HTTP clients (curl and Python's
http.client): the token file, the refusals of browsers and rebinding names, POST /drain that drains and stays up
until SIGTERM, and SIGHUP that reloads the SVID files.

The sidecar runs as in test_sidecar_process: a YAML config on loopback, an explicit terminate listener in front
of an echo app, ephemeral ports read from its `event=ready` line.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.mesh import app_server, echo
from tests.integration.test_sidecar_process import (
    DRAIN,
    ROOT,
    http_status,
    mtls_client,
    sidecar_process,
    write_config,
)
from tests.pki import Pki

IO = 10.0

pytestmark = pytest.mark.skipif(not Path("/usr/bin/curl").exists(), reason="curl is not installed")


def curl(port: int, path: str, *args: str, host: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    """curl's view of one request: (status, headers, body). `host` other than the loopback is resolved to it by
    curl itself (--resolve), as a rebinding name would be."""
    argv = ["curl", "-sS", "--max-time", str(IO), "-D", "-", *args]
    if host != "127.0.0.1":
        argv += ["--resolve", f"{host}:{port}:127.0.0.1"]
    result = subprocess.run([*argv, f"http://{host}:{port}{path}"], capture_output=True, timeout=IO * 2)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.decode().partition("\r\n\r\n")  # bytes: text mode would drop the \r
    status_line, *header_lines = head.split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


def ask(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """http.client's view of one request (it sends Host: 127.0.0.1:<port>)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def acurl(port: int, path: str, *args: str, host: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    return await trio.to_thread.run_sync(functools.partial(curl, port, path, *args, host=host))


async def aask(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return await trio.to_thread.run_sync(ask, port, method, path, headers)


async def test_the_admin_port_of_a_real_sidecar(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    token_file = tmp_path / "run" / "admin-token"
    async with app_server(echo) as (app_port, _seen):
        config = write_config(tmp_path / "config.yaml", pki, app_port)
        async with sidecar_process(config, "--admin-token-file", str(token_file)) as (process, ports, lines):
            admin_port = ports["admin"]
            # The token: a file of ours alone, one line.
            assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.stat().st_uid == os.getuid()
            token = token_file.read_text().strip()
            bearer = f"Authorization: Bearer {token}"

            status, _, body = await acurl(admin_port, "/certs")
            assert status == 200 and json.loads(body)["spiffe_id"] == str(pki.id_of("web"))
            # A browser's request (any Origin), and a DNS-rebinding page (its own name resolving to 127.0.0.1).
            status, _, body = await acurl(admin_port, "/config_dump", "-H", "Origin: http://evil.example")
            assert status == 403 and "Origin" in body
            status, _, body = await acurl(admin_port, "/config_dump", host="rebind.example")
            assert status == 403 and "Host header" in body
            status, _, _ = await acurl(admin_port, "/config_dump", host="localhost")
            assert status == 200
            # The wrong method is 405 and says which one; a POST without the token is 401.
            status, headers, _ = await acurl(admin_port, "/drain")
            assert (status, headers["allow"]) == (405, "POST")
            status, headers, _ = await acurl(admin_port, "/logging?level=debug", "-X", "POST")
            assert (status, headers["www-authenticate"]) == (401, "Bearer")
            status, _, body = await acurl(admin_port, "/logging?level=debug&from=test", "-X", "POST", "-H", bearer)
            assert (status, body) == (200, "log level debug\n")
            dump = json.loads((await acurl(admin_port, "/config_dump"))[2])
            assert dump["log"]["level"] == "debug"  # the level in force, not the config's
            assert any("event=log_level level=debug via=admin" in line for line in lines)

            # POST /drain: stops accepting, health 503, open connections go on past the drain timeout, and the
            # process stays up until SIGTERM.
            open_conn = await mtls_client(pki, ports["web"])
            await open_conn.send_all(b"before")
            assert await open_conn.receive_some(100) == b"before"
            assert await aask(admin_port, "POST", "/drain", {"Authorization": f"Bearer {token}"}) == (
                200,
                b"draining\n",
            )
            with trio.fail_after(IO):
                while await http_status(ports["health"]) != 503:
                    await trio.sleep(0.05)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", ports["web"])
            await trio.sleep(DRAIN + 0.5)  # longer than timeouts.drain: nothing cuts a connection before SIGTERM
            await open_conn.send_all(b"while drained")
            assert await open_conn.receive_some(100) == b"while drained"
            assert process.returncode is None
            status, body = await aask(admin_port, "GET", "/healthz/ready")
            assert (status, body) == (503, b"draining\n")
            metrics = (await aask(ports["metrics"], "GET", "/stats/prometheus"))[1].decode()
            ready = [
                s.value
                for f in text_string_to_metric_families(metrics)
                for s in f.samples
                if s.name == "mtlsmesh_ready"
            ]
            assert ready == [0]
            await open_conn.send_eof()
            assert await open_conn.receive_some(100) == b""
            await open_conn.aclose()
            with trio.fail_after(IO):
                while not any("event=drained" in line for line in lines):
                    await trio.sleep(0.05)
            assert process.returncode is None  # drained, and still up
            process.send_signal(signal.SIGTERM)
        assert process.returncode == 0
    assert not token_file.exists()  # removed at exit
    assert any("dir=inbound" in line and "reason=closed" in line for line in lines)
    assert not any("Traceback" in line for line in lines)


async def test_sighup_reloads_the_svid_files_and_keeps_serving(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with app_server(echo) as (app_port, _seen):
        # A poll that would not see the change during the test: only the signal can.
        config = write_config(tmp_path / "config.yaml", pki, app_port, admin={"listen": "0.0.0.0:0"})
        text = config.read_text().replace("reload_interval: 1s", "reload_interval: 3600s")
        config.write_text(text)
        async with sidecar_process(config) as (process, ports, lines):
            before = json.loads((await aask(ports["admin"], "GET", "/certs"))[1])
            pki.issue("web")  # new files on disk, same identity
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(IO):
                while not any("signal=SIGHUP" in line for line in lines):
                    await trio.sleep(0.05)
            after = json.loads((await aask(ports["admin"], "GET", "/certs"))[1])
            assert after["sha256"] != before["sha256"] and after["spiffe_id"] == before["spiffe_id"]
            stream = await mtls_client(pki, ports["web"])  # and it serves, with the new SVID
            await stream.send_all(b"after reload")
            assert await stream.receive_some(100) == b"after reload"
            await stream.aclose()
            status, body = await aask(ports["admin"], "POST", "/drain", {"Authorization": "Bearer x"})
            # No token file was asked for, and the default one's directory does not exist here: POSTs are off.
            assert (status, body) == (
                403,
                b"POST is disabled: the sidecar has no admin token (see --admin-token-file)\n",
            )
            assert process.returncode is None
            process.send_signal(signal.SIGTERM)
        assert process.returncode == 0
    assert any("event=signal signal=SIGHUP action=reload result=reloaded" in line for line in lines)
    assert any(f"event=credentials_reloaded spiffe_id={pki.id_of('web')}" in line for line in lines)
    assert any("event=admin_not_loopback listen=0.0.0.0:0" in line for line in lines)


def test_a_token_file_that_cannot_be_written_is_a_one_line_error(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    config = write_config(tmp_path / "config.yaml", pki, 9)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "sidecar", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MTLSMESH_ADMIN_TOKEN_FILE": str(blocker / "token")},
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("mtlsmesh: error:")]
    assert lines == [
        f"mtlsmesh: error: --admin-token-file: cannot write {blocker / 'token'}: {blocker} is not a directory"
    ]
