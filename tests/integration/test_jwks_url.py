"""The CA service reads the token issuer's JWKS from an https URL, served here by a real HTTPS server (Python's
`http.server` with `ssl`, its certificate from a CA made in tmp_path): the server verified, the bearer token sent,
a key rotated in at the issuer picked up at the first token that names it, a server that is down, answers garbage
or too much: the last good keys kept, one log line per change of state, and other callers served throughout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import caclient, caproto, caserver
from mtlsmesh.errors import ConfigError
from tests.https_peer import HttpsPeer, Reply, Seen, ServerPki
from tests.integration.castack import CaLab, enroll, eventually, make_csr, raw_call, renew, running_ca
from tests.jwt_issuer import Issuer

JWKS_PATH = "/openid/v1/jwks"
TOKEN = "the-cas-own-service-account-token"


class Issuing:
    """What the HTTPS server answers for the JWKS path: the issuer's keys, or a failure a test chooses."""

    def __init__(self, *issuers: Issuer) -> None:
        self.issuers = list(issuers)
        self.mode = "ok"

    def __call__(self, seen: Seen) -> Reply:
        if seen.path != JWKS_PATH:
            return Reply(404, b'{"message": "not found"}')
        if self.mode == "garbage":
            return Reply(200, b"<html>this is a login page, not a JWKS</html>", "text/html")
        if self.mode == "oversize":
            return Reply(200, json.dumps({"keys": [], "pad": "x" * (1024 * 1024 + 10)}).encode())
        if self.mode == "forbidden":
            return Reply(403, b'{"kind":"Status","message":"forbidden: User \\"system:anonymous\\" cannot get path"}')
        return Reply(200, json.dumps({"keys": [issuer.jwk() for issuer in self.issuers]}).encode())


@pytest.fixture(autouse=True)
def ca_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtlsmesh")


@pytest.fixture
def lab(tmp_path: Path) -> CaLab:
    return CaLab.create(tmp_path)


@pytest.fixture
def pki(tmp_path: Path) -> ServerPki:
    return ServerPki.create(tmp_path / "issuer-pki", "issuer")


@pytest.fixture
def issuing(lab: CaLab) -> Issuing:
    return Issuing(lab.issuer)


@pytest.fixture
def server(pki: ServerPki, issuing: Issuing) -> Iterator[HttpsPeer]:
    peer = HttpsPeer(pki, issuing).start()
    try:
        yield peer
    finally:
        peer.stop()


def url_config(lab: CaLab, server: HttpsPeer, pki: ServerPki, **changes: object) -> caserver.ServeConfig:
    token_file = lab.root / "sa-token"
    token_file.write_text(TOKEN + "\n")
    settings: dict[str, object] = {
        "jwks": server.url(JWKS_PATH),
        "jwks_ca": str(pki.ca_file),
        "jwks_token": str(token_file),
        "jwks_refresh": 300.0,
        "jwks_min_refetch": 0.2,
        "jwks_timeout": 5.0,
    }
    return lab.config(**{**settings, **changes})


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.ca" and f"event={event}" in r.getMessage()]


def jwks_fetches(server: HttpsPeer) -> int:
    return sum(1 for seen in server.seen if seen.path == JWKS_PATH)


async def test_tokens_verify_against_keys_fetched_over_verified_https_with_the_bearer_token(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_ca(url_config(lab, server, pki)) as (service, port, _):
        answer, _ = await enroll(port, lab.roots, lab.issuer.token("default", "reviews"))
        assert str(answer.spiffe_id) == "spiffe://cluster.local/ns/default/sa/reviews"
        # A token the issuer's key did not sign is still refused: the fetched keys are the issuer's only.
        forged = Issuer("rsa", kid=lab.issuer.kid).token()
        refused = await raw_call(
            port, lab.roots, "POST", caproto.SIGN_PATH, headers=(("authorization", f"Bearer {forged}"),),
            body=caproto.SignRequest(make_csr(ec.generate_private_key(ec.SECP256R1()))).encode(),
        )  # fmt: skip
        assert refused.status == 401 and b"signature does not verify" in refused.body
    first = server.seen[0]
    assert (first.method, first.path) == ("GET", JWKS_PATH)
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert first.headers["host"] == f"127.0.0.1:{server.port}"
    assert lines(caplog, "jwks_reloaded") == [f"event=jwks_reloaded url={server.url(JWKS_PATH)} keys=1 kids=key-1"]
    assert service.keys.reloads == 1


async def test_a_key_rotated_in_at_the_issuer_is_fetched_for_the_first_token_naming_it(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, issuing: Issuing, caplog: pytest.LogCaptureFixture
) -> None:
    rotated = Issuer("p256", kid="key-2")
    async with running_ca(url_config(lab, server, pki, jwks_min_refetch=0.5)) as (_, port, _):
        await enroll(port, lab.roots, lab.issuer.token("default", "reviews"))
        assert jwks_fetches(server) == 1
        issuing.issuers = [rotated]  # the issuer rotates: the old key is gone, key-2 signs from now on
        await trio.sleep(0.6)  # past min_refetch since the start's fetch
        answer, _ = await enroll(port, lab.roots, rotated.token("default", "ratings"))
        assert str(answer.spiffe_id) == "spiffe://cluster.local/ns/default/sa/ratings"
        assert jwks_fetches(server) == 2  # one early fetch, on the unknown kid, not a periodic one
        # The retired key no longer verifies anything (kid key-1 is unknown now).
        await trio.sleep(0.6)
        with pytest.raises(caclient.CaError, match="401: no key with kid 'key-1'"):
            await enroll(port, lab.roots, lab.issuer.token("default", "reviews"))
    reloaded = lines(caplog, "jwks_reloaded")
    assert reloaded[-1].endswith("keys=1 kids=key-2")


async def test_the_periodic_refresh_follows_the_issuer_without_any_token_asking(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, issuing: Issuing, caplog: pytest.LogCaptureFixture
) -> None:
    rotated = Issuer("p384", kid="key-3")
    config = url_config(lab, server, pki, jwks_refresh=0.3, jwks_min_refetch=3600.0)  # no early fetch at all
    async with running_ca(config) as (service, port, _):
        issuing.issuers = [lab.issuer, rotated]  # the issuer publishes its next key before it signs with it
        await eventually(lambda: service.keys.reloads == 2)
        assert lines(caplog, "jwks_reloaded")[-1].endswith("keys=2 kids=key-1,key-3")
        answer, _ = await enroll(port, lab.roots, rotated.token("default", "details"))
        assert str(answer.spiffe_id).endswith("/sa/details")
        await enroll(port, lab.roots, lab.issuer.token("default", "reviews"))  # both keys verify meanwhile


async def test_unknown_kid_fetches_are_rate_limited(lab: CaLab, server: HttpsPeer, pki: ServerPki) -> None:
    # With min_refetch longer than the test, a flood of made-up kids costs the issuer no fetch at all.
    rotated = Issuer("p256", kid="key-9")
    async with running_ca(url_config(lab, server, pki, jwks_min_refetch=3600.0)) as (_, port, _):
        with trio.fail_after(30):
            for n in range(30):
                with pytest.raises(caclient.CaError, match="401: no key with kid 'key-9'"):
                    await enroll(port, lab.roots, rotated.token("default", f"sa{n}"))
        answer, _ = await enroll(port, lab.roots, lab.issuer.token("default", "reviews"))  # others are served
        assert str(answer.spiffe_id).endswith("/sa/reviews")
    assert jwks_fetches(server) == 1


async def test_an_issuer_down_then_garbage_then_back_keeps_the_last_good_keys(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, issuing: Issuing, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.url(JWKS_PATH)
    async with running_ca(url_config(lab, server, pki, jwks_refresh=0.3)) as (service, port, _):
        await enroll(port, lab.roots, lab.issuer.token())
        server.stop()
        await eventually(lambda: lines(caplog, "jwks_refresh_failed"))
        failures = service.keys.reload_failures
        await eventually(lambda: service.keys.reload_failures >= failures + 2)  # retried, not logged again
        assert len(lines(caplog, "jwks_refresh_failed")) == 1
        assert "Connection refused" in lines(caplog, "jwks_refresh_failed")[0]
        assert "keeping=1" in lines(caplog, "jwks_refresh_failed")[0]
        # Down, the last good keys still verify tokens; renewals need no keys at all.
        answer, material = await enroll(port, lab.roots, lab.issuer.token("default", "details"))
        await renew(port, material)
        assert str(answer.spiffe_id).endswith("/sa/details")

        issuing.mode = "garbage"
        server.start()  # the same port, now answering HTML
        await eventually(lambda: len(lines(caplog, "jwks_refresh_failed")) == 2)
        assert "the JWKS is not JSON" in lines(caplog, "jwks_refresh_failed")[1]
        await enroll(port, lab.roots, lab.issuer.token("default", "productpage"))

        issuing.mode = "ok"
        await eventually(lambda: lines(caplog, "jwks_recovered"))
        assert lines(caplog, "jwks_recovered") == [f"event=jwks_recovered url={url} keys=1"]
        assert len(lines(caplog, "jwks_refresh_failed")) == 2
        assert len(lines(caplog, "jwks_reloaded")) == 1  # the same keys: nothing reloaded
        await eventually(lambda: _metric(service, "mtlsmesh_ca_reload_failures_total") >= 3)


async def test_an_oversize_or_forbidden_answer_is_refused_and_tokens_wait_for_the_keys(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, issuing: Issuing, caplog: pytest.LogCaptureFixture
) -> None:
    issuing.mode = "oversize"
    async with running_ca(url_config(lab, server, pki, jwks_refresh=0.3, jwks_min_refetch=0.1)) as (_, port, _):
        # No key was ever fetched: a token is refused 503 with the reason, not judged against nothing.
        with pytest.raises(caclient.CaError, match=r"503: the token issuer's keys are not available: .*larger than"):
            await enroll(port, lab.roots, lab.issuer.token())
        assert "the answer is larger than 1048576 bytes" in lines(caplog, "jwks_refresh_failed")[0]
        assert "keeping=0" in lines(caplog, "jwks_refresh_failed")[0]
        assert "refusal=jwks_unavailable" in lines(caplog, "refused")[-1]
        issuing.mode = "forbidden"
        await eventually(lambda: len(lines(caplog, "jwks_refresh_failed")) == 2)
        assert "answered 403 (a bearer token of a service account bound to " in lines(caplog, "jwks_refresh_failed")[1]
        issuing.mode = "ok"
        await eventually(lambda: lines(caplog, "jwks_reloaded"))
        answer, _ = await enroll(port, lab.roots, lab.issuer.token())
        assert str(answer.spiffe_id).endswith("/sa/reviews")


async def test_a_server_the_ca_file_does_not_vouch_for_is_never_believed(
    lab: CaLab, server: HttpsPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = ServerPki.create(tmp_path / "other", "other")
    async with running_ca(url_config(lab, server, other)) as (_, port, _):
        with pytest.raises(caclient.CaError, match=r"503: .*certificate does not verify"):
            await enroll(port, lab.roots, lab.issuer.token())
    assert "the server's certificate does not verify" in lines(caplog, "jwks_refresh_failed")[0]
    assert all(seen.path != JWKS_PATH for seen in server.seen)  # nothing was sent before TLS failed


def test_plain_http_is_refused_at_start(lab: CaLab) -> None:
    with pytest.raises(ConfigError, match=r"--token-jwks: 'http://127\.0\.0\.1:1/jwks': plain http is refused"):
        caserver.CaService(lab.config(jwks="http://127.0.0.1:1/jwks"))


def _metric(service: caserver.CaService, name: str) -> float:
    value = service.metrics.registry.get_sample_value(name)
    return value if value is not None else 0.0
