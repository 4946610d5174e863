"""Certificates for one benchmark run, issued by the mtlsmesh CA into a fresh temporary directory.

Both pairs use the same material: an ECDSA P-256 root and two X.509-SVIDs (client and server), each written as
cert.pem (leaf), key.pem (0600) and bundle.pem (the root). Nothing here is ever written into the repository; the
runner deletes the directory when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mtlsmesh import ca
from mtlsmesh.identity import parse_spiffe_id, parse_trust_domain

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/server"


@dataclass(frozen=True, slots=True)
class SvidFiles:
    spiffe_id: str
    cert: Path
    key: Path
    bundle: Path


@dataclass(frozen=True, slots=True)
class BenchCerts:
    client: SvidFiles
    server: SvidFiles


def issue_bench_certs(directory: Path) -> BenchCerts:
    now = datetime.now(UTC)
    authority = ca.create_ca(parse_trust_domain(TRUST_DOMAIN), now=now, key_type=ca.KeyType.ECDSA_P256)
    issued: dict[str, SvidFiles] = {}
    for role, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
        svid = ca.issue_svid(
            authority, parse_spiffe_id(spiffe_id), now=now, ttl=timedelta(hours=4), key_type=ca.KeyType.ECDSA_P256
        )
        target = directory / role
        target.mkdir(mode=0o700, parents=True)
        svid.write_to_dir(target)
        issued[role] = SvidFiles(spiffe_id, target / "cert.pem", target / "key.pem", target / "bundle.pem")
    return BenchCerts(client=issued["client"], server=issued["server"])
