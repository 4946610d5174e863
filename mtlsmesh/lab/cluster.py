"""What a Kubernetes cluster gives identity-mode sidecars, played by the lab: a service-account token issuer.

`TokenIssuer` holds an EC P-256 key made when the lab starts (in memory only, never written), publishes its public
half as a JWKS file for `mtlsmesh ca serve --token-jwks`, and signs projected-service-account-like tokens: the
`kubernetes.io` claims with the pod's namespace and service account, audience `mtlsmesh-ca`, valid one hour, as
the kubelet projects them into a pod.

What this module does not do: write tokens to pods or run the CA service (`pods` does both), verify tokens (the CA
does, through `mtlsmesh.jwtverify`), or rotate its own key.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

# What a cluster's API server puts in `iss`, and the audience the CA service accepts by default.
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "mtlsmesh-ca"
TOKEN_LIFETIME = 3600  # seconds: the kubelet's default expirationSeconds for a projected token
KEY_ID = "lab-sa-1"


class TokenIssuer:
    """One signing key, its JWKS, and the tokens it signs; see the module docstring."""

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self._key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        jwk = ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": KEY_ID, "use": "sig", "alg": "ES256"}]}

    def write_jwks(self, path: Path) -> Path:
        # Public data: the CA reads it, nobody needs it secret.
        path.write_text(json.dumps(self.jwks()))
        path.chmod(0o644)
        return path

    def token(
        self,
        namespace: str,
        service_account: str,
        pod: str,
        *,
        lifetime: int = TOKEN_LIFETIME,
        audience: str | None = None,
    ) -> str:
        """A token for `pod` running as `namespace`/`service_account`, as a projected volume holds it; for
        `audience` (default: the CA's)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": [audience or self.audience],
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
                "pod": {"name": pod, "uid": str(uuid.uuid4())},
            },
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": KEY_ID})
