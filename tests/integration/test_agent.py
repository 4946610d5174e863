"""The sidecar's identity agent against a real CA service on loopback: enrollment with a token, renewal with its
SVID (short lifetimes, so the swap happens during the test), the fallback to the token, the CA stopped and started
again, a trust bundle change, and a CA that is not who it should be.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import ca, caserver
from mtlsmesh.agent import IdentityAgent, build_credentials
from mtlsmesh.cli import main
from mtlsmesh.config import IdentityConfig, ListenAddr
from mtlsmesh.errors import CertificateError
from mtlsmesh.identity import TrustDomain, parse_spiffe_id, workload_id
from tests.integration.castack import LOOPBACK, CaLab, eventually, make_ca_dir, running_ca
from tests.pki import TD


@pytest.fixture
def lab(tmp_path: Path) -> CaLab:
    return CaLab.create(tmp_path)


@pytest.fixture(autouse=True)
def logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtlsmesh")


def agent_for(
    lab: CaLab, port: int, *, ttl: float = 60.0, service_account: str = "reviews", **changes: object
) -> IdentityAgent:
    token = lab.root / f"token-{service_account}"
    if not token.exists():
        token.write_text(lab.issuer.token("default", service_account) + "\n")
    cfg = IdentityConfig(ListenAddr(LOOPBACK, port), str(token), str(lab.ca_dir / "bundle.pem"), ttl=ttl)
    cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
    return IdentityAgent(cfg, TD, call_timeout=3.0, min_backoff=0.1, max_backoff=0.4, rng=random.Random(7))


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage() + " "]


@asynccontextmanager
async def serving(agent: IdentityAgent) -> AsyncIterator[IdentityAgent]:
    """Enroll, then keep renewing in the background until the block ends."""
    with trio.fail_after(15):
        await agent.enroll()
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve_reload)
        yield agent
        nursery.cancel_scope.cancel()


def serial(agent: IdentityAgent) -> int:
    return agent.current.material.chain[0].serial_number


async def test_enroll_with_the_token_then_renew_with_the_svid(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    async with running_ca(lab.config()) as (_, port, _), serving(agent_for(lab, port, ttl=4.0)) as agent:
        first = agent.current
        assert first.spiffe_id == parse_spiffe_id("spiffe://cluster.local/ns/default/sa/reviews")
        assert first.material.roots == lab.roots
        lifetime = (first.not_after - first.material.chain[0].not_valid_before_utc).total_seconds()
        assert lifetime == pytest.approx(64, abs=2)  # 4 s asked for, and backdated a minute

        await eventually(lambda: agent.current.fingerprint != first.fingerprint, timeout=5)
        renewed = agent.current
        elapsed = renewed.material.chain[0].not_valid_before_utc - first.material.chain[0].not_valid_before_utc
        assert 1.0 <= elapsed.total_seconds() <= 3.5  # about half of the 4 s, with jitter
        assert renewed.spiffe_id == first.spiffe_id and serial(agent) != first.material.chain[0].serial_number
        assert renewed.server_context is not first.server_context  # new handshakes use the new one
        assert renewed.material.key is not first.material.key  # a fresh key per SVID
        assert agent.reloads >= 1 and agent.reload_failures == 0
    (issued,) = lines(caplog, "svid_issued")
    assert "credential=token" in issued
    assert "credential=svid" in lines(caplog, "svid_renewed")[0]
    ca_side = [line for line in lines(caplog, "issued")]
    assert [("credential=token" in x) for x in ca_side][:2] == [True, False]


async def test_the_ca_stopped_and_started_again(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    cfg = lab.config()
    async with running_ca(cfg) as (_, port, _):
        agent = agent_for(lab, port, ttl=6.0)
        with trio.fail_after(15):
            await agent.enroll()
    first = serial(agent)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve_reload)
        # The CA is gone: renewal (due at about 3 s) fails, the SVID stays, one line says so.
        await eventually(lambda: agent.reload_failures >= 3, timeout=8)
        assert serial(agent) == first
        assert len(lines(caplog, "svid_renewal_failing")) == 1  # once, not once per retry
        assert "Connection refused" in lines(caplog, "svid_renewal_failing")[0]
        async with running_ca(caserver_config_on(cfg, port)) as _:
            await eventually(lambda: serial(agent) != first, timeout=8)
        nursery.cancel_scope.cancel()
    assert len(lines(caplog, "svid_renewal_recovered")) == 1
    assert "credential=svid" in lines(caplog, "svid_renewed")[0]  # it renewed with the SVID it kept


def caserver_config_on(cfg: caserver.ServeConfig, port: int) -> caserver.ServeConfig:
    return dataclasses.replace(cfg, listen=(ListenAddr(LOOPBACK, port),), metrics_listen=None)


async def test_a_bundle_change_is_followed_and_a_refused_svid_falls_back_to_the_token(
    lab: CaLab, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    nxt = tmp_path / "next"
    new_root = make_ca_dir(nxt).roots[0]
    bundle = str(lab.ca_dir / "bundle.pem")
    async with running_ca(lab.config()) as (_, port, _), serving(agent_for(lab, port, ttl=600.0)) as agent:
        first = agent.current
        # (a) a new root joins: new contexts that trust it too, around the same SVID
        assert main(["ca", "bundle", "--bundle", bundle, "--add", str(nxt / "root.pem")]) == 0
        await eventually(lambda: new_root in agent.current.material.roots)
        assert agent.current.fingerprint == first.fingerprint
        assert agent.current.client_context is not first.client_context
        # (b) and (c): the CA signs under the new root and stops trusting the old one. Our SVID (old root) no longer
        # chains: the agent renews at once, its SVID is refused at TLS, and the token gets it a new one.
        assert main(["ca", "rotate", "--dir", str(lab.ca_dir), "--to", str(nxt)]) == 0
        await trio.sleep(0.5)  # the CA reads the rotated directory (it polls every 0.1 s)
        assert main(["ca", "bundle", "--bundle", bundle, "--remove", str(lab.ca_dir / "previous-root.pem")]) == 0
        await eventually(lambda: agent.current.material.chain[0].issuer == new_root.subject)
        assert agent.current.material.roots == (new_root,)
    capsys.readouterr()
    renewed = lines(caplog, "svid_renewed")
    assert len(renewed) == 1 and "credential=token" in renewed[0]
    assert "fallback_from_svid=" in renewed[0] and "unknown ca" in renewed[0]
    assert any("svid_chains=false" in line for line in lines(caplog, "bundle_updated"))


async def test_a_server_that_is_not_the_ca_is_refused(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    impostor_id = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/not-the-ca")
    async with running_ca(lab.config()) as (_, port, _):
        agent = agent_for(lab, port, ca_identity=impostor_id)
        with trio.move_on_after(1.0):
            await agent.enroll()
    with pytest.raises(RuntimeError, match="no SVID yet"):
        agent.current  # noqa: B018
    (failing,) = lines(caplog, "svid_enrollment_failing")
    assert "the server is spiffe://cluster.local/ns/mtlsmesh-system/sa/mtlsmesh-ca, not the CA" in failing
    assert agent.reload_failures >= 2
    assert lines(caplog, "issued") == []  # nothing was sent: the CA never saw a request


async def test_enrollment_waits_for_the_token_file(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    async with running_ca(lab.config()) as (_, port, _):
        agent = agent_for(lab, port, service_account="late")
        token = Path(agent.cfg.token)
        token.unlink()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.enroll)
            await eventually(lambda: agent.reload_failures >= 2)
            token.write_text(lab.issuer.token("default", "late"))
            await eventually(lambda: agent.received == 1)
    (failing,) = lines(caplog, "svid_enrollment_failing")
    assert f"cannot read the token file {token}: No such file or directory" in failing
    assert str(agent.current.spiffe_id) == "spiffe://cluster.local/ns/default/sa/late"


def test_an_answer_that_is_not_ours_is_refused(lab: CaLab) -> None:
    """What the CA sent must be an SVID of our trust domain, for our key, chaining to the bundle it sent."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ours = ca.issue_svid(lab.authority, workload_id(TD, "default", "reviews"), now=now, public_key=key.public_key())
    chain = (ours.cert, *ours.chain)
    assert str(build_credentials(chain, key, lab.roots, TD).spiffe_id).endswith("/sa/reviews")
    with pytest.raises(CertificateError, match="does not match the certificate"):
        build_credentials(chain, ec.generate_private_key(ec.SECP256R1()), lab.roots, TD)
    with pytest.raises(CertificateError, match=r"is not in trust domain other\.example"):
        build_credentials(chain, key, lab.roots, TrustDomain("other.example"))
    stranger = ca.create_ca(TD, now=now - timedelta(hours=1))
    with pytest.raises(CertificateError, match="does not chain to the CA's trust bundle"):
        build_credentials(chain, key, stranger.roots, TD)


async def test_a_renewal_that_names_another_identity_is_refused(lab: CaLab) -> None:
    # The token file now holds another service account's token (mounted by mistake): the sidecar must not become
    # that workload. The renewal that falls back to the token is refused and the SVID in hand stays.
    async with running_ca(lab.config()) as (_, port, _):
        agent = agent_for(lab, port)
        with trio.fail_after(15):
            await agent.enroll()
        before = agent.current
        (lab.root / "token-reviews").write_text(lab.issuer.token("default", "ratings") + "\n")
        with trio.fail_after(15), pytest.raises(CertificateError, match=r"names .*/sa/ratings, not this sidecar's"):
            await agent._sign(use_svid=False)
        assert agent.current is before
        assert str(agent.current.spiffe_id) == "spiffe://cluster.local/ns/default/sa/reviews"
