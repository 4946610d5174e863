"""The CA service on loopback: enrollment with a token, renewal with an SVID, every refusal with its status, reason
and log line, and, after each, a well-behaved caller served as if nothing had happened.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import h11
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import ca, caclient, caproto, handshake, http11, svid
from mtlsmesh.cli.ca import verify_chain
from mtlsmesh.identity import TrustDomain, workload_id
from tests.integration.castack import (
    CaLab,
    endpoint,
    enroll,
    make_csr,
    raw_call,
    renew,
    running_ca,
    token_for,
    workload,
)
from tests.integration.mesh import connect, outcome
from tests.jwt_issuer import Issuer, hmac_token_with_public_key, unsigned_token
from tests.pki import TD, material_for

DER = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


@pytest.fixture
def lab(tmp_path: Path) -> CaLab:
    return CaLab.create(tmp_path)


@pytest.fixture(autouse=True)
def ca_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtlsmesh")


def ca_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.ca" and f"event={event}" in r.getMessage()]


async def well_behaved(lab: CaLab, port: int) -> None:
    """Someone else, right after (or during) a refusal: served."""
    answer, _ = await enroll(port, lab.roots, token_for(lab, "shop", "cart"))
    assert str(answer.spiffe_id) == workload("shop", "cart")


async def test_a_token_gets_its_own_identity_whatever_the_csr_asks_for(
    lab: CaLab, caplog: pytest.LogCaptureFixture
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, "spiffe://cluster.local/ns/kube-system/sa/admin")  # asks for B
    async with running_ca(lab.config()) as (_, port, _):
        with trio.fail_after(10):
            answer = await caclient.sign(
                endpoint(port), lab.roots, caproto.SignRequest(csr), token=token_for(lab, "default", "reviews")
            )
        bundle = await caclient.fetch_bundle(endpoint(port), lab.roots)
    leaf = answer.chain[0]
    assert svid.leaf_spiffe_id(leaf) == answer.spiffe_id == workload_id(TD, "default", "reviews")  # the token's A
    assert leaf.public_key().public_bytes(*DER) == key.public_key().public_bytes(*DER)  # only the key was taken
    assert answer.serial == leaf.serial_number and answer.not_after == leaf.not_valid_after_utc
    verify_chain(answer.chain, answer.bundle)
    assert answer.bundle == lab.roots == bundle.roots
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime.total_seconds() == pytest.approx(3600 + ca.BACKDATE.total_seconds(), abs=5)
    (line,) = ca_lines(caplog, "issued")
    assert f"credential=token spiffe_id={workload()} serial={leaf.serial_number:x} not_after=" in line
    assert re.search(r"client=127\.0\.0\.1:\d+ ", line)


async def test_an_svid_renews_itself_and_a_shorter_ttl_is_granted(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    async with running_ca(lab.config()) as (_, port, _):
        first, material = await enroll(port, lab.roots, token_for(lab), ttl=600)
        second, _ = await renew(port, material)
    assert second.spiffe_id == first.spiffe_id and second.serial != first.serial
    leaf = first.chain[0]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == pytest.approx(660, abs=5)
    assert [("credential=token" in x, "credential=svid" in x) for x in ca_lines(caplog, "issued")] == [
        (True, False),
        (False, True),
    ]


async def test_the_bundle_is_served_in_the_spiffe_format(lab: CaLab) -> None:
    async with running_ca(lab.config()) as (_, port, _):
        answer = await raw_call(port, lab.roots, "GET", "/v1/bundle")
        bundle = await caclient.fetch_bundle(endpoint(port), lab.roots)
    document = json.loads(answer.body)
    assert answer.status == 200 and ("content-type", "application/json") in answer.headers
    assert [key["use"] for key in document["keys"]] == ["x509-svid"]
    assert document["spiffe_refresh_hint"] == 1 and document["spiffe_sequence"] == bundle.sequence > 0
    assert bundle.roots == lab.roots


# --- refusals: (status, refusal label, the one line), a log line each, and the next caller served -------------


def _body(csr: str) -> bytes:
    return caproto.SignRequest(csr).encode()


def _csr() -> str:
    return make_csr(ec.generate_private_key(ec.SECP256R1()))


def _broken_csr() -> str:
    der = bytearray(x509.load_pem_x509_csr(_csr().encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )


def _ca_csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


NOW = int(time.time())
REFUSALS = [
    ("forged-token", lambda lab: (_bearer(Issuer("rsa", kid=lab.issuer.kid).token()), _body(_csr())),
     401, "bad_token", "signature does not verify"),
    ("expired-token", lambda lab: (_bearer(lab.issuer.token(exp=NOW - 300, iat=NOW - 900, nbf=NOW - 900)),
                                   _body(_csr())), 401, "bad_token", "the token expired at"),
    ("wrong-issuer", lambda lab: (_bearer(lab.issuer.token(iss="https://evil.example")), _body(_csr())),
     401, "bad_token", "issuer is not"),
    ("wrong-audience", lambda lab: (_bearer(lab.issuer.token(aud=["kubernetes"])), _body(_csr())),
     401, "bad_token", "audience is not 'mtlsmesh-ca'"),
    ("alg-none", lambda lab: (_bearer(unsigned_token()), _body(_csr())), 401, "bad_token", "alg none"),
    ("hs256-with-public-key", lambda lab: (_bearer(hmac_token_with_public_key(lab.issuer)), _body(_csr())),
     401, "bad_token", "HS256"),
    ("no-credential", lambda lab: ((), _body(_csr())), 401, "no_credential", "no credential"),
    ("basic-auth", lambda lab: ((("authorization", "Basic eDp5"),), _body(_csr())),
     401, "bad_token", "must be 'Bearer <token>'"),
    ("csr-bad-signature", lambda lab: (_bearer(token_for(lab)), _body(_broken_csr())),
     400, "bad_csr", "signature does not verify"),
    ("csr-for-a-ca", lambda lab: (_bearer(token_for(lab)), _body(_ca_csr())), 400, "ca_csr", "CA certificate"),
    ("body-not-json", lambda lab: (_bearer(token_for(lab)), b"csr=please"), 400, "malformed", "not JSON"),
    ("csr-over-the-cap", lambda lab: (_bearer(token_for(lab)), _body("A" * (caproto.MAX_BODY + 10))),
     413, "too_large", "larger than 16384 bytes"),
    ("csr-field-over-its-cap", lambda lab: (_bearer(token_for(lab)), _body("A" * (caproto.MAX_CSR + 10))),
     413, "too_large", "the CSR is larger than 8192 bytes"),
    ("the-ca-identity", lambda lab: (_bearer(token_for(lab, "mtlsmesh-system", "mtlsmesh-ca")), _body(_csr())),
     403, "not_allowed", "the CA's own identity"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "status", "label", "line"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_refusals(
    lab: CaLab, caplog: pytest.LogCaptureFixture, case: str, make: object, status: int, label: str, line: str
) -> None:
    assert callable(make)
    headers, body = make(lab)
    async with running_ca(lab.config()) as (service, port, _):
        answer = await raw_call(port, lab.roots, "POST", "/v1/sign", headers=headers, body=body)
        await well_behaved(lab, port)
        metrics = service.metrics.render().decode()
    assert answer.status == status
    error = json.loads(answer.body)["error"]
    assert line in error and "\n" not in error
    (logged,) = ca_lines(caplog, "refused")
    assert f"status={status} refusal={label} reason=" in logged and line in logged
    assert f'mtlsmesh_ca_refused_total{{reason="{label}"}} 1.0' in metrics
    assert 'mtlsmesh_ca_issued_total{credential="token"} 1.0' in metrics


async def test_wrong_method_and_path(lab: CaLab) -> None:
    async with running_ca(lab.config()) as (_, port, _):
        assert (await raw_call(port, lab.roots, "GET", "/v1/sign")).status == 405
        assert (await raw_call(port, lab.roots, "POST", "/v1/bundle", body=b"{}")).status == 405
        missing = await raw_call(port, lab.roots, "GET", "/v1/secrets")
        assert missing.status == 404 and json.loads(missing.body) == {"error": "no such path /v1/secrets"}


async def test_an_expired_svid_or_one_of_another_ca_is_refused_at_tls(
    lab: CaLab, caplog: pytest.LogCaptureFixture
) -> None:
    # An SVID issued a day ago (the CA's start) for five minutes.
    expired = material_for(
        lab.authority,
        workload_id(TD, "default", "reviews"),
        now=lab.authority.roots[0].not_valid_before_utc + ca.BACKDATE,
        ttl=timedelta(minutes=5),
    )
    stranger = ca.create_ca(TrustDomain("other.example"), now=expired.chain[0].not_valid_before_utc)
    theirs = material_for(stranger, workload_id(TrustDomain("other.example"), "default", "reviews"))
    foreign = handshake.Material(theirs.chain, theirs.key, lab.roots)
    async with running_ca(lab.config()) as (_, port, _):
        for material, alert in ((expired, "certificate expired"), (foreign, "unknown ca")):
            with pytest.raises(caclient.CaError, match=alert) as caught:
                await renew(port, handshake.Material(material.chain, material.key, lab.roots))
            assert caught.value.status is None
            await well_behaved(lab, port)
    refused = ca_lines(caplog, "refused")
    assert len(refused) == 2
    assert all("status=- refusal=tls" in line for line in refused)


async def test_an_svid_of_another_trust_domain_in_the_bundle_is_forbidden(lab: CaLab) -> None:
    """Even when an operator put a foreign root into bundle.pem, its SVIDs renew nothing here."""
    stranger = ca.create_ca(TrustDomain("other.example"), now=lab.authority.roots[0].not_valid_before_utc)
    bundle = lab.ca_dir / "bundle.pem"
    bundle.write_bytes(bundle.read_bytes() + ca.pem.render_certificates(stranger.roots))
    theirs = material_for(stranger, workload_id(TrustDomain("other.example"), "default", "reviews"))
    async with running_ca(lab.config()) as (_, port, _):
        answer = await raw_call(
            port, lab.roots, "POST", "/v1/sign", body=_body(_csr()),
            material=handshake.Material(theirs.chain, theirs.key, lab.roots),
        )  # fmt: skip
        await well_behaved(lab, port)
    assert answer.status == 403
    assert "spiffe://other.example/ns/default/sa/reviews is not in trust domain cluster.local" in answer.body.decode()


async def test_garbage_on_the_port_costs_only_its_own_connection(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    async with running_ca(lab.config()) as (_, port, _):
        garbage = await connect(port)
        silent = await connect(port)  # says nothing at all: the handshake timeout ends it
        async with trio.open_nursery() as nursery:

            async def spew() -> None:
                await garbage.send_all(b"GET / HTTP/1.1\r\nHost: ca\r\n\r\n" + os.urandom(4096))

            nursery.start_soon(spew)
            await well_behaved(lab, port)  # at the same time
        with trio.fail_after(5):
            await outcome(garbage)
            await outcome(silent)
        await garbage.aclose()
        await silent.aclose()
        await well_behaved(lab, port)
    refused = ca_lines(caplog, "refused")
    assert any("refusal=tls" in line and "TLS handshake failed" in line for line in refused)
    assert any("refusal=timeout" in line and "no TLS handshake within 2 s" in line for line in refused)
    assert len(ca_lines(caplog, "issued")) == 2


def _pipelined(requests: list[tuple[str, str, list[tuple[str, str]], bytes]]) -> bytes:
    """The bytes of several requests sent back to back (h11 speaks one exchange at a time: one machine each)."""
    wire = b""
    for method, target, headers, body in requests:
        conn = h11.Connection(h11.CLIENT)
        head = [("host", "ca"), ("content-length", str(len(body))), *headers]
        wire += conn.send(h11.Request(method=method, target=target, headers=head)) or b""
        wire += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    return wire


def _answer_reader(data: bytes = b"") -> h11.Connection:
    """A client machine ready to read one answer (it must have sent a request first), fed `data`."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "ca")]))
    conn.send(h11.EndOfMessage())
    if data:  # (receive_data of b"" would mean the connection closed)
        conn.receive_data(data)
    return conn


async def test_a_flood_from_one_identity_is_rate_limited_and_the_others_are_served(
    lab: CaLab, caplog: pytest.LogCaptureFixture
) -> None:
    token = token_for(lab, "default", "flood")
    count = 100  # in one burst on one kept-alive connection: answered at well over a thousand a second
    wire = _pipelined([("POST", "/v1/sign", [("authorization", f"Bearer {token}")], _body(_csr()))] * count)
    statuses: list[int] = []
    retry_after: set[bytes] = set()
    async with running_ca(lab.config(rate_burst=10.0, rate_per_second=2.0)) as (_, port, _):
        stream = await caclient.open_ca(endpoint(port), lab.roots)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, wire)
            await well_behaved(lab, port)  # another identity, at the same time
            reader = _answer_reader()
            with trio.fail_after(30):
                while len(statuses) < count:
                    event = reader.next_event()
                    if event is h11.NEED_DATA:
                        reader.receive_data(bytes(await stream.receive_some(65536)))
                    elif isinstance(event, h11.Response):
                        statuses.append(event.status_code)
                        retry_after.update(v for k, v in event.headers if k == b"retry-after")
                    elif isinstance(event, h11.EndOfMessage):
                        reader = _answer_reader(bytes(reader.trailing_data[0]))
        await trio.aclose_forcefully(stream)
        await well_behaved(lab, port)
    assert 10 <= statuses.count(200) <= 13  # the burst, and what refilled meanwhile
    assert statuses.count(429) == count - statuses.count(200)
    assert retry_after == {b"1"}
    limited = [line for line in ca_lines(caplog, "refused") if "refusal=rate_limited" in line]
    assert len(limited) == statuses.count(429)
    assert f"spiffe_id={workload('default', 'flood')} status=429" in limited[0]


async def test_with_an_intermediate_the_chain_carries_it(tmp_path: Path) -> None:
    lab = CaLab.create(tmp_path / "i", intermediate=True)
    async with running_ca(lab.config()) as (_, port, _):
        answer, material = await enroll(port, lab.roots, token_for(lab))
        renewed, _ = await renew(port, material)
    for got in (answer, renewed):
        assert len(got.chain) == 2 and got.chain[1] == lab.authority.signer_cert
        verify_chain(got.chain, got.bundle)


async def test_a_token_wins_over_a_client_certificate(lab: CaLab) -> None:
    """A caller that sends both is judged by its token (a sidecar falling back presents no certificate anyway)."""
    async with running_ca(lab.config()) as (_, port, _):
        _, material = await enroll(port, lab.roots, token_for(lab, "default", "reviews"))
        answer = await raw_call(
            port, lab.roots, "POST", "/v1/sign", headers=_bearer(token_for(lab, "shop", "cart")), body=_body(_csr()),
            material=material,
        )  # fmt: skip
    assert answer.status == 200
    assert json.loads(answer.body)["spiffe_id"] == workload("shop", "cart")


async def test_head_requests_get_heads_on_both_ports_and_the_service_goes_on(
    lab: CaLab, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_ca(lab.config()) as (_, port, metrics_port):
        bundle = await raw_call(port, lab.roots, "HEAD", caproto.BUNDLE_PATH)
        assert bundle.status == 405 and bundle.body == b""  # the API takes GET there; the refusal comes bodiless
        stream = await trio.open_tcp_stream("127.0.0.1", metrics_port)
        try:
            with trio.fail_after(10):
                scrape = await http11.request(stream, "HEAD", "/metrics", host="ca")
        finally:
            await trio.aclose_forcefully(stream)
        assert scrape.status == 200 and scrape.body == b""
        await well_behaved(lab, port)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
