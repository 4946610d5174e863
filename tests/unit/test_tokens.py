"""Service-account token verification: good RS*/PS*/ES* tokens from a test issuer, and every token the CA refuses.

The issuer's keys are made here; tokens are signed for real (tests/jwt_issuer.py), and checked by the CA's own
verifier (`jwtverify`, with the claim rules of `tokens`) against the issuer's JWKS.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mtlsmesh import jwtverify, kubeapi, tokens
from mtlsmesh.errors import ConfigError
from mtlsmesh.tokens import TokenError, TokenPolicy
from tests.jwt_issuer import AUDIENCE, ISSUER, Issuer, hmac_token_with_public_key, unsigned_token
from tests.pki import TD

POLICY = TokenPolicy(ISSUER, AUDIENCE)


@pytest.fixture(scope="module")
def rsa_issuer() -> Issuer:
    return Issuer("rsa")


@pytest.fixture(scope="module")
def ec_issuer() -> Issuer:
    return Issuer("p256", kid="ec-1")


def keys_of(*issuers: Issuer) -> tuple[jwtverify.IssuerKey, ...]:
    document = {"keys": [issuer.jwk() for issuer in issuers]}
    return jwtverify.parse_jwks(json.dumps(document).encode(), "jwks.json")


def verify(token: str, *issuers: Issuer, policy: TokenPolicy = POLICY) -> str:
    return str(jwtverify.verify_token(token, policy, keys_of(*issuers), TD))


REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"


@pytest.mark.parametrize(
    ("kind", "alg"),
    [
        ("rsa", "RS256"),
        ("rsa", "RS384"),
        ("rsa", "RS512"),
        ("rsa", "PS256"),
        ("rsa", "PS512"),
        ("p256", "ES256"),
        ("p384", "ES384"),
        ("p521", "ES512"),
    ],
)
def test_good_tokens_prove_their_service_account(kind: str, alg: str) -> None:
    issuer = Issuer(kind)
    assert verify(issuer.token("default", "reviews", alg=alg), issuer) == REVIEWS


def test_the_key_is_found_by_kid_among_several(rsa_issuer: Issuer, ec_issuer: Issuer) -> None:
    assert verify(ec_issuer.token("shop", "cart"), rsa_issuer, ec_issuer) == "spiffe://cluster.local/ns/shop/sa/cart"
    assert verify(rsa_issuer.token(), ec_issuer, rsa_issuer) == REVIEWS


def test_a_token_without_kid_is_tried_against_every_key_of_its_type(rsa_issuer: Issuer) -> None:
    other = Issuer("rsa", kid="key-2")
    assert verify(rsa_issuer.token(kid=None), other, rsa_issuer) == REVIEWS


def test_the_leeway_covers_a_little_clock_skew(rsa_issuer: Issuer) -> None:
    now = int(time.time())
    assert verify(rsa_issuer.token(exp=now - 10), rsa_issuer) == REVIEWS
    assert verify(rsa_issuer.token(nbf=now + 10, iat=now + 10), rsa_issuer) == REVIEWS


def test_an_audience_list_must_include_ours(rsa_issuer: Issuer) -> None:
    assert verify(rsa_issuer.token(aud=["api", AUDIENCE]), rsa_issuer) == REVIEWS
    assert verify(rsa_issuer.token(aud=AUDIENCE), rsa_issuer) == REVIEWS


def now() -> int:
    """The time when a case's token is made: the table is built at import, long before some cases run."""
    return int(time.time())


BAD = [
    ("expired", lambda i: i.token(exp=now() - 120), "the token expired at 20"),
    ("not-yet-valid", lambda i: i.token(nbf=now() + 300), "not valid yet"),
    ("issued-in-the-future", lambda i: i.token(iat=now() + 300), "not valid yet"),
    ("wrong-issuer", lambda i: i.token(iss="https://evil.example"), "issuer is not 'https://kubernetes"),
    ("wrong-audience", lambda i: i.token(aud=["kubernetes"]), "audience is not 'mtlsmesh-ca'"),
    ("no-audience", lambda i: i.token(aud=None), "no 'aud' claim"),
    ("no-exp", lambda i: i.token(exp=None), "no 'exp' claim"),
    ("no-iat", lambda i: i.token(iat=None), "no 'iat' claim"),
    ("alg-none", lambda i: unsigned_token(), r"not signed \(alg none\)"),
    ("hs256-with-the-public-key", hmac_token_with_public_key, r"signed with HS256 \(HMAC\)"),
    ("forged", lambda i: Issuer("rsa", kid=i.kid).token(), "signature does not verify with the issuer's keys"),
    ("unknown-kid", lambda i: i.token(kid="rotated-away"), "no key with kid 'rotated-away'"),
    ("garbage", lambda i: "not.a.jwt", "not a well-formed JWT"),
    ("empty", lambda i: "", "not a well-formed JWT"),
    ("tampered-claims", lambda i: _swap_payload(i.token(), i.token("kube-system", "admin")), "does not verify"),
    ("sub-mismatch", lambda i: i.token(sub="system:serviceaccount:kube-system:admin"), "does not match its"),
    ("no-kubernetes-claims", lambda i: i.token(**{"kubernetes.io": None}), "not a projected service-account"),
    ("no-serviceaccount", lambda i: i.token(**{"kubernetes.io": {"namespace": "default"}}), "serviceaccount claim"),
    (
        "slash-in-namespace",
        lambda i: i.token("a/b", "x", sub="system:serviceaccount:a/b:x"),
        "names no valid SPIFFE ID",
    ),
]


def _swap_payload(token: str, other: str) -> str:
    header, _, signature = token.split(".")
    return ".".join((header, other.split(".")[1], signature))


@pytest.mark.parametrize(("case", "make", "match"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_tokens_are_refused(rsa_issuer: Issuer, case: str, make: object, match: str) -> None:
    assert callable(make)
    with pytest.raises(TokenError, match=match):
        verify(make(rsa_issuer), rsa_issuer)


def test_an_es256_token_needs_a_p256_key() -> None:
    p384 = Issuer("p384", kid="k")
    forged = Issuer("p256", kid="k").token()
    with pytest.raises(TokenError, match="no key that verifies ES256"):
        verify(forged, p384)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({}, "names no algorithm"),
        ({"alg": "None"}, "alg none"),
        ({"alg": "HS512"}, "HMAC"),
        ({"alg": "EdDSA"}, "'EdDSA' is not one of RS256"),
    ],
)
def test_check_header(header: dict[str, object], match: str) -> None:
    with pytest.raises(TokenError, match=match):
        tokens.check_header(header)


def test_jwks_never_keeps_an_hmac_key(rsa_issuer: Issuer) -> None:
    oct_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}
    keys = jwtverify.parse_jwks(json.dumps(rsa_issuer.jwks(oct_key)).encode(), "jwks.json")
    assert [key.kid for key in keys] == [rsa_issuer.kid]
    with pytest.raises(ConfigError, match=r"jwks\.json: the JWKS holds no usable RSA or EC signing key"):
        jwtverify.parse_jwks(json.dumps({"keys": [oct_key]}).encode(), "jwks.json")


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"{", "is not JSON"), (b"[]", "no 'keys' list"), (b'{"keys": [{"kty": "EC"}]}', "no usable")],
)
def test_jwks_errors(data: bytes, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        jwtverify.parse_jwks(data, "jwks.json")


def test_a_jwks_source_is_a_file_or_an_https_url_never_plain_http() -> None:
    with pytest.raises(ConfigError, match=r"--token-jwks: 'http://10.96.0.1/openid/v1/jwks': plain http is refused"):
        jwtverify.check_jwks_source("http://10.96.0.1/openid/v1/jwks")
    with pytest.raises(ConfigError, match=r"--token-jwks: .*no user name or fragment"):
        jwtverify.check_jwks_source("https://a:b@host/")
    url = jwtverify.check_jwks_source("https://kubernetes.default.svc/openid/v1/jwks")
    assert url == kubeapi.HttpsUrl("kubernetes.default.svc", 443, "/openid/v1/jwks")
    assert str(jwtverify.check_jwks_source("HTTPS://[fd00::1]:6443/keys?x=1")) == "https://[fd00::1]:6443/keys?x=1"
    assert jwtverify.check_jwks_source("/etc/jwks.json") == "/etc/jwks.json"


def test_the_jwks_file_is_reloaded_when_it_changes_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    first, second = Issuer("rsa", kid="one"), Issuer("p256", kid="two")
    path = first.write_jwks(tmp_path / "jwks.json")
    keys = jwtverify.KeyFile(str(path))
    assert keys.check_once() is False
    token = second.token()
    with pytest.raises(TokenError, match="no key with kid 'two'"):
        jwtverify.verify_token(token, POLICY, keys.current.keys, TD)

    second.write_jwks(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert keys.check_once() is True
    assert str(jwtverify.verify_token(token, POLICY, keys.current.keys, TD)) == REVIEWS

    path.write_text("{ broken")
    assert keys.check_once() is False
    assert keys.reload_failures == 1
    assert str(jwtverify.verify_token(token, POLICY, keys.current.keys, TD)) == REVIEWS  # the old keys still serve
    assert keys.check_once() is False and keys.reload_failures == 1  # refused once, not on every poll
