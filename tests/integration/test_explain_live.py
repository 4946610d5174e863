"""The admin's `GET /explain`: a running sidecar's own decision and its last outcomes, over real mTLS on loopback,
asked with a real HTTP client; and `mtlsmesh explain --live` printing them."""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote

import pytest
import trio

from mtlsmesh.cli import main
from mtlsmesh.config import Action, AuthzRule
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
