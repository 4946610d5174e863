"""The CA service's wire format: round trips, and every malformed message refused with a clear line."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import ca, caproto, pem
from mtlsmesh.caproto import ProtocolError, Refusal
from mtlsmesh.identity import TrustDomain, workload_id
from tests.pki import TD

NOW = datetime.now(UTC)


def make_csr(
    key: ec.EllipticCurvePrivateKey | None = None, *, is_ca: bool | None = None, names: tuple[str, ...] = ()
) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(n) for n in names]), critical=False
        )
    if is_ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def broken_signature(csr: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature: the request still parses, its signature no longer verifies
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


@pytest.fixture(scope="module")
def authority() -> ca.Authority:
    return ca.create_ca(TD, now=NOW - timedelta(hours=1), intermediate=True)


def test_the_ca_identity_follows_the_mesh_convention() -> None:
    assert str(caproto.ca_workload_id(TD)) == "spiffe://cluster.local/ns/mtlsmesh-system/sa/mtlsmesh-ca"
    assert caproto.CA_SERVICE_DNS == "mtlsmesh-ca.mtlsmesh-system.svc"


@pytest.mark.parametrize("ttl", [None, 3600])
def test_sign_request_round_trip(ttl: int | None) -> None:
    request = caproto.SignRequest(make_csr(), ttl)
    assert caproto.parse_sign_request(request.encode()) == request


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        (b"not json", 400, "not JSON"),
        (b"[1, 2]", 400, "not a JSON object"),
        (b"{}", 400, "'csr' must be a PEM certificate request"),
        (b'{"csr": 5}', 400, "'csr' must be"),
        (b'{"csr": "x", "name": "admin"}', 400, "unknown field 'name'"),
        (b'{"csr": "x", "ttl_seconds": "1h"}', 400, "ttl_seconds must be"),
        (b'{"csr": "x", "ttl_seconds": 0}', 400, "ttl_seconds must be"),
        (b'{"csr": "x", "ttl_seconds": true}', 400, "ttl_seconds must be"),
        (json.dumps({"csr": "A" * (caproto.MAX_CSR + 1)}).encode(), 413, "larger than 8192 bytes"),
    ],
)
def test_sign_request_refusals(body: bytes, status: int, match: str) -> None:
    with pytest.raises(Refusal, match=match) as caught:
        caproto.parse_sign_request(body)
    assert caught.value.status == status


def test_a_csr_gives_its_key_and_nothing_else() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, names=("spiffe://cluster.local/ns/kube-system/sa/admin",), is_ca=False)
    got = caproto.csr_public_key(csr)
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert got.public_bytes(*der) == key.public_key().public_bytes(*der)


@pytest.mark.parametrize(
    ("csr", "reason", "match"),
    [
        ("garbage", "bad_csr", "not a PEM certificate request"),
        (broken_signature(make_csr()), "bad_csr", "signature does not verify"),
        (make_csr(is_ca=True), "ca_csr", "asks for a CA certificate"),
        (make_csr(ec.generate_private_key(ec.SECP521R1())), "bad_csr", "unsupported public key ecdsa-p521"),
    ],
    ids=["garbage", "bad-signature", "ca-true", "p521"],
)
def test_csr_refusals(csr: str, reason: str, match: str) -> None:
    with pytest.raises(Refusal, match=match) as caught:
        caproto.csr_public_key(csr)
    assert (caught.value.status, caught.value.reason) == (400, reason)


def test_sign_response_round_trip(authority: ca.Authority) -> None:
    issued = ca.issue_svid(authority, workload_id(TD, "default", "reviews"), now=NOW)
    response = caproto.SignResponse(
        workload_id(TD, "default", "reviews"),
        issued.cert.serial_number,
        issued.cert.not_valid_after_utc,
        (issued.cert, *issued.chain),
        issued.roots,
    )
    body = response.encode()
    assert json.loads(body)["not_after"].endswith("Z")
    assert caproto.parse_sign_response(body) == response


def _response_body(authority: ca.Authority, **changes: object) -> bytes:
    issued = ca.issue_svid(authority, workload_id(TD, "default", "reviews"), now=NOW)
    data = json.loads(
        caproto.SignResponse(
            workload_id(TD, "default", "reviews"),
            issued.cert.serial_number,
            issued.cert.not_valid_after_utc,
            (issued.cert, *issued.chain),
            issued.roots,
        ).encode()
    )
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"serial": None}, "has no 'serial'"),
        ({"spiffe_id": "spiffe://cluster.local"}, "needs a path"),
        ({"serial": "xyz"}, "not hexadecimal"),
        ({"serial": "1"}, "differ from the leaf"),
        ({"not_after": "tomorrow"}, "not an RFC 3339 time"),
        ({"not_after": "2030-01-01T00:00:00"}, "no time zone"),
        ({"chain": []}, "non-empty list of PEM strings"),
        ({"chain": ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]}, "corrupt PEM"),
        ({"bundle": "root"}, "non-empty list"),
    ],
)
def test_sign_response_errors(authority: ca.Authority, changes: dict[str, object], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        caproto.parse_sign_response(_response_body(authority, **changes))


def test_a_chain_entry_holds_one_certificate(authority: ca.Authority) -> None:
    two = pem.render_certificates(authority.roots * 2).decode()
    with pytest.raises(ProtocolError, match="exactly one certificate, not 2"):
        caproto.parse_sign_response(_response_body(authority, bundle=[two]))


@pytest.mark.parametrize("key_type", list(ca.KeyType), ids=lambda k: k.value)
def test_bundle_round_trip_with_every_key_type(key_type: ca.KeyType) -> None:
    roots = tuple(ca.create_ca(TrustDomain("cluster.local"), now=NOW, key_type=key_type).roots[0] for _ in range(2))
    bundle = caproto.TrustBundle(roots, 7, 300)
    data = json.loads(bundle.encode())
    assert data["spiffe_sequence"] == 7 and data["spiffe_refresh_hint"] == 300
    assert all(key["use"] == "x509-svid" and len(key["x5c"]) == 1 for key in data["keys"])
    assert caproto.parse_bundle(bundle.encode()) == bundle


def test_bundle_skips_keys_of_other_uses(authority: ca.Authority) -> None:
    data = json.loads(caproto.TrustBundle(authority.roots, 1, 60).encode())
    data["keys"].append({"use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "k"})
    assert caproto.parse_bundle(json.dumps(data).encode()).roots == authority.roots


def _bundle_with(authority: ca.Authority, change: object) -> bytes:
    data = json.loads(caproto.TrustBundle(authority.roots, 1, 60).encode())
    if callable(change):
        change(data)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("keys"), "no 'keys' list"),
        (lambda d: d["keys"].clear(), "holds no x509-svid root"),
        (lambda d: d["keys"][0].__setitem__("x5c", []), "exactly one certificate in x5c"),
        (lambda d: d["keys"][0].__setitem__("x5c", ["***"]), "not a base64 DER certificate"),
        (lambda d: d["keys"][0].__setitem__("x", "AAAA"), "do not match the certificate"),
        (lambda d: d["keys"].__setitem__(0, "root"), "is not a JSON object"),
        (lambda d: d.__setitem__("spiffe_sequence", -1), "spiffe_sequence must be"),
        (lambda d: d.__setitem__("spiffe_refresh_hint", "5m"), "spiffe_refresh_hint must be"),
    ],
)
def test_bundle_errors(authority: ca.Authority, change: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        caproto.parse_bundle(_bundle_with(authority, change))


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc.def.ghi", "abc.def.ghi"), ("bearer  abc ", "abc")],
)
def test_bearer_token(header: str, token: str) -> None:
    assert caproto.bearer_token(header) == token


@pytest.mark.parametrize("header", ["Basic dXNlcg==", "Bearer", "Bearer a b", ""])
def test_bearer_token_refusals(header: str) -> None:
    with pytest.raises(Refusal, match="must be 'Bearer <token>'") as caught:
        caproto.bearer_token(header)
    assert caught.value.status == 401


def test_errors_are_one_line_both_ways() -> None:
    body = caproto.encode_error("the token\nexpired")
    assert json.loads(body) == {"error": "the token expired"}
    assert caproto.parse_error(body) == "the token expired"
    assert caproto.parse_error(b"<html>\n  oops\n</html>") == "<html> oops </html>"
    assert Refusal(401, "bad_token", "two\nlines").message == "two lines"


def test_times_are_rfc3339_utc() -> None:
    moment = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)
    assert caproto.format_time(moment) == "2026-12-07T10:00:00Z"
    assert caproto.parse_time("2026-12-07T10:00:00Z", "t") == moment
