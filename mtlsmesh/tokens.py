"""What a Kubernetes service-account token must say for the CA to sign an SVID: the claims, without the signature.

What it does: `check_header` admits only asymmetric signature algorithms (RS*, PS*, ES*): never `none`, never HMAC,
whose "secret" would be the issuer's public key that anyone can read. `service_account_id` turns the claims of a
projected token into the SPIFFE ID it proves, `spiffe://<td>/ns/<namespace>/sa/<service account>`:

    {"iss": ..., "aud": [...], "exp": ..., "iat": ..., "nbf": ..., "sub": "system:serviceaccount:<ns>:<sa>",
     "kubernetes.io": {"namespace": "<ns>", "serviceaccount": {"name": "<sa>", "uid": ...}, "pod": {...}}}

`sub` must agree with the `kubernetes.io` claims, so a token cannot name one account in one place and another in
the other. Every refusal is a `TokenError` with one line a person can act on.

What it does not: verify signatures, read keys, or check `iss`/`aud`/`exp` (see `jwtverify`, which uses PyJWT for
that), and it never asks the Kubernetes API whether the pod still exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mtlsmesh.errors import IdentityError, MeshError
from mtlsmesh.identity import SpiffeId, TrustDomain, workload_id

# Asymmetric JWS algorithms only (RFC 7518 3.1). The Kubernetes API server signs with RS256 or ES256 by default.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
LEEWAY_SECONDS = 30  # clock skew allowed on exp, nbf and iat
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "sub")
SUBJECT_PREFIX = "system:serviceaccount:"
CLAIMS_KEY = "kubernetes.io"


class TokenError(MeshError):
    """A token the CA refuses; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a token must carry: who issued it and for whom it was minted."""

    issuer: str
    audience: str
    leeway: float = LEEWAY_SECONDS


def check_header(header: Mapping[str, object]) -> str:
    """The token's signature algorithm, when it is one the CA accepts."""
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenError("the token header names no algorithm")
    if alg.lower() == "none":
        raise TokenError("the token is not signed (alg none); the CA accepts only signed tokens")
    if alg.upper().startswith("HS"):
        raise TokenError(f"the token is signed with {alg} (HMAC); the CA accepts only {', '.join(ALGORITHMS)}")
    if alg not in ALGORITHMS:
        raise TokenError(f"the token's algorithm {alg!r} is not one of {', '.join(ALGORITHMS)}")
    return alg


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise TokenError(f"the token's {what} claim is missing or not a string")
    return value


def service_account_id(claims: Mapping[str, object], trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID a verified projected service-account token proves."""
    info = claims.get(CLAIMS_KEY)
    if not isinstance(info, Mapping):
        raise TokenError(f"the token has no {CLAIMS_KEY!r} claims: not a projected service-account token")
    namespace = _text(info.get("namespace"), f"{CLAIMS_KEY}.namespace")
    account = info.get("serviceaccount")
    if not isinstance(account, Mapping):
        raise TokenError(f"the token has no {CLAIMS_KEY}.serviceaccount claim")
    name = _text(account.get("name"), f"{CLAIMS_KEY}.serviceaccount.name")
    subject = _text(claims.get("sub"), "sub")
    expected = f"{SUBJECT_PREFIX}{namespace}:{name}"
    if subject != expected:
        raise TokenError(f"the token's sub {subject!r} does not match its {CLAIMS_KEY} claims ({expected!r})")
    try:
        return workload_id(trust_domain, namespace, name)
    except IdentityError as exc:
        raise TokenError(f"the token names no valid SPIFFE ID: {exc}") from None
