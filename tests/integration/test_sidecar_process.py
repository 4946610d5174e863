"""`python -m mtlsmesh sidecar` as a real process: startup errors are one line and exit 2; SIGTERM drains.

The sidecar runs with a YAML config on loopback (explicit listeners, ephemeral ports it reports in its `event=ready`
log line). The test is the mesh client itself, speaking mTLS with an SVID from the same CA.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import yaml

from mtlsmesh import tls
from mtlsmesh.cli.sidecar import parse_kv
from mtlsmesh.credentials import load_credentials
from tests.integration.mesh import app_server, connect, echo, outcome
from tests.pki import TD, Pki

ROOT = Path(__file__).resolve().parents[2]
DRAIN = 2.0


def write_config(path: Path, pki: Pki, app_port: int, **overrides: object) -> Path:
    files = pki.issue("web")
    config: dict[str, object] = {
        "trust_domain": "cluster.local",
        "credentials": {"cert": files.cert, "key": files.key, "bundle": files.bundle, "reload_interval": "1s"},
        "outbound": {"enabled": False},
        "inbound": {"enabled": False},
        "explicit": [
            {"name": "web", "listen": "127.0.0.1:0", "forward_to": f"127.0.0.1:{app_port}", "mode": "terminate"}
        ],
        "timeouts": {"handshake": "2s", "connect": "1s", "drain": f"{DRAIN}s"},
        "admin": {"listen": "127.0.0.1:0"},
        "health": {"listen": "127.0.0.1:0"},
        "metrics": {"listen": "127.0.0.1:0"},
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


@pytest.mark.parametrize(
    ("case", "extra_args", "match"),
    [
        ("no-config", [], "--config: a config file is required"),
        ("bad-mode", ["--inbound-mode", "loose"], "--inbound-mode: expected one of strict, permissive, disable"),
        ("bad-level", ["--log-level", "loud"], "--log-level: expected one of"),
        ("corrupt-cert", ["--cert", "CORRUPT"], "corrupt PEM certificate"),
        ("bad-yaml-key", ["--config", "BADKEY"], "unexpected|unknown"),
    ],
)
def test_startup_errors_are_one_line_and_exit_2(tmp_path: Path, case: str, extra_args: list[str], match: str) -> None:
    pki = Pki(tmp_path)
    config = write_config(tmp_path / "config.yaml", pki, 9)
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    bad_key = tmp_path / "badkey.yaml"
    bad_key.write_text("trust_domain: cluster.local\nnot_a_section: 1\n")
    args = [] if case == "no-config" else ["--config", str(config)]
    args += [{"CORRUPT": str(corrupt), "BADKEY": str(bad_key)}.get(a, a) for a in extra_args]
    result = run_cli(*args, env={"MTLSMESH_CONFIG": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtlsmesh: error: "), result.stderr
    import re

    assert re.search(match, lines[0]), lines[0]


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    pki = Pki(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        config = write_config(tmp_path / "config.yaml", pki, 9, health={"listen": f"127.0.0.1:{port}"})
        result = run_cli("--config", str(config))
    finally:
        taken.close()
    assert result.returncode == 2
    assert result.stderr.strip() == f"mtlsmesh: error: health.listen: cannot listen on 127.0.0.1:{port}: " + (
        "Address already in use (address in use)"
    )


@asynccontextmanager
async def sidecar_process(
    config: Path, *args: str, ready_word: str = "event=ready"
) -> AsyncIterator[tuple[trio.Process, dict[str, int], list[str]]]:
    """Start the sidecar (with `args` after its --config), wait for its ready line (`ready_word`), yield (process,
    listener ports, stderr lines so far and later)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mtlsmesh", "sidecar", "--config", str(config), *args],
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[str] = []
    ports: dict[str, int] = {}
    ready = trio.Event()
    try:
        async with trio.open_nursery() as nursery:

            async def read_stderr() -> None:
                assert process.stderr is not None
                buffer = b""
                while data := await process.stderr.receive_some(65536):
                    buffer += data
                    *complete, buffer = buffer.split(b"\n")
                    for raw in complete:
                        line = raw.decode()
                        lines.append(line)
                        if ready_word in line:
                            listeners = json.loads(line)["listeners"] if line.startswith("{") else line
                            for item in listeners.split("listeners=")[-1].split(","):
                                name, address = item.split("=")
                                ports[name] = int(address.rsplit(":", 1)[1])
                            ready.set()

            nursery.start_soon(read_stderr)
            with trio.fail_after(30):
                await ready.wait()
            yield process, ports, lines
            with trio.fail_after(30):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()  # only the process this test started
            await process.wait()


async def http_status(port: int) -> int | None:
    try:
        stream = await connect(port)
    except OSError:
        return None
    await stream.send_all(b"GET /healthz/ready HTTP/1.1\r\n\r\n")
    _, data = await outcome(stream)
    await stream.aclose()
    return int(data.split(b" ")[1]) if data else None


async def mtls_client(pki: Pki, port: int) -> tls.TLSStream:
    creds = load_credentials(pki.issue("client"), TD)
    transport = await connect(port)
    return await tls.open_mtls(transport, creds.client_context, tls.Side.CLIENT, TD, expected=(pki.id_of("web"),))


async def test_sigterm_drains_open_connections_then_exits(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with app_server(echo) as (app_port, _seen):
        config = write_config(tmp_path / "config.yaml", pki, app_port)
        async with sidecar_process(config) as (process, ports, lines):
            assert await http_status(ports["health"]) == 200
            finishing = await mtls_client(pki, ports["web"])
            lingering = await mtls_client(pki, ports["web"])
            for stream in (finishing, lingering):
                await stream.send_all(b"before")
                assert await stream.receive_some(100) == b"before"

            process.send_signal(signal.SIGTERM)
            signalled = trio.current_time()
            with trio.fail_after(5):
                while await http_status(ports["health"]) != 503:
                    await trio.sleep(0.05)
                while True:  # the web listener stops accepting
                    try:
                        probe = await connect(ports["web"])
                    except OSError:
                        break
                    await probe.aclose()
                    await trio.sleep(0.05)
            # An open connection keeps working during the drain, and finishes cleanly.
            await finishing.send_all(b"during drain")
            assert await finishing.receive_some(100) == b"during drain"
            await finishing.send_eof()
            assert await finishing.receive_some(100) == b""
            await finishing.aclose()
            # The lingering one is cut when the drain period ends; then the process exits 0.
            with trio.fail_after(DRAIN + 10):
                kind, _ = await outcome(lingering)
            cut_after = trio.current_time() - signalled
            await lingering.aclose()
        assert process.returncode == 0
    assert kind == "reset"
    assert DRAIN - 0.5 < cut_after < DRAIN + 5
    conn = [line for line in lines if "dir=inbound" in line]
    assert len(conn) == 2
    assert any("reason=closed" in line for line in conn)
    assert any("reason=drain_timeout" in line for line in conn)
    assert any("event=signal signal=SIGTERM" in line for line in lines)
    assert not any("Traceback" in line for line in lines)


async def test_json_log_lines_carry_the_text_lines_fields_and_an_old_svid_is_warned_about_once(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    async with app_server(echo) as (app_port, _seen):
        # Text first: the reference for the fields a JSON line must carry.
        text_config = write_config(tmp_path / "text.yaml", pki, app_port)
        async with sidecar_process(text_config) as (process, ports, text_lines):
            stream = await mtls_client(pki, ports["web"])
            await stream.send_all(b"ping")
            assert await stream.receive_some(100) == b"ping"
            await stream.send_eof()
            assert await stream.receive_some(100) == b""
            await stream.aclose()
            with trio.fail_after(10):
                while not any("dir=inbound" in line for line in text_lines):
                    await trio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
        [text_line] = [line for line in text_lines if "dir=inbound" in line]
        text_fields = parse_kv(text_line.split(" logger=mtlsmesh.conn ", 1)[1])
        assert text_fields is not None, text_line

        # JSON, with an SVID that has 10 of its 60 minutes left: below the default share of 0.2.
        config = write_config(tmp_path / "json.yaml", pki, app_port, log={"format": "json"})
        started = datetime.now(UTC) - timedelta(minutes=50)
        pki.issue("web", now=started, ttl=timedelta(hours=1))  # rewrites what the config names
        async with sidecar_process(config, ready_word='"event":"ready"') as (process, ports, lines):
            stream = await mtls_client(pki, ports["web"])
            await stream.send_all(b"ping")
            assert await stream.receive_some(100) == b"ping"
            await stream.send_eof()
            assert await stream.receive_some(100) == b""
            await stream.aclose()
            with trio.fail_after(10):
                while not any('"dir":"inbound"' in line for line in lines):
                    await trio.sleep(0.05)
            await trio.sleep(2.5)  # the watcher looks again every second: still one warning
            process.send_signal(signal.SIGTERM)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(list(record)[:3] == ["ts", "level", "logger"] for record in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]) for record in records)
    [conn] = [record for record in records if record["logger"] == "mtlsmesh.conn"]
    assert list(conn)[3:] == list(text_fields)  # the same fields, in the same order
    assert conn["dir"] == "inbound" and conn["decision"] == "mtls" and conn["reason"] == "closed"
    assert conn["peer_id"] == str(pki.id_of("client"))
    assert conn["bytes_in"] == 4 and conn["bytes_out"] == 4
    warnings = [record for record in records if record.get("event") == "svid_expiring"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "WARNING"
    assert warnings[0]["spiffe_id"] == str(pki.id_of("web"))
    assert 0.1 < float(warnings[0]["life_left"]) < 0.2
    assert not any("svid_expiring" in line for line in text_lines)  # a fresh SVID: no warning


# What a sidecar with SVID files and one process never needs: the other subcommands and the lab, identity mode (the
# agent, its CA client and HTTP/1.1), the workers' supervisor, `explain` and the capture rules (the admin's
# /explain loads them when asked), completion (shtab) and the CA service, injection and the webhook.
NOT_IN_A_SIDECAR = (
    "mtlsmesh.lab", "mtlsmesh.cli.ca", "mtlsmesh.cli.completion", "mtlsmesh.cli.demo", "mtlsmesh.cli.explain",
    "mtlsmesh.agent", "mtlsmesh.caclient", "mtlsmesh.caproto", "mtlsmesh.http11", "h11", "mtlsmesh.workers",
    "mtlsmesh.explain", "mtlsmesh.capture", "mtlsmesh.capture_plan", "mtlsmesh.installer", "shtab",
    "mtlsmesh.caserver", "mtlsmesh.jwtverify", "mtlsmesh.inject", "mtlsmesh.webhook", "mtlsmesh.admission", "jwt",
)  # fmt: skip


@pytest.mark.parametrize(("workers", "beyond"), [(1, []), (2, ["mtlsmesh.workers"])])
async def test_a_file_sidecar_imports_only_what_it_serves_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, beyond: list[str]
) -> None:
    """Python's own import log (`PYTHONPROFILEIMPORTTIME`) of a real sidecar that served a connection and drained:
    one process imports none of the modules above; with workers, the supervisor adds only its own module."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    pki = Pki(tmp_path)
    async with app_server(echo) as (app_port, _seen):
        config = write_config(tmp_path / "config.yaml", pki, app_port, workers=workers)
        async with sidecar_process(config) as (process, ports, lines):
            assert await http_status(ports["health"]) == 200
            stream = await mtls_client(pki, ports["web"])
            await stream.send_all(b"ping")
            assert await stream.receive_some(100) == b"ping"
            await stream.aclose()
            process.send_signal(signal.SIGTERM)
    imported = {line.rpartition("|")[2].strip() for line in lines if line.startswith("import time:")}
    assert {"mtlsmesh.sidecar", "mtlsmesh.tls", "trio"} <= imported  # the log is there
    loaded = sorted(m for m in imported if m in NOT_IN_A_SIDECAR or m.startswith("mtlsmesh.lab."))
    assert loaded == beyond
