"""SPIFFE ID grammar: every rule of docs/svid-profile.md §1 (ID-1 ... ID-13), each with accept and reject cases."""

from __future__ import annotations

import pytest

from mtlsmesh.errors import IdentityError
from mtlsmesh.identity import (
    MAX_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    SpiffeId,
    TrustDomain,
    parse_spiffe_id,
    parse_trust_domain,
    parse_workload_id,
    workload_id,
)

LONG_TD = "a" * MAX_TRUST_DOMAIN_BYTES
# An ID of exactly 2048 bytes: "spiffe://td/" is 12 bytes, then one long path segment.
ID_2048 = "spiffe://td/" + "p" * (MAX_ID_BYTES - len("spiffe://td/"))


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        # ID-1: the scheme is matched case-insensitively and always emitted lowercase
        ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
        ("SPIFFE://example.org/a", "example.org", "/a"),
        ("Spiffe://example.org/a", "example.org", "/a"),
        # ID-2: any non-empty trust domain; a root ID has no path
        ("spiffe://td", "td", ""),
        # ID-4: lowercase letters, digits, '.', '-', '_'
        ("spiffe://my_td-1.example.org/a", "my_td-1.example.org", "/a"),
        # ID-5: an IP-looking trust domain is just a name, the same path as a DNS-looking one
        ("spiffe://10.0.0.1/a", "10.0.0.1", "/a"),
        ("spiffe://example.org/a", "example.org", "/a"),
        # ID-7 / ID-8: '.' inside a segment is fine, only a whole '.' or '..' segment is not
        ("spiffe://td/a.b/..c/.d.", "td", "/a.b/..c/.d."),
        # ID-10: segment characters, and the path is case-sensitive (ID-1)
        ("spiffe://td/A-Z_a-z.0-9", "td", "/A-Z_a-z.0-9"),
        ("spiffe://td/Web", "td", "/Web"),
        # ID-11: 2048 bytes is accepted
        (ID_2048, "td", ID_2048[len("spiffe://td") :]),
        # ID-12: a 255-byte trust domain is accepted
        (f"spiffe://{LONG_TD}/a", LONG_TD, "/a"),
    ],
)
def test_valid_ids_parse(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = parse_spiffe_id(text)
    assert spiffe_id == SpiffeId(trust_domain, path)
    assert str(spiffe_id) == f"spiffe://{trust_domain}{path}"  # ID-1: emitted lowercase `spiffe://`
    assert spiffe_id.is_root is (path == "")


def test_path_is_case_sensitive() -> None:
    assert parse_spiffe_id("spiffe://td/Web") != parse_spiffe_id("spiffe://td/web")


@pytest.mark.parametrize(
    ("text", "rule", "message"),
    [
        ("http://td/a", "ID-1", "the scheme must be 'spiffe://'"),
        ("spiffe:/x", "ID-1", "the scheme must be 'spiffe://'"),
        ("spiffe:td/a", "ID-1", "the scheme must be 'spiffe://'"),
        ("td/a", "ID-1", "the scheme must be 'spiffe://'"),
        ("", "ID-1", "the scheme must be 'spiffe://'"),
        ("spiffe:///a", "ID-2", "the trust domain is empty"),
        ("spiffe://", "ID-2", "the trust domain is empty"),
        ("spiffe://u@td/a", "ID-3", "userinfo is not allowed"),
        ("spiffe://td:443/a", "ID-3", "a port or ':' is not allowed"),
        ("spiffe://td:/a", "ID-3", "a port or ':' is not allowed"),
        ("spiffe://[::1]/a", "ID-3", "a port or ':' is not allowed"),  # IPv6 literals are excluded
        ("spiffe://Td/a", "ID-4", "must be lowercase"),
        ("spiffe://TD", "ID-4", "must be lowercase"),
        ("spiffe://t%64/a", "ID-4", "percent-encoding is not allowed in the trust domain"),
        ("spiffe://td!/a", "ID-4", "only the characters a-z 0-9"),
        ("spiffe://t d/a", "ID-4", "only the characters a-z 0-9"),
        ("spiffe://tä/a", "ID-4", "only the characters a-z 0-9"),
        ("spiffe://td/a?q=1", "ID-6", "a query is not allowed"),
        ("spiffe://td?q=1", "ID-6", "a query is not allowed"),
        ("spiffe://td/a#f", "ID-6", "a fragment is not allowed"),
        ("spiffe://td#f", "ID-6", "a fragment is not allowed"),
        ("spiffe://td/we%20b", "ID-7", "percent-encoding is not allowed in the path"),
        ("spiffe://td/a//b", "ID-8", "empty segment"),
        ("spiffe://td//a", "ID-8", "empty segment"),
        ("spiffe://td/./a", "ID-8", "a '.' segment"),
        ("spiffe://td/a/../b", "ID-8", "a '..' segment"),
        ("spiffe://td/a/..", "ID-8", "a '..' segment"),
        ("spiffe://td/a/", "ID-9", "must not end with '/'"),
        ("spiffe://td/", "ID-9", "must not end with '/'"),
        ("spiffe://td/a b", "ID-10", "path segment 'a b'"),
        ("spiffe://td/ä", "ID-10", "path segment 'ä'"),
        ("spiffe://td/a:b", "ID-10", "path segment 'a:b'"),
        ("spiffe://td/a@b", "ID-10", "path segment 'a@b'"),
        ("spiffe://td/a\n", "ID-10", "path segment 'a\\\\n'"),
        (ID_2048 + "p", "ID-11", "longer than 2048 bytes"),
        ("spiffe://td/" + "ä" * 1100, "ID-11", "longer than 2048 bytes"),  # bytes, not characters
        (f"spiffe://{LONG_TD}a/a", "ID-12", "longer than 255 bytes"),
    ],
)
def test_invalid_ids_name_the_rule(text: str, rule: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message) as exc:
        parse_spiffe_id(text)
    assert exc.value.rule == rule
    assert str(exc.value).endswith(f"({rule})")


def test_the_same_code_path_for_ip_and_dns_trust_domains() -> None:
    # ID-5: neither form gets special handling, so both have the same shape and neither is normalised.
    for name in ("10.0.0.1", "example.org", "1.2.3.4.5", "300.1.1.1"):
        assert parse_trust_domain(name) == TrustDomain(name)
        assert parse_spiffe_id(f"spiffe://{name}/a").trust_domain == TrustDomain(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cluster.local", "cluster.local"),
        ("spiffe://cluster.local", "cluster.local"),
        ("SPIFFE://cluster.local", "cluster.local"),
        (LONG_TD, LONG_TD),
    ],
)
def test_trust_domains_parse(text: str, expected: str) -> None:
    assert parse_trust_domain(text) == TrustDomain(expected)


@pytest.mark.parametrize(
    ("text", "rule", "message"),
    [
        ("", "ID-2", "the trust domain is empty"),
        ("Cluster.local", "ID-4", "must be lowercase"),
        ("td:8443", "ID-3", "a port"),
        ("u@td", "ID-3", "userinfo"),
        ("t%64", "ID-4", "percent-encoding"),
        ("td/a", "ID-4", "only the characters"),
        (LONG_TD + "a", "ID-12", "longer than 255 bytes"),
        # ID-13: a signing authority's ID is the trust domain alone
        ("spiffe://cluster.local/ns/a", "ID-13", "a trust domain has no path"),
    ],
)
def test_invalid_trust_domains(text: str, rule: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message) as exc:
        parse_trust_domain(text)
    assert exc.value.rule == rule


def test_trust_domain_id_is_the_root_id() -> None:
    # ID-13: the CA carries spiffe://<td>, no path
    td = parse_trust_domain("cluster.local")
    assert str(td.id) == "spiffe://cluster.local"
    assert td.id.is_root
    assert parse_spiffe_id(str(td.id)) == td.id


def test_workload_ids_need_a_path() -> None:
    assert parse_workload_id("spiffe://td/a") == SpiffeId("td", "/a")
    with pytest.raises(IdentityError, match=r"a workload ID needs a path") as exc:
        parse_workload_id("spiffe://td")
    assert exc.value.rule == "L-2"


def test_workload_id_convention() -> None:
    spiffe_id = workload_id("cluster.local", "default", "web")
    assert str(spiffe_id) == "spiffe://cluster.local/ns/default/sa/web"
    assert (spiffe_id.namespace, spiffe_id.service_account) == ("default", "web")
    assert SpiffeId("td", "/a/b").namespace is None


@pytest.mark.parametrize(
    ("namespace", "service_account", "message"),
    [
        ("a/b", "web", r"the namespace 'a/b' must be one path segment"),
        ("default", "web/x", r"the service account 'web/x' must be one path segment"),
        ("", "web", r"empty segment"),
        ("default", "..", r"a '\.\.' segment"),
        ("de fault", "web", r"path segment 'de fault'"),
    ],
)
def test_workload_id_refuses_names_that_are_not_one_segment(namespace: str, service_account: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        workload_id("cluster.local", namespace, service_account)


def test_non_text_is_refused() -> None:
    with pytest.raises(IdentityError, match=r"must be text"):
        parse_spiffe_id(b"spiffe://td/a")  # type: ignore[arg-type]
