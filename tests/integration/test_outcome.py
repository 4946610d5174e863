"""The same failure ends with the same outcome whichever way the connection goes: sidecars on loopback, real TLS.

Each test makes one kind of failure happen to an outbound and to an inbound connection and checks both log lines,
both counters and the Prometheus line they become (`outcome`'s rule: the decision is taken before the handshake).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mtlsmesh import admin
from mtlsmesh.config import Action, AuthzRule, Destination, InboundConfig, Mode, OutboundConfig, Timeouts
from mtlsmesh.outcome import Decision, Reason
from mtlsmesh.runtime import Runtime
from tests.integration.mesh import (
    ANY_PORT,
    LOOPBACK,
    LOOPBACK_NET,
    app_server,
    base_config,
    client_hello,
    conn_lines,
    connect,
    echo,
    fixed_dst,
    mesh_pair,
    outcome,
    running_sidecar,
)
from tests.pki import Pki

pytestmark = pytest.mark.usefixtures("mesh_logs")

IO = 10.0
SHORT = Timeouts(handshake=0.5, connect=1.0, idle=None, drain=1.0)


def counted(rt: Runtime, direction: str, decision: Decision, reason: Reason) -> int:
    """The connection counter, and the same number as /stats/prometheus renders it."""
    count = rt.stats.connections[(direction, decision, reason)]
    text = admin.render_prometheus(rt, admin.State()).decode()
    wanted = {"direction": direction, "decision": decision, "reason": reason}
    rendered = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mtlsmesh_connections_total" and sample.labels == wanted
    ]
    assert rendered == ([count] if count else []), text
    return count


def the_line(lines: list[str]) -> str:
    (line,) = [line for line in lines if not line.endswith(" reason=closed")]
    return line


@asynccontextmanager
async def closed_port() -> AsyncIterator[int]:
    """A port bound on loopback and never listened on: a connect to it is refused."""
    sock = trio.socket.socket()
    try:
        await sock.bind((LOOPBACK, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("case", ["not-the-expected-server", "server-from-another-ca"])
async def test_a_failed_handshake_is_mtls_handshake_failed_both_ways(
    pki: Pki, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    # The client sidecar refuses the server (secure naming, or a chain from a CA it does not trust) and never sends
    # its Finished; the server sidecar's handshake then fails too. One failed handshake, seen from both ends.
    other = Pki(pki.root / "other")
    async with app_server(echo) as (app_port, seen):
        server_cfg = base_config(
            pki.issue("reviews"), inbound=InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5)
        )
        with trio.fail_after(IO):
            async with running_sidecar(server_cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (server_rt, state):
                inbound_port = state.bound["inbound"][1]
                expected = (pki.id_of("ratings"),) if case == "not-the-expected-server" else ()
                destination = Destination((LOOPBACK_NET,), frozenset({inbound_port}), expected)
                client_pki = pki if case == "not-the-expected-server" else other
                client_cfg = base_config(
                    client_pki.issue("productpage"),
                    outbound=OutboundConfig(enabled=True, listen=ANY_PORT, destinations=(destination,)),
                )
                async with running_sidecar(client_cfg, orig_dst=fixed_dst(LOOPBACK, inbound_port)) as (client_rt, cs):
                    client = await connect(cs.bound["outbound"][1])
                    kind, _ = await outcome(client)
                    with trio.fail_after(IO):
                        while server_rt.tracker.active or client_rt.tracker.active:
                            await trio.sleep(0.01)
    assert kind == "reset" and seen == []
    out_line = the_line(conn_lines(caplog.records, "outbound"))
    in_line = the_line(conn_lines(caplog.records, "inbound"))
    for line in (out_line, in_line):
        assert "decision=mtls" in line and "peer_id=-" in line and " reason=handshake_failed detail=" in line, line
    if case == "not-the-expected-server":
        assert "is not an expected identity" in out_line
    assert counted(client_rt, "outbound", Decision.MTLS, Reason.HANDSHAKE_FAILED) == 1
    assert counted(server_rt, "inbound", Decision.MTLS, Reason.HANDSHAKE_FAILED) == 1
    assert counted(server_rt, "inbound", Decision.REFUSE, Reason.HANDSHAKE_FAILED) == 0


async def test_a_handshake_that_never_finishes_is_mtls_handshake_timeout_both_ways(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # Outbound: the "server" accepts and never says a word. Inbound: the "client" sends a mesh ClientHello and
    # then nothing more. Each sidecar waits `timeouts.handshake`, then gives up.
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with app_server(silent) as (silent_port, _), app_server(echo) as (app_port, seen):
        destination = Destination((LOOPBACK_NET,), frozenset({silent_port}), ())
        client_cfg = base_config(
            pki.issue("productpage"),
            outbound=OutboundConfig(enabled=True, listen=ANY_PORT, destinations=(destination,)),
            timeouts=SHORT,
        )
        server_cfg = base_config(
            pki.issue("reviews"),
            inbound=InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5),
            timeouts=SHORT,
        )
        with trio.fail_after(IO):
            async with (
                running_sidecar(client_cfg, orig_dst=fixed_dst(LOOPBACK, silent_port)) as (client_rt, cs),
                running_sidecar(server_cfg, orig_dst=fixed_dst(LOOPBACK, app_port)) as (server_rt, ss),
            ):
                app = await connect(cs.bound["outbound"][1])
                caller = await connect(ss.bound["inbound"][1])
                await caller.send_all(client_hello())
                started = trio.current_time()
                assert (await outcome(app))[0] == "reset"
                assert (await outcome(caller))[0] == "reset"
                elapsed = trio.current_time() - started
                await caller.aclose()
    assert 0.4 < elapsed < 5 and seen == []
    for direction in ("outbound", "inbound"):
        line = the_line(conn_lines(caplog.records, direction))
        assert "decision=mtls" in line and line.endswith(" reason=handshake_timeout"), line
    assert counted(client_rt, "outbound", Decision.MTLS, Reason.HANDSHAKE_TIMEOUT) == 1
    assert counted(server_rt, "inbound", Decision.MTLS, Reason.HANDSHAKE_TIMEOUT) == 1


async def test_an_unreachable_upstream_is_connect_failed_both_ways(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    # Outbound: the mesh destination refuses the connect. Inbound: the app does.
    async with closed_port() as nowhere:
        destination = Destination((LOOPBACK_NET,), frozenset({nowhere}), ())
        client_cfg = base_config(
            pki.issue("productpage"),
            outbound=OutboundConfig(enabled=True, listen=ANY_PORT, destinations=(destination,)),
        )
        with trio.fail_after(IO):
            async with running_sidecar(client_cfg, orig_dst=fixed_dst(LOOPBACK, nowhere)) as (lone_rt, state):
                assert (await outcome(await connect(state.bound["outbound"][1])))[0] == "reset"
            async with mesh_pair(pki, nowhere) as mesh:
                assert (await outcome(await connect(mesh.port)))[0] == "reset"
                while mesh.server_rt.tracker.active or mesh.client_rt.tracker.active:
                    await trio.sleep(0.01)
    outbound_lines = conn_lines(caplog.records, "outbound")
    (inbound_line,) = conn_lines(caplog.records, "inbound")
    for line in (outbound_lines[0], inbound_line):
        assert "decision=mtls" in line and line.endswith(' reason=connect_failed detail="Connection refused"'), line
    assert counted(lone_rt, "outbound", Decision.MTLS, Reason.CONNECT_FAILED) == 1
    assert counted(mesh.server_rt, "inbound", Decision.MTLS, Reason.CONNECT_FAILED) == 1
    # The client sidecar of the pair had its tunnel reset by the peer once the server could not reach the app.
    assert re.search(r"decision=mtls .* reason=reset_by_peer detail=", outbound_lines[1]), outbound_lines[1]


async def test_refused_before_the_decision_is_refuse_both_ways(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    # The real original-destination lookup on connections no NAT rule touched: both listeners refuse at once.
    cfg = base_config(
        pki.issue("a"),
        outbound=OutboundConfig(enabled=True, listen=ANY_PORT),
        inbound=InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5),
    )
    with trio.fail_after(IO):
        async with running_sidecar(cfg) as (rt, state):
            for direction in ("outbound", "inbound"):
                assert (await outcome(await connect(state.bound[direction][1])))[0] == "reset"
    for direction in ("outbound", "inbound"):
        (line,) = conn_lines(caplog.records, direction)
        # Without conntrack: no_orig_dst; with it, the "original" destination is the listener itself: a loop.
        assert "decision=refuse" in line and re.search(r" reason=(no_orig_dst|loop) detail=", line), line
        refused = sum(counted(rt, direction, Decision.REFUSE, reason) for reason in (Reason.NO_ORIG_DST, Reason.LOOP))
        assert refused == 1


async def test_a_denial_keeps_the_decision_taken_before_it(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    # PERMISSIVE, and only sa/details may call the app: a plaintext caller is passed through and then denied, a mesh
    # caller (sa/productpage) is carried as mTLS and then denied. The decision says how each was carried.
    async with app_server(echo) as (app_port, seen):
        rules = (AuthzRule(Action.ALLOW, (str(pki.id_of("details")),), frozenset({app_port})),)
        inbound = InboundConfig(enabled=True, listen=ANY_PORT, sniff_timeout=0.5, mode=Mode.PERMISSIVE)
        changes = {"inbound": inbound, "authorization": rules}
        with trio.fail_after(IO):
            async with mesh_pair(pki, app_port, server_changes=changes) as mesh:
                plain = await connect(mesh.inbound_port)
                await plain.send_all(b"plaintext hello")
                assert (await outcome(plain))[0] == "reset"
                assert (await outcome(await connect(mesh.port)))[0] == "reset"
                while mesh.server_rt.tracker.active or mesh.client_rt.tracker.active:
                    await trio.sleep(0.01)
    assert seen == []
    plain_line, mesh_line = conn_lines(caplog.records, "inbound")
    assert "decision=passthrough" in plain_line and "peer_id=-" in plain_line
    assert plain_line.endswith(
        f' reason=denied detail="plaintext caller matches no ALLOW rule for port {app_port} (rules 0)"'
    )
    assert "decision=mtls" in mesh_line and "peer_id=spiffe://cluster.local/ns/default/sa/productpage" in mesh_line
    assert ' reason=denied detail="spiffe://cluster.local/ns/default/sa/productpage matches no ALLOW rule' in mesh_line
    assert counted(mesh.server_rt, "inbound", Decision.PASSTHROUGH, Reason.DENIED) == 1
    assert counted(mesh.server_rt, "inbound", Decision.MTLS, Reason.DENIED) == 1
