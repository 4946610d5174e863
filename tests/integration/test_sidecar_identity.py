"""Two in-process sidecars whose SVIDs come from a CA service on loopback (the identity section): mTLS traffic
between them, both renewing during the test while a connection stays open, and what the admin endpoints show.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from mtlsmesh import admin
from mtlsmesh.agent import IdentityAgent
from mtlsmesh.config import (
    Config,
    CredentialFiles,
    ExplicitListener,
    ExplicitMode,
    IdentityConfig,
    ListenAddr,
)
from mtlsmesh.identity import parse_spiffe_id
from mtlsmesh.runtime import Runtime
from mtlsmesh.sidecar import serve_sidecar
from tests.integration.castack import LOOPBACK, CaLab, running_ca
from tests.integration.mesh import ANY_PORT, app_server, base_config, conn_lines, connect, echo, exchange, outcome
from tests.pki import TD

pytestmark = pytest.mark.usefixtures("mesh_logs")


def identity_config(lab: CaLab, ca_port: int, service_account: str, explicit: ExplicitListener) -> Config:
    token = lab.root / f"{service_account}.token"
    token.write_text(lab.issuer.token("default", service_account))
    identity = IdentityConfig(ListenAddr(LOOPBACK, ca_port), str(token), str(lab.ca_dir / "bundle.pem"), ttl=4.0)
    cfg = base_config(CredentialFiles("", "", ""), explicit=(explicit,))
    return dataclasses.replace(cfg, credentials=None, identity=identity)


@asynccontextmanager
async def identity_sidecar(cfg: Config) -> AsyncIterator[tuple[Runtime, admin.State, IdentityAgent]]:
    assert cfg.identity is not None
    agent = IdentityAgent(cfg.identity, cfg.trust_domain, min_backoff=0.1, max_backoff=0.5, rng=random.Random(1))
    with trio.fail_after(10):
        await agent.enroll()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        rt, state = await nursery.start(functools.partial(serve_sidecar, cfg, agent, stop=stop))
        try:
            yield rt, state, agent
        finally:
            stop.set()


async def http_get(port: int, path: str) -> bytes:
    stream = await connect(port)
    await stream.send_all(f"GET {path} HTTP/1.1\r\n\r\n".encode())
    _, data = await outcome(stream)
    await stream.aclose()
    return data


async def test_two_sidecars_with_svids_from_the_ca(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lab = CaLab.create(tmp_path)
    reviews = f"spiffe://{TD}/ns/default/sa/reviews"
    with trio.fail_after(60):
        async with running_ca(lab.config()) as (_, ca_port, _), app_server(echo) as (app_port, _):
            server_cfg = identity_config(
                lab, ca_port, "reviews",
                ExplicitListener("in", ANY_PORT, ListenAddr(LOOPBACK, app_port), ExplicitMode.TERMINATE),
            )  # fmt: skip
            async with identity_sidecar(server_cfg) as (_, server_state, server_agent):
                target = ListenAddr(LOOPBACK, server_state.bound["in"][1])
                client_cfg = identity_config(
                    lab, ca_port, "productpage",
                    ExplicitListener("out", ANY_PORT, target, ExplicitMode.ORIGINATE, (parse_spiffe_id(reviews),)),
                )  # fmt: skip
                async with identity_sidecar(client_cfg) as (_, client_state, client_agent):
                    port = client_state.bound["out"][1]
                    assert await exchange(port, b"before renewal") == b"before renewal"
                    # A connection that stays open across both renewals.
                    open_conn = await connect(port)
                    await open_conn.send_all(b"ping")
                    assert await open_conn.receive_some(100) == b"ping"
                    server_first, client_first = server_agent.current, client_agent.current
                    while server_agent.current is server_first or client_agent.current is client_first:
                        await trio.sleep(0.1)  # both renew at about 2 s (a 4 s lifetime, renewed at half)
                    await open_conn.send_all(b"still open")
                    assert await open_conn.receive_some(100) == b"still open"
                    await open_conn.aclose()
                    assert await exchange(port, b"after renewal") == b"after renewal"
                    metrics = (await http_get(client_state.bound["metrics"][1], "/stats/prometheus")).decode()
                    certs = (await http_get(client_state.bound["admin"][1], "/certs")).decode()
                    ready = await http_get(client_state.bound["health"][1], "/healthz/ready")
    assert ready.startswith(b"HTTP/1.1 200")
    described = json.loads(certs.split("\r\n\r\n", 1)[1])
    assert described["spiffe_id"] == f"spiffe://{TD}/ns/default/sa/productpage"
    assert described["serial"] == format(client_agent.current.material.chain[0].serial_number, "x")
    seconds_left = float(re.findall(r"^mtlsmesh_svid_seconds_left (\S+)$", metrics, re.MULTILINE)[0])
    assert 0 < seconds_left <= 64
    reloads = float(re.findall(r"^mtlsmesh_credential_reloads_total (\S+)$", metrics, re.MULTILINE)[0])
    assert reloads >= 1  # the renewal above was swapped in, and counted
    inbound = conn_lines(caplog.records, "inbound")
    assert len(inbound) == 3 and all("peer_id=spiffe://cluster.local/ns/default/sa/productpage" in x for x in inbound)
    assert all("decision=mtls" in line for line in conn_lines(caplog.records, "outbound"))


async def test_an_svid_from_the_ca_with_little_life_left_is_warned_about_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lab = CaLab.create(tmp_path)
    with trio.fail_after(60):
        async with running_ca(lab.config()) as (_, ca_port, _), app_server(echo) as (app_port, _):
            cfg = identity_config(
                lab, ca_port, "reviews",
                ExplicitListener("in", ANY_PORT, ListenAddr(LOOPBACK, app_port), ExplicitMode.TERMINATE),
            )  # fmt: skip
            # The CA backdates each SVID by a minute: a 4 s SVID arrives with 4 of its 64 s left, under the
            # default share of 0.2, so each one is warned about as soon as the watcher (every second) sees it,
            # before its renewal at about 2 s; and never again.
            assert cfg.svid_warning == 0.2
            async with identity_sidecar(cfg) as (_, _, agent):
                seen = [agent.current.fingerprint]
                while len(seen) < 3:  # the first SVID and two renewals, the last one warned about too
                    await trio.sleep(0.05)
                    if agent.current.fingerprint != seen[-1]:
                        seen.append(agent.current.fingerprint)
                await trio.sleep(2.0)  # long enough for a second warning about the third one, if there were one
    warned = [
        re.search(r"sha256=(\S+)", record.getMessage())[1]  # type: ignore[index]
        for record in caplog.records
        if "event=svid_expiring" in record.getMessage()
    ]
    assert warned[: len(seen)] == seen  # one per SVID, in order (a fourth may have come during the last sleep)
    assert len(warned) == len(set(warned))  # none twice
    assert all(record.levelname == "WARNING" for record in caplog.records if "svid_expiring" in record.getMessage())
