"""Real processes end to end: `mtlsmesh ca serve`, and two `mtlsmesh sidecar` processes with an identity section
that get their SVIDs from it, renew them, and carry mTLS traffic between each other; no key file is ever written.
SIGHUP renews at once. And one that cannot reach its CA: it binds nothing, says so once, and stops on SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
import yaml

from tests.integration.castack import CaLab
from tests.integration.mesh import app_server, echo, exchange
from tests.integration.test_ca_serve_process import ca_process
from tests.integration.test_sidecar_process import ROOT, sidecar_process


def write_config(
    lab: CaLab, path: Path, ca_port: int, service_account: str, explicit: dict[str, object], ttl: str = "4s"
) -> Path:
    token = lab.root / f"{service_account}.token"
    token.write_text(lab.issuer.token("default", service_account))
    config = {
        "trust_domain": "cluster.local",
        "identity": {
            "ca_address": f"127.0.0.1:{ca_port}",
            "token": str(token),
            "bundle": str(lab.ca_dir / "bundle.pem"),
            "ttl": ttl,
            "renew_fraction": 0.5,
        },
        "outbound": {"enabled": False},
        "inbound": {"enabled": False},
        "explicit": [explicit],
        "timeouts": {"handshake": "2s", "connect": "1s", "drain": "1s"},
        "admin": {"listen": "127.0.0.1:0"},
        "health": {"listen": "127.0.0.1:0"},
        "metrics": {"listen": "127.0.0.1:0"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def test_two_sidecar_processes_with_svids_from_a_ca_process(tmp_path: Path) -> None:
    lab = CaLab.create(tmp_path)
    reviews = "spiffe://cluster.local/ns/default/sa/reviews"
    with trio.fail_after(90):
        async with ca_process(lab) as (ca, ca_port, ca_lines), app_server(echo) as (app_port, _):
            server_config = write_config(lab, tmp_path / "server.yaml", ca_port, "reviews", {
                "name": "in", "listen": "127.0.0.1:0", "forward_to": f"127.0.0.1:{app_port}", "mode": "terminate",
            })  # fmt: skip
            async with sidecar_process(server_config) as (server, server_ports, server_lines):
                client_config = write_config(lab, tmp_path / "client.yaml", ca_port, "productpage", {
                    "name": "out", "listen": "127.0.0.1:0", "forward_to": f"127.0.0.1:{server_ports['in']}",
                    "mode": "originate", "identities": [reviews],
                })  # fmt: skip
                async with sidecar_process(client_config) as (client, client_ports, client_lines):
                    assert await exchange(client_ports["out"], b"hello through the mesh") == b"hello through the mesh"
                    # Both renew at about 2 s (4 s lifetimes, renewed at half).
                    while not all(
                        any("event=svid_renewed" in x for x in lines) for lines in (client_lines, server_lines)
                    ):
                        await trio.sleep(0.1)
                    assert await exchange(client_ports["out"], b"after renewal") == b"after renewal"
                    client.send_signal(signal.SIGTERM)
                server.send_signal(signal.SIGTERM)
    assert server.returncode == 0 and client.returncode == 0 and ca.returncode == 0
    for lines in (server_lines, client_lines):
        assert any("event=svid_issued" in line and "credential=token" in line for line in lines)
        assert any("event=svid_renewed" in line and "credential=svid" in line for line in lines)
        assert not any("Traceback" in line for line in lines)
    inbound = [line for line in server_lines if "dir=inbound" in line]
    assert len(inbound) == 2
    assert all("peer_id=spiffe://cluster.local/ns/default/sa/productpage decision=mtls" in x for x in inbound)
    issued = [line for line in ca_lines if "event=issued" in line]
    assert {re.findall(r"spiffe_id=(\S+)", line)[0] for line in issued} == {
        reviews,
        "spiffe://cluster.local/ns/default/sa/productpage",
    }
    # The sidecars' keys lived in their memory only: the one key file here is the CA's own.
    keys = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "key" in p.name)
    assert keys == ["ca/root-key.pem"]


async def test_sighup_renews_the_svid_from_the_ca_at_once(tmp_path: Path) -> None:
    lab = CaLab.create(tmp_path)
    with trio.fail_after(90):
        async with ca_process(lab) as (ca, ca_port, ca_lines), app_server(echo) as (app_port, _):
            # An hour's SVID renewed at half: no renewal would come during the test but the one SIGHUP asks for.
            config = write_config(lab, tmp_path / "s.yaml", ca_port, "reviews", {
                "name": "in", "listen": "127.0.0.1:0", "forward_to": f"127.0.0.1:{app_port}", "mode": "terminate",
            }, ttl="1h")  # fmt: skip
            async with sidecar_process(config) as (process, ports, lines):
                before = await trio.to_thread.run_sync(certs, ports["admin"])
                process.send_signal(signal.SIGHUP)
                while not any("event=svid_renewed" in line for line in lines):
                    await trio.sleep(0.1)
                after = await trio.to_thread.run_sync(certs, ports["admin"])
                assert after["spiffe_id"] == before["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/reviews"
                assert after["serial"] != before["serial"] and after["sha256"] != before["sha256"]
                process.send_signal(signal.SIGTERM)
    assert process.returncode == 0 and ca.returncode == 0
    assert any("event=signal signal=SIGHUP action=renew result=requested" in line for line in lines)
    requested = "event=svid_renewal_requested spiffe_id=spiffe://cluster.local/ns/default/sa/reviews"
    assert any(requested in line for line in lines)
    assert [line for line in lines if "event=svid_renewed" in line and "credential=svid" in line]
    assert len([line for line in ca_lines if "event=issued" in line]) == 2  # enrolment, then the one renewal
    assert not any("Traceback" in line for line in lines)


def certs(admin_port: int) -> dict[str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    try:
        connection.request("GET", "/certs")
        found: dict[str, str] = json.loads(connection.getresponse().read())
        return found
    finally:
        connection.close()


async def test_a_sidecar_waiting_for_an_unreachable_ca_says_so_once_and_stops_on_sigterm(tmp_path: Path) -> None:
    lab = CaLab.create(tmp_path)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        config = write_config(lab, tmp_path / "c.yaml", closed.getsockname()[1], "reviews", {
            "name": "in", "listen": "127.0.0.1:0", "forward_to": "127.0.0.1:9", "mode": "terminate",
        })  # fmt: skip
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "mtlsmesh", "sidecar", "--config", str(config)],
            stderr=subprocess.PIPE, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert process.stderr is not None
            output = b""
            with trio.fail_after(30):
                while b"event=svid_enrollment_failing" not in output:
                    output += await process.stderr.receive_some(65536)
                # SIGHUP in identity mode: nothing to reload from files; it says so and the process goes on.
                process.send_signal(signal.SIGHUP)
                await trio.sleep(3)  # several retries (1 s, 2 s, ... with jitter): still one line
                assert process.returncode is None
                process.send_signal(signal.SIGTERM)
                while data := await process.stderr.receive_some(65536):
                    output += data
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()  # only the process this test started
                await process.wait()
    finally:
        closed.close()
    text = output.decode()
    assert process.returncode == 0, text
    assert text.count("event=svid_enrollment_failing") == 1
    assert "event=signal signal=SIGHUP action=none reason=" in text
    assert "Connection refused" in text
    assert "event=ready" not in text  # nothing was bound without an SVID
    assert "Traceback" not in text
