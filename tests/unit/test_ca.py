"""The built-in CA: the certificate profile of root, intermediate and leaf, and the SVID leaf rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mtlsmesh import ca, svid
from mtlsmesh.errors import CertificateError, IdentityError
from mtlsmesh.identity import parse_trust_domain, workload_id

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TD = parse_trust_domain("cluster.local")


@pytest.mark.parametrize("intermediate", [False, True])
def test_issued_leaf_passes_the_svid_rules(intermediate: bool) -> None:
    authority = ca.create_ca(TD, now=NOW, intermediate=intermediate)
    spiffe_id = workload_id(TD, "default", "web")
    issued = ca.issue_svid(authority, spiffe_id, now=NOW)
    assert svid.leaf_spiffe_id(issued.cert) == spiffe_id
    assert issued.cert.not_valid_after_utc == NOW + timedelta(hours=24)
    assert issued.chain == authority.chain
    assert issued.roots == authority.roots


def test_ttl_beyond_the_signer_is_refused_saying_until_when() -> None:
    authority = ca.create_ca(TD, now=NOW, ttl=timedelta(days=2))
    with pytest.raises(CertificateError, match=r"could go until 2026-01-04 03:04:05 UTC \(a TTL of at most 2d\)"):
        ca.issue_svid(authority, workload_id(TD, "default", "web"), now=NOW, ttl=timedelta(days=3))


def test_root_path_id_is_never_issued() -> None:
    authority = ca.create_ca(TD, now=NOW)
    with pytest.raises(IdentityError, match=r"a leaf SVID needs a path"):
        ca.issue_svid(authority, TD.id, now=NOW)
