"""A CA service in the test's own trio loop: a CA directory and a token issuer in tmp_path, and ways to call it.

The service is the real `caserver.CaService` on 127.0.0.1:0 with real TLS; tokens are really signed by a test
issuer whose JWKS file the service reads. Keys live in tmp_path only.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import ca, caclient, caproto, caserver, handshake, http11
from mtlsmesh.config import ListenAddr
from mtlsmesh.identity import TrustDomain, workload_id
from mtlsmesh.tokens import TokenPolicy
from tests.jwt_issuer import AUDIENCE, ISSUER, Issuer
from tests.pki import TD

LOOPBACK = "127.0.0.1"


def make_ca_dir(directory: Path, trust_domain: TrustDomain = TD, *, intermediate: bool = False) -> ca.Authority:
    authority = ca.create_ca(trust_domain, now=datetime.now(UTC) - timedelta(days=1), intermediate=intermediate)
    ca.save_authority(authority, directory)
    return authority


def make_csr(key: ec.EllipticCurvePrivateKey, *uris: str) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@dataclasses.dataclass
class CaLab:
    """One CA directory, one token issuer with its JWKS file, and the service's config for them."""

    root: Path
    authority: ca.Authority
    issuer: Issuer
    ca_dir: Path
    jwks: Path

    @classmethod
    def create(cls, root: Path, *, intermediate: bool = False) -> CaLab:
        ca_dir = root / "ca"
        authority = make_ca_dir(ca_dir, intermediate=intermediate)
        issuer = Issuer("rsa")
        return cls(root, authority, issuer, ca_dir, issuer.write_jwks(root / "jwks.json"))

    def config(self, **changes: object) -> caserver.ServeConfig:
        cfg = caserver.ServeConfig(
            directory=str(self.ca_dir),
            listen=(ListenAddr(LOOPBACK, 0),),
            policy=TokenPolicy(ISSUER, AUDIENCE),
            jwks=str(self.jwks),
            ttl=timedelta(hours=1),
            metrics_listen=ListenAddr(LOOPBACK, 0),
            reload_interval=0.1,
            refresh_hint=1,
            limits=http11.Limits(max_head=8192, max_body=caproto.MAX_BODY, read_timeout=2.0, max_requests=100),
            handshake_timeout=2.0,
        )
        return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self.authority.roots


def endpoint(port: int, trust_domain: TrustDomain = TD) -> caclient.CaEndpoint:
    return caclient.CaEndpoint(LOOPBACK, port, caproto.ca_workload_id(trust_domain))


@asynccontextmanager
async def running_ca(cfg: caserver.ServeConfig) -> AsyncIterator[tuple[caserver.CaService, int, int]]:
    """The service, its CA port and its metrics port, served until the block ends."""
    service = caserver.CaService(cfg)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(service.serve)
        metrics = state.bound["metrics"][1] if "metrics" in state.bound else 0
        yield service, state.bound["ca"][1], metrics
        nursery.cancel_scope.cancel()


async def enroll(
    port: int, roots: tuple[x509.Certificate, ...], token: str, *, key: ec.EllipticCurvePrivateKey | None = None,
    ttl: int | None = None,
) -> tuple[caproto.SignResponse, handshake.Material]:  # fmt: skip
    """An SVID for `token`'s service account, and the material to present it with."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    with trio.fail_after(10):
        answer = await caclient.sign(endpoint(port), roots, caproto.SignRequest(make_csr(key), ttl), token=token)
    return answer, handshake.Material(answer.chain, key, answer.bundle)


async def renew(
    port: int, material: handshake.Material, *, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[caproto.SignResponse, handshake.Material]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    with trio.fail_after(10):
        answer = await caclient.sign(
            endpoint(port), material.roots, caproto.SignRequest(make_csr(key)), material=material
        )
    return answer, handshake.Material(answer.chain, key, answer.bundle)


async def raw_call(
    port: int,
    roots: tuple[x509.Certificate, ...],
    method: str,
    path: str,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    material: handshake.Material | None = None,
) -> http11.Answer:
    """One request exactly as given, over a checked TLS connection to the CA."""
    with trio.fail_after(10):
        stream = await caclient.open_ca(endpoint(port), roots, material)
        try:
            return await http11.request(stream, method, path, host="ca", headers=headers, body=body)
        finally:
            await trio.aclose_forcefully(stream)


def token_for(lab: CaLab, namespace: str = "default", service_account: str = "reviews") -> str:
    return lab.issuer.token(namespace, service_account)


def workload(namespace: str = "default", service_account: str = "reviews") -> str:
    return str(workload_id(TD, namespace, service_account))


async def eventually(check: Callable[[], object], timeout: float = 15.0) -> None:
    """Poll `check` (plain or async) until it gives something true, within `timeout` seconds."""
    with trio.fail_after(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(0.05)
