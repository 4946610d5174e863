"""A test token issuer: a key made in the test, its JWKS, and Kubernetes-shaped service-account tokens it signs.

Tokens are signed for real with PyJWT (or, for the forms PyJWT refuses to make, by hand: `alg: none`, and HS256
keyed with the issuer's public key), so the CA's verifier sees exactly what an attacker could send.

What this module does not do: verify anything (the tests do, through `mtlsmesh.jwtverify`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "mtlsmesh-ca"

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """A token issuer with one key (`rsa` or an EC curve), its kid, and its JWKS."""

    def __init__(self, kind: str = "rsa", kid: str = "key-1") -> None:
        self.kid = kid
        self.key: SigningKey
        if kind == "rsa":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}[kind]
            self.key = ec.generate_private_key(curve)

    def jwk(self) -> dict[str, Any]:
        public = self.key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        assert isinstance(data, dict)
        return {**data, "kid": self.kid, "use": "sig"}

    def jwks(self, *extra: dict[str, Any]) -> dict[str, Any]:
        return {"keys": [self.jwk(), *extra]}

    def write_jwks(self, path: Path, *extra: dict[str, Any]) -> Path:
        path.write_text(json.dumps(self.jwks(*extra)))
        return path

    @property
    def default_alg(self) -> str:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return "RS256"
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[self.key.curve.name]

    def token(
        self,
        namespace: str = "default",
        service_account: str = "reviews",
        *,
        alg: str | None = None,
        kid: str | bool | None = True,
        **changes: Any,
    ) -> str:
        """A projected service-account token; `changes` replace claims (None removes one)."""
        headers: dict[str, Any] = {}
        if kid is True:
            headers["kid"] = self.kid
        elif isinstance(kid, str):
            headers["kid"] = kid
        return jwt.encode(claims(namespace, service_account, **changes), self.key, algorithm=alg or self.default_alg,
                          headers=headers)  # fmt: skip

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def claims(namespace: str = "default", service_account: str = "reviews", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": "4b1e0a2c-0000-4000-8000-000000000001"},
            "pod": {"name": f"{service_account}-7d4b9c-x2x9q", "uid": "4b1e0a2c-0000-4000-8000-000000000002"},
        },
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


def unsigned_token(**changes: Any) -> str:
    """`alg: none`: a header, claims, and an empty signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims(**changes)).encode())}."


def hmac_token_with_public_key(issuer: Issuer, **changes: Any) -> str:
    """The classic key-confusion attack: HS256 with the issuer's public key (which anyone has) as the secret."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": issuer.kid}).encode())
    payload = _b64(json.dumps(claims(**changes)).encode())
    signature = hmac.new(issuer.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"
