"""The admin's read-only views for the operator's commands, over real mTLS on loopback and asked with real HTTP
clients: `GET /explain` (`mtlsmesh explain --live`) and `GET /status` (`mtlsmesh status`, `mtlsmesh proxy-config`)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import time
from urllib.parse import quote

import pytest
import trio
import yaml

from mtlsmesh.admin import current_log_level
from mtlsmesh.cli import main
from mtlsmesh.config import Action, AuthzRule, parse_config
from mtlsmesh.recent import Recent
from tests.integration.mesh import LOOPBACK, app_server, connect, echo, exchange, mesh_pair, outcome
from tests.pki import Pki


async def get(port: int, path: str) -> tuple[int, bytes]:
    def call() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    return await trio.to_thread.run_sync(call)


async def test_explain_answers_the_decision_and_the_last_outcomes(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    deny = (AuthzRule(Action.DENY, (str(pki.id_of("productpage")),), frozenset({1})),)  # a port nobody calls
    async with app_server(echo) as (app_port, _), mesh_pair(pki, app_port, server_changes={"authorization": deny}) as m:
        for payload in (b"one", b"two"):
            assert await exchange(m.port, payload) == payload
        plaintext = await connect(m.inbound_port)  # a client without a sidecar, on a STRICT port
        await plaintext.send_all(b"GET / HTTP/1.1\r\n\r\n")
        kind, _ = await outcome(plaintext)
        await plaintext.aclose()
        assert kind == "reset"
        with trio.fail_after(10):
            while len(m.server_rt.recent.find("inbound", port=app_port)) < 3:
                await trio.sleep(0.02)

        client_port = m.client_state.bound["admin"][1]
        status, body = await get(client_port, f"/explain?to={LOOPBACK}:{m.inbound_port}")
        assert status == 200, body
        [found] = json.loads(body)
        assert found["decision"] == "mtls" and found["direction"] == "outbound"
        assert [entry["reason"] for entry in found["recent"]] == ["closed", "closed"]
        assert all(entry["peer_id"] == str(pki.id_of("reviews")) for entry in found["recent"])

        server_port = m.server_state.bound["admin"][1]
        caller = quote(str(pki.id_of("productpage")), safe="")
        status, body = await get(server_port, f"/explain?port={app_port}&from={caller}")
        [found] = json.loads(body)
        assert status == 200 and found["decision"] == "mtls"
        assert found["authorization"]["allowed"] is True
        reasons = [(entry["decision"], entry["reason"]) for entry in found["recent"]]
        assert reasons == [("refuse", "not_mesh"), ("mtls", "closed"), ("mtls", "closed")]  # newest first
        status, body = await get(server_port, f"/explain?port={app_port}")
        assert json.loads(body)[0]["decision"] == "refuse"  # a plaintext caller on a STRICT port

        for bad in ("/explain", "/explain?to=nowhere", "/explain?port=0", "/explain?port=1&from=spiffe://x"):
            status, body = await get(server_port, bad)
            assert status == 400 and body.count(b"\n") == 1, (bad, body)

        # The command: the same answer, beside its own (without rules here: loopback has none of ours).
        argv = ["explain", "--to", f"{LOOPBACK}:{m.inbound_port}", "--no-rules", "--live"]
        argv += ["--admin", f"{LOOPBACK}:{client_port}"]
        status_code = await trio.to_thread.run_sync(main, argv)
        out = capsys.readouterr().out
        assert status_code == 0
        assert "  live sidecar:   mtls: destination 0 matches 127.0.0.1" in out and "(agrees)" in out
        assert out.count(" closed") == 2


def test_recent_is_bounded_in_destinations_and_outcomes() -> None:
    from mtlsmesh.runtime import ConnRecord

    recent = Recent(destinations=3, per_destination=2)
    for port in range(10):
        for _ in range(5):
            recent.add(ConnRecord("outbound", "outbound", orig_dst=f"198.18.0.9:{port}"))
    assert [recent.find("outbound", orig_dst=f"198.18.0.9:{port}") != [] for port in range(10)] == [False] * 7 + [
        True
    ] * 3
    assert len(recent.find("outbound", orig_dst="198.18.0.9:9")) == 2


def test_merged_recent_keeps_the_newest_of_every_process_within_the_same_bounds() -> None:
    # Two workers' outcomes, interleaved in time (1 ms apart: the order is by wall time), to the same destination
    # and to a few others.
    from mtlsmesh.runtime import ConnRecord

    workers = [Recent(destinations=3, per_destination=3), Recent(destinations=3, per_destination=3)]

    def add(worker: int, dst: str, client: str = "") -> None:
        time.sleep(0.001)
        workers[worker].add(ConnRecord("outbound", "outbound", orig_dst=dst, client_addr=client))

    for n in range(6):
        add(n % 2, "198.18.0.9:80", f"c{n}")
    for port in (81, 82):  # older than 83, newer than 80's outcomes
        add(0, f"198.18.0.9:{port}")
    add(1, "198.18.0.9:83")
    held = ConnRecord("inbound", "inbound", orig_dst="198.18.0.9:9080", client_addr="held")
    workers[1].opened(held)
    merged = Recent.merge([worker.snapshot() for worker in workers], destinations=3, per_destination=3)
    # 80 was used least recently of the four: dropped, as a single Recent would.
    assert merged.find("outbound", orig_dst="198.18.0.9:80") == []
    assert [row["orig_dst"] for row in merged.everything()] == ["198.18.0.9:83", "198.18.0.9:82", "198.18.0.9:81"]
    assert [row["client"] for row in merged.open_connections()] == ["held"]
    wide = Recent.merge([worker.snapshot() for worker in workers], per_destination=3)
    # The newest three to :80, whichever worker carried them, newest first.
    assert [row["client"] for row in wide.find("outbound", orig_dst="198.18.0.9:80")] == ["c5", "c4", "c3"]


async def test_status_and_proxy_config_show_listeners_certs_and_open_connections(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    async with app_server(echo) as (app_port, _), mesh_pair(pki, app_port) as m:
        assert await exchange(m.port, b"done") == b"done"
        held = await connect(m.port)  # stays open through the mesh while the commands run
        await held.send_all(b"held")
        assert await held.receive_some(100) == b"held"
        admin = f"{LOOPBACK}:{m.client_state.bound['admin'][1]}"

        def cli(*argv: str) -> str:
            assert main([*argv, "--admin", admin]) == 0
            return capsys.readouterr().out

        def cli_json(*argv: str) -> list[dict[str, object]]:
            rows = json.loads(cli(*argv, "--json"))
            assert isinstance(rows, list)
            return rows

        text = await trio.to_thread.run_sync(cli, "status")
        assert text.splitlines()[0] == "sidecar      ready"
        assert f"identity     {pki.id_of('productpage')}" in text
        assert "connections  1 outbound and 0 inbound open;" in text
        [row] = await trio.to_thread.run_sync(cli_json, "status")
        assert row["ready"] is True and row["open_outbound"] == 1
        assert 86000 < int(str(row["seconds_left"])) <= 86400

        listeners = await trio.to_thread.run_sync(cli_json, "proxy-config", "listeners")
        by_name = {str(item["name"]): str(item["address"]) for item in listeners}
        assert by_name["outbound"] == f"{LOOPBACK}:{m.port}"  # the real port, though the config says 0
        assert set(by_name) == {"outbound", "health", "metrics", "admin"}
        [cert] = await trio.to_thread.run_sync(cli_json, "proxy-config", "certs")
        assert cert["spiffe_id"] == str(pki.id_of("productpage"))
        [open_one] = await trio.to_thread.run_sync(cli_json, "proxy-config", "connections")
        assert open_one["direction"] == "outbound" and open_one["decision"] == "mtls"
        assert open_one["peer_id"] == str(pki.id_of("reviews"))
        table = await trio.to_thread.run_sync(cli, "proxy-config", "connections")
        assert table.splitlines()[0].split() == ["DIRECTION", "LISTENER", "CLIENT", "ORIG_DST", "PEER_ID", "DECISION",
                                                 "AGE_SECONDS"]  # fmt: skip
        recent = await trio.to_thread.run_sync(cli_json, "proxy-config", "recent")
        assert [(r["direction"], r["reason"]) for r in recent] == [("outbound", "closed")]
        config_text = await trio.to_thread.run_sync(cli, "proxy-config", "config")
        # /config_dump shows the log level in force, which the test run may have changed
        in_force = dataclasses.replace(m.client_rt.config, log_level=current_log_level())
        assert parse_config(yaml.safe_load(config_text)) == in_force
        await held.aclose()
