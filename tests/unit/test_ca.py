"""The built-in CA: the certificate profile of root, intermediate and leaf, and the SVID leaf rules.

`assert_profile` checks every field of docs/svid-profile.md §6 for one certificate; the tests run it for
every key type, with and without an intermediate and a name constraint. `forge` builds certificates that break one
rule at a time, signed by a real CA key, to show `svid.leaf_spiffe_id` refuses each. OpenSSL's own `verify`
(the binary) must accept our chains in strict mode for both TLS purposes and refuse leaves of another CA.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtlsmesh import ca, pem, svid
from mtlsmesh.errors import CertificateError, IdentityError
from mtlsmesh.identity import SpiffeId, TrustDomain, parse_spiffe_id, parse_trust_domain, workload_id
from tests.pki import MALFORMED_SAN, NOT_CA, SIGNING, forge_leaf, key_usage, uri_sans

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TD = parse_trust_domain("cluster.local")
WEB = workload_id(TD, "default", "web")
KEY_TYPES = list(ca.KeyType)
PEM = serialization.Encoding.PEM

_CURVES: dict[ca.KeyType, type[ec.EllipticCurve]] = {
    ca.KeyType.ECDSA_P256: ec.SECP256R1,
    ca.KeyType.ECDSA_P384: ec.SECP384R1,
}
_HASHES: dict[ca.KeyType, type[hashes.HashAlgorithm] | None] = {
    ca.KeyType.ECDSA_P256: hashes.SHA256,
    ca.KeyType.ECDSA_P384: hashes.SHA384,
    ca.KeyType.ED25519: None,
    ca.KeyType.RSA_3072: hashes.SHA256,
}


@functools.cache
def authority_for(
    key_type: ca.KeyType = ca.KeyType.ECDSA_P256, intermediate: bool = False, name_constraint: bool = False
) -> ca.Authority:
    """One CA per shape for the whole module: RSA keys take a while, and the tests only read the authority."""
    return ca.create_ca(TD, now=NOW, key_type=key_type, intermediate=intermediate, name_constraint=name_constraint)


_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[_Ext]) -> x509.Extension[_Ext]:
    return cert.extensions.get_extension_for_class(kind)


def assert_key_type(cert: x509.Certificate, key_type: ca.KeyType) -> None:
    public_key = cert.public_key()
    if key_type in _CURVES:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert isinstance(public_key.curve, _CURVES[key_type])
    elif key_type is ca.KeyType.ED25519:
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
    else:
        assert isinstance(public_key, rsa.RSAPublicKey)
        assert public_key.key_size == 3072
    assert pem.key_type_name(public_key) == key_type.value


def assert_profile(
    cert: x509.Certificate,
    *,
    role: str,
    issuer: x509.Certificate,
    key_type: ca.KeyType,
    signer_type: ca.KeyType,
    not_before: datetime,
    not_after: datetime,
    uri: SpiffeId,
    dns_names: Sequence[str] = (),
    name_constraint: TrustDomain | None = None,
) -> None:
    """Every field of the mtlsmesh profile for a `role` of root, intermediate or leaf."""
    assert role in ("root", "intermediate", "leaf")
    is_ca = role != "leaf"
    assert cert.version is x509.Version.v3
    # A positive serial with at least 64 random bits (CA/B BR 7.1; RFC 5280 caps it at 20 octets).
    assert 0 < cert.serial_number < 2**159
    assert cert.serial_number.bit_length() >= 64
    assert cert.issuer == issuer.subject
    cert.verify_directly_issued_by(issuer)  # the signature is the issuer's
    expected_hash = _HASHES[signer_type]
    if expected_hash is None:
        assert cert.signature_hash_algorithm is None
    else:
        assert isinstance(cert.signature_hash_algorithm, expected_hash)
    assert_key_type(cert, key_type)
    assert cert.not_valid_before_utc == not_before
    assert cert.not_valid_after_utc == not_after

    # Subject: empty for a leaf (and then the SAN is critical), named for a CA (and then it is not: RFC 5280 §4.1.2.6).
    if is_ca:
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "mtlsmesh"
        assert TD.name in str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    else:
        assert len(cert.subject) == 0
    if role == "root":
        assert cert.subject == cert.issuer

    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical is (len(cert.subject) == 0)
    assert san.critical is not is_ca
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(uri)]
    assert san.value.get_values_for_type(x509.DNSName) == list(dns_names)
    assert len(san.value) == 1 + len(dns_names)

    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is is_ca
    assert constraints.value.path_length == {"root": 1, "intermediate": 0, "leaf": None}[role]

    key_usage = _ext(cert, x509.KeyUsage)
    assert key_usage.critical
    usage = key_usage.value
    assert usage.digital_signature is not is_ca
    assert usage.key_cert_sign is is_ca
    assert usage.crl_sign is is_ca
    assert not (usage.content_commitment or usage.key_encipherment or usage.data_encipherment or usage.key_agreement)

    ski = _ext(cert, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == _ext(issuer, x509.SubjectKeyIdentifier).value.digest

    if is_ca:
        with pytest.raises(x509.ExtensionNotFound):
            _ext(cert, x509.ExtendedKeyUsage)  # S-10: no EKU on CA certificates
    else:
        eku = _ext(cert, x509.ExtendedKeyUsage)
        assert not eku.critical
        assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

    if is_ca and name_constraint is not None:
        nc = _ext(cert, x509.NameConstraints)
        assert nc.critical
        assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(name_constraint.name)]
        assert nc.value.excluded_subtrees is None
    else:
        with pytest.raises(x509.ExtensionNotFound):
            _ext(cert, x509.NameConstraints)
    assert len(cert.extensions) == (6 if not is_ca else 5) + (1 if is_ca and name_constraint is not None else 0)


@pytest.mark.parametrize("key_type", KEY_TYPES, ids=[k.value for k in KEY_TYPES])
@pytest.mark.parametrize("intermediate", [False, True], ids=["root-signs", "intermediate-signs"])
@pytest.mark.parametrize("name_constraint", [False, True], ids=["", "constrained"])
def test_profile_of_root_intermediate_and_leaf(key_type: ca.KeyType, intermediate: bool, name_constraint: bool) -> None:
    authority = authority_for(key_type, intermediate, name_constraint)
    constraint = TD if name_constraint else None
    (root,) = authority.roots
    start, end = NOW - ca.BACKDATE, NOW + ca.DEFAULT_CA_TTL
    assert_profile(
        root, role="root", issuer=root, key_type=key_type, signer_type=key_type, uri=TD.id,
        name_constraint=constraint, not_before=start, not_after=end,
    )  # fmt: skip
    if intermediate:
        assert authority.chain == (authority.signer_cert,)
        assert_profile(
            authority.signer_cert, role="intermediate", issuer=root, key_type=key_type, signer_type=key_type,
            uri=TD.id, name_constraint=constraint, not_before=start, not_after=end,
        )  # fmt: skip
    else:
        assert authority.chain == ()
        assert authority.signer_cert == root
    assert authority.root_key is not None
    pem.check_key_matches(root, authority.root_key, "root")
    pem.check_key_matches(authority.signer_cert, authority.signer_key, "signer")

    issued = ca.issue_svid(authority, WEB, now=NOW, dns_names=["web.default.svc", "*.web.default.svc"])
    assert_profile(
        issued.cert, role="leaf", issuer=authority.signer_cert, key_type=ca.KeyType.ECDSA_P256,
        signer_type=key_type, uri=WEB, dns_names=["web.default.svc", "*.web.default.svc"],
        not_before=NOW - ca.BACKDATE, not_after=NOW + timedelta(hours=24),
    )  # fmt: skip
    assert timedelta(minutes=1) <= NOW - issued.cert.not_valid_before_utc <= timedelta(minutes=2)
    assert svid.leaf_spiffe_id(issued.cert) == WEB
    assert svid.ca_spiffe_id(root) == TD.id
    assert svid.ca_spiffe_id(authority.signer_cert) == TD.id


@pytest.mark.parametrize("key_type", KEY_TYPES, ids=[k.value for k in KEY_TYPES])
def test_leaf_of_every_key_type(key_type: ca.KeyType) -> None:
    authority = authority_for(ca.KeyType.ECDSA_P384, True)
    issued = ca.issue_svid(authority, WEB, now=NOW, ttl=timedelta(hours=1), key_type=key_type)
    assert issued.key is not None
    pem.check_key_matches(issued.cert, issued.key, "leaf")
    assert_profile(
        issued.cert, role="leaf", issuer=authority.signer_cert, key_type=key_type,
        signer_type=ca.KeyType.ECDSA_P384, uri=WEB, not_before=NOW - ca.BACKDATE, not_after=NOW + timedelta(hours=1),
    )  # fmt: skip


def test_serials_differ() -> None:
    authority = authority_for()
    serials = {ca.issue_svid(authority, WEB, now=NOW).cert.serial_number for _ in range(20)}
    assert len(serials) == 20


def test_the_2048_byte_id_is_issued_and_accepted() -> None:
    td = parse_trust_domain("td")
    text = "spiffe://td/" + "p" * (2048 - len("spiffe://td/"))
    authority = ca.create_ca(td, now=NOW)
    issued = ca.issue_svid(authority, parse_spiffe_id(text), now=NOW)
    assert str(svid.leaf_spiffe_id(issued.cert)) == text


# ---------------------------------------------------------------------------------------------------------------
# What issue_svid refuses


def test_refuses_ids_over_2048_bytes_even_when_built_without_the_parser() -> None:
    too_long = SpiffeId(TD.name, "/" + "a" * 2100)
    with pytest.raises(IdentityError, match=r"longer than 2048 bytes") as exc:
        ca.issue_svid(authority_for(), too_long, now=NOW)
    assert exc.value.rule == "ID-11"


@pytest.mark.parametrize(
    ("spiffe_id", "error", "message"),
    [
        (TD.id, IdentityError, r"a leaf SVID needs a path.*\(L-2\)"),
        (SpiffeId("cluster.local", ""), IdentityError, r"a leaf SVID needs a path"),
        (SpiffeId("other.td", "/ns/default/sa/web"), IdentityError, r"not in this CA's trust domain 'cluster.local'"),
        (SpiffeId("cluster.local", "/a//b"), IdentityError, r"empty segment \(ID-8\)"),
        (SpiffeId("Cluster.local", "/a"), IdentityError, r"lowercase \(ID-4\)"),
    ],
)
def test_refuses_ids_a_ca_must_not_issue(spiffe_id: SpiffeId, error: type[Exception], message: str) -> None:
    for intermediate in (False, True):
        with pytest.raises(error, match=message):
            ca.issue_svid(authority_for(intermediate=intermediate), spiffe_id, now=NOW)


@pytest.mark.parametrize(
    ("now", "ttl", "message"),
    [
        (
            NOW,
            timedelta(days=3),
            r"a TTL of 3d ends 2026-01-05T03:04:05Z, after the signing CA expires; "
            r"it could go until 2026-01-04T03:04:05Z \(a TTL of at most 2d\)",
        ),
        (NOW + timedelta(days=1), timedelta(hours=25), r"it could go until 2026-01-04T03:04:05Z \(.* at most 1d\)"),
        (NOW + timedelta(days=2), timedelta(hours=1), r"the signing CA expired at 2026-01-04T03:04:05Z"),
        (NOW - timedelta(hours=1), timedelta(hours=1), r"the signing CA is not valid before 2026-01-02T03:03:05Z"),
        (NOW, timedelta(0), r"the SVID lifetime must be positive, not 0s"),
        (NOW, timedelta(hours=-1), r"the SVID lifetime must be positive, not -1h"),
    ],
)
@pytest.mark.parametrize("intermediate", [False, True])
def test_refuses_lifetimes_the_signer_cannot_cover(
    now: datetime, ttl: timedelta, message: str, intermediate: bool
) -> None:
    authority = ca.create_ca(TD, now=NOW, ttl=timedelta(days=2), intermediate=intermediate)
    with pytest.raises(CertificateError, match=message):
        ca.issue_svid(authority, WEB, now=now, ttl=ttl)


def test_a_ttl_ending_exactly_at_the_signer_expiry_is_allowed() -> None:
    authority = ca.create_ca(TD, now=NOW, ttl=timedelta(days=2), intermediate=True)
    issued = ca.issue_svid(authority, WEB, now=NOW, ttl=timedelta(days=2))
    assert issued.cert.not_valid_after_utc == authority.signer_cert.not_valid_after_utc


def test_leaf_never_starts_before_its_signer() -> None:
    authority = authority_for()
    issued = ca.issue_svid(authority, WEB, now=NOW - ca.BACKDATE + timedelta(seconds=10))
    assert issued.cert.not_valid_before_utc == authority.signer_cert.not_valid_before_utc


def test_naive_clock_is_utc() -> None:
    issued = ca.issue_svid(authority_for(), WEB, now=NOW.replace(tzinfo=None))
    assert issued.cert.not_valid_after_utc == NOW + timedelta(hours=24)


@pytest.mark.parametrize(
    "name", ["", "-a.example", "a-.example", "a..b", "a b", "a_b.example", "*", "a.*.example", "x" * 64, "ä.example"]
)
def test_refuses_bad_dns_names(name: str) -> None:
    with pytest.raises(CertificateError, match=r"is not a valid DNS name"):
        ca.issue_svid(authority_for(), WEB, now=NOW, dns_names=[name])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=1024), r"unsupported public key rsa-1024"),
        (ec.generate_private_key(ec.SECP521R1()), r"unsupported public key ecdsa-p521"),
    ],
)
def test_refuses_weak_or_unusual_outside_keys(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, message: str
) -> None:
    with pytest.raises(CertificateError, match=message):
        ca.issue_svid(authority_for(), WEB, now=NOW, public_key=key.public_key())


def test_outside_public_key_is_signed_without_a_private_key(tmp_path: Path) -> None:
    own_key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue_svid(authority_for(intermediate=True), WEB, now=NOW, public_key=own_key.public_key())
    assert issued.key is None
    pem.check_key_matches(issued.cert, own_key, "own key")
    with pytest.raises(CertificateError, match=r"no private key to write"):
        issued.key_pem()
    issued.write_to_dir(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["bundle.pem", "cert.pem"]


# ---------------------------------------------------------------------------------------------------------------
# svid.leaf_spiffe_id: each rule broken alone


SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
GOOD_SAN = uri_sans(str(WEB))


def forge(
    *,
    subject: x509.Name | None = None,
    san: x509.SubjectAlternativeName | x509.UnrecognizedExtension | None = GOOD_SAN,
    san_critical: bool = True,
    basic: x509.BasicConstraints | None = NOT_CA,
    key_usage: x509.KeyUsage | None = SIGNING,
    key_usage_critical: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = (SERVER, CLIENT),
    authority: ca.Authority | None = None,
    now: datetime = NOW,
) -> x509.Certificate:
    """A leaf signed by a real CA with the given extensions (None leaves one out); the defaults make a valid SVID."""
    cert, _ = forge_leaf(
        authority or authority_for(),
        now=now,
        subject=subject,
        san=san,
        san_critical=san_critical,
        basic=basic,
        usage=key_usage,
        usage_critical=key_usage_critical,
        eku=eku,
    )
    return cert


NAMED = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"san": None}, r"no URI SAN.*\(L-1\)"),
        ({"san": x509.SubjectAlternativeName([x509.DNSName("web.example")])}, r"no URI SAN.*\(L-1\)"),
        ({"san": uri_sans(str(WEB), "spiffe://cluster.local/ns/default/sa/db")}, r"2 URI SANs.*\(L-1, V-6\)"),
        ({"san": uri_sans("spiffe://cluster.local")}, r"spiffe://cluster.local has no path.*\(L-2, V-5\)"),
        ({"san": uri_sans("https://cluster.local/a")}, r"not a valid SPIFFE ID.*scheme.*\(V-4\)"),
        ({"san": uri_sans("spiffe://cluster.local/a//b")}, r"not a valid SPIFFE ID.*empty segment"),
        ({"san_critical": False}, r"the subject is empty, so the SAN extension must be critical \(L-3\)"),
        ({"basic": x509.BasicConstraints(ca=True, path_length=None)}, r"CA:true.*never accepted.*\(L-4, V-2, S-6\)"),
        ({"key_usage_critical": False}, r"keyUsage extension must be critical \(L-5\)"),
        ({"key_usage": key_usage(key_encipherment=True)}, r"lacks digitalSignature \(L-6\)"),
        ({"key_usage": key_usage(digital_signature=True, key_cert_sign=True)}, r"keyCertSign or cRLSign \(L-8, V-3\)"),
        ({"key_usage": key_usage(digital_signature=True, crl_sign=True)}, r"keyCertSign or cRLSign \(L-8, V-3\)"),
        ({"eku": [SERVER]}, r"extendedKeyUsage lacks clientAuth \(L-9\)"),
        ({"eku": [CLIENT]}, r"extendedKeyUsage lacks serverAuth \(L-9\)"),
        ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, r"lacks serverAuth and clientAuth \(L-9\)"),
    ],
)
def test_leaf_rules_refuse(overrides: dict[str, object], message: str) -> None:
    cert = forge(**overrides)  # type: ignore[arg-type]
    with pytest.raises(CertificateError, match=message):
        svid.leaf_spiffe_id(cert)


def test_leaf_without_key_usage_is_refused() -> None:
    cert = forge(basic=None, key_usage=None, eku=None)
    with pytest.raises(CertificateError, match=r"no keyUsage extension.*\(L-5\)"):
        svid.leaf_spiffe_id(cert)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"eku": None},  # L-9: EKU presence is a SHOULD
        {"eku": [SERVER, CLIENT, ExtendedKeyUsageOID.CODE_SIGNING]},
        {"key_usage": key_usage(digital_signature=True, key_encipherment=True, key_agreement=True)},  # L-7 MAY
        {"subject": NAMED, "san_critical": False},  # L-3 binds only an empty subject
        {"san": x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB)), x509.DNSName("web")])},
        {"basic": None},  # no basicConstraints means not a CA
    ],
)
def test_leaf_rules_accept(overrides: dict[str, object]) -> None:
    assert svid.leaf_spiffe_id(forge(**overrides)) == WEB  # type: ignore[arg-type]


def test_source_prefixes_the_reason() -> None:
    with pytest.raises(CertificateError, match=r"^peer\.pem: no URI SAN"):
        svid.leaf_spiffe_id(forge(san=None), "peer.pem")


@pytest.mark.parametrize("check", [svid.leaf_spiffe_id, svid.ca_spiffe_id, svid.is_ca])
def test_malformed_extensions_are_a_certificate_error(check: Callable[[x509.Certificate, str], object]) -> None:
    # cryptography parses extensions lazily: the certificate loads, and the first look at an extension fails.
    with pytest.raises(CertificateError, match=r"^bad\.pem: malformed certificate extensions: error parsing asn1"):
        check(forge(san=MALFORMED_SAN), "bad.pem")


@pytest.mark.parametrize(
    ("cert", "message"),
    [
        (forge(), r"not a CA certificate.*\(S-1\)"),
        (forge(basic=x509.BasicConstraints(ca=True, path_length=0)), r"lacks keyCertSign \(S-1\)"),
        (
            forge(basic=x509.BasicConstraints(ca=True, path_length=0), key_usage=key_usage(key_cert_sign=True)),
            r"ID spiffe://cluster.local/ns/default/sa/web must not have a path \(S-4\)",
        ),
        (
            forge(
                basic=x509.BasicConstraints(ca=True, path_length=0),
                key_usage=key_usage(key_cert_sign=True),
                key_usage_critical=False,
            ),
            r"needs a critical keyUsage extension \(S-7\)",
        ),
    ],
)
def test_ca_rules_refuse(cert: x509.Certificate, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        svid.ca_spiffe_id(cert)


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_write_to_dir_modes_and_contents(tmp_path: Path) -> None:
    authority = authority_for(intermediate=True)
    issued = ca.issue_svid(authority, WEB, now=NOW)
    out = tmp_path / "web"
    issued.write_to_dir(out)
    assert sorted(os.listdir(out)) == ["bundle.pem", "cert.pem", "key.pem"]  # no temporary files left
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "cert.pem").stat().st_mode) == 0o644
    assert pem.load_certificates(out / "cert.pem") == (issued.cert, *authority.chain)
    assert pem.load_certificates(out / "bundle.pem") == authority.roots
    pem.check_key_matches(issued.cert, pem.load_private_key(out / "key.pem"), "key.pem")


def test_write_to_dir_refuses_existing_files_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "web"
    out.mkdir()
    (out / "key.pem").write_bytes(b"keep me")
    issued = ca.issue_svid(authority_for(), WEB, now=NOW)
    with pytest.raises(CertificateError, match=r"key\.pem: already exists \(--force replaces it\)"):
        issued.write_to_dir(out)
    assert sorted(os.listdir(out)) == ["key.pem"]
    assert (out / "key.pem").read_bytes() == b"keep me"
    issued.write_to_dir(out, force=True)
    assert (out / "key.pem").read_bytes() == issued.key_pem()


@pytest.mark.parametrize("intermediate", [False, True])
def test_authority_round_trips_through_a_directory(tmp_path: Path, intermediate: bool) -> None:
    authority = authority_for(ca.KeyType.ED25519, intermediate)
    ca.save_authority(authority, tmp_path / "ca")
    expected = {"root.pem", "root-key.pem", "bundle.pem"} | (
        {"intermediate.pem", "intermediate-key.pem"} if intermediate else set()
    )
    assert set(os.listdir(tmp_path / "ca")) == expected
    for name in expected:
        mode = stat.S_IMODE((tmp_path / "ca" / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644)
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    loaded = ca.load_authority(tmp_path / "ca")
    assert loaded.signer_cert == authority.signer_cert
    assert loaded.chain == authority.chain
    assert loaded.roots == authority.roots
    assert loaded.trust_domain == TD
    pem.check_key_matches(loaded.signer_cert, loaded.signer_key, "signer")
    assert svid.leaf_spiffe_id(ca.issue_svid(loaded, WEB, now=NOW).cert) == WEB
    if intermediate:
        (tmp_path / "ca" / "root-key.pem").unlink()
        offline = ca.load_authority(tmp_path / "ca")
        assert offline.root_key is None
        assert offline.signer_cert == authority.signer_cert
        assert svid.leaf_spiffe_id(ca.issue_svid(offline, WEB, now=NOW).cert) == WEB


def test_save_authority_refuses_or_replaces_a_previous_ca(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    ca.save_authority(authority_for(intermediate=True), directory)
    before = (directory / "root.pem").read_bytes()
    with pytest.raises(CertificateError, match=r"already exists"):
        ca.save_authority(authority_for(), directory)
    assert (directory / "root.pem").read_bytes() == before
    ca.save_authority(authority_for(), directory, force=True)
    # The old intermediate must go: otherwise it would sign under the new root.
    assert sorted(os.listdir(directory)) == ["bundle.pem", "root-key.pem", "root.pem"]
    assert ca.load_authority(directory).signer_cert == authority_for().signer_cert


def test_bundle_with_several_roots_keeps_the_own_root_first(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    ca.save_authority(authority_for(), directory)
    other = authority_for(ca.KeyType.ECDSA_P384)
    (directory / "bundle.pem").write_bytes(pem.render_certificates([*other.roots, *authority_for().roots]))
    loaded = ca.load_authority(directory)
    assert loaded.roots == (*authority_for().roots, *other.roots)


ED_CA = authority_for(ca.KeyType.ED25519)  # another CA, whose files must not be mistaken for ours
ED_CA_2 = authority_for(ca.KeyType.ED25519, True)


@pytest.mark.parametrize(
    ("intermediate", "damage", "message"),
    [
        (False, lambda d: shutil.rmtree(d), r"no CA directory here"),
        (False, lambda d: (d / "root.pem").unlink(), r"root\.pem: no such file"),
        (False, lambda d: (d / "root-key.pem").unlink(), r"root-key\.pem: no such file, and no intermediate"),
        (False, lambda d: (d / "root.pem").write_text("junk\n"), r"root\.pem: no PEM certificate found"),
        (
            False,
            lambda d: (d / "root.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            r"root\.pem: corrupt PEM certificate",
        ),
        (False, lambda d: (d / "root-key.pem").write_text("junk\n"), r"root-key\.pem: no PEM private key found"),
        (
            False,
            lambda d: (d / "root-key.pem").write_bytes(
                pem.render_private_key(authority_for(ca.KeyType.ED25519).signer_key)
            ),
            r"root-key\.pem: the private key does not match the certificate",
        ),
        (
            False,
            lambda d: (d / "bundle.pem").write_bytes(pem.render_certificates(ED_CA.roots)),
            r"bundle\.pem: does not hold the CA's own root\.pem",
        ),
        (
            True,
            lambda d: (d / "intermediate.pem").write_bytes(pem.render_certificates(ED_CA_2.chain)),
            r"intermediate-key\.pem: the private key does not match the certificate",
        ),
        (
            True,
            lambda d: [
                (d / "intermediate.pem").write_bytes(pem.render_certificates(ED_CA_2.chain)),
                (d / "intermediate-key.pem").write_bytes(pem.render_private_key(ED_CA_2.signer_key)),
            ],
            r"intermediate\.pem: was not issued by root\.pem",
        ),
        (True, lambda d: (d / "intermediate-key.pem").unlink(), r"intermediate-key\.pem: no such file"),
    ],
)
def test_load_authority_refuses_damaged_directories(
    tmp_path: Path, intermediate: bool, damage: object, message: str
) -> None:
    directory = tmp_path / "ca"
    ca.save_authority(authority_for(intermediate=intermediate), directory)
    damage(directory)  # type: ignore[operator]
    with pytest.raises(CertificateError, match=message):
        ca.load_authority(directory)


# ---------------------------------------------------------------------------------------------------------------
# OpenSSL's own verifier agrees


def openssl_verify(
    tmp_path: Path, purpose: str, bundle: bytes, chain: bytes, leaf: bytes
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bundle.pem").write_bytes(bundle)
    (tmp_path / "leaf.pem").write_bytes(leaf)
    command = ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(tmp_path / "bundle.pem")]
    if chain:
        (tmp_path / "chain.pem").write_bytes(chain)
        command += ["-untrusted", str(tmp_path / "chain.pem")]
    return subprocess.run([*command, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")


@needs_openssl
@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
@pytest.mark.parametrize("key_type", KEY_TYPES, ids=[k.value for k in KEY_TYPES])
@pytest.mark.parametrize("intermediate", [False, True], ids=["root-signs", "intermediate-signs"])
@pytest.mark.parametrize("name_constraint", [False, True], ids=["", "constrained"])
def test_openssl_accepts_our_chains(
    tmp_path: Path, purpose: str, key_type: ca.KeyType, intermediate: bool, name_constraint: bool
) -> None:
    now = datetime.now(UTC)  # the openssl binary checks validity against the real clock
    authority = ca.create_ca(TD, now=now, key_type=key_type, intermediate=intermediate, name_constraint=name_constraint)
    issued = ca.issue_svid(authority, WEB, now=now, key_type=key_type, dns_names=["web.default.svc"])
    chain = pem.render_certificates(issued.chain)
    result = openssl_verify(tmp_path, purpose, issued.bundle_pem(), chain, issued.cert.public_bytes(PEM))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@needs_openssl
@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
@pytest.mark.parametrize("intermediate", [False, True], ids=["root-signs", "intermediate-signs"])
def test_openssl_refuses_a_leaf_of_another_ca(tmp_path: Path, purpose: str, intermediate: bool) -> None:
    now = datetime.now(UTC)
    ours = ca.create_ca(TD, now=now, intermediate=intermediate)
    theirs = ca.create_ca(TD, now=now, intermediate=intermediate)
    issued = ca.issue_svid(theirs, WEB, now=now)
    result = openssl_verify(
        tmp_path, purpose, pem.render_certificates(ours.roots), pem.render_certificates(issued.chain),
        issued.cert.public_bytes(PEM),
    )  # fmt: skip
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


@needs_openssl
def test_openssl_enforces_the_name_constraint(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    authority = ca.create_ca(TD, now=now, name_constraint=True)
    # Signed by the constrained CA itself, valid today: only the constraint can fail it.
    outsider = forge(san=uri_sans("spiffe://other.td/ns/default/sa/web"), authority=authority, now=now)
    assert svid.leaf_spiffe_id(outsider) == SpiffeId("other.td", "/ns/default/sa/web")  # the SVID rules pass
    result = openssl_verify(
        tmp_path, "sslclient", pem.render_certificates(authority.roots), b"", outsider.public_bytes(PEM)
    )
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr


@needs_openssl
def test_openssl_refuses_an_expired_leaf(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    authority = ca.create_ca(TD, now=now - timedelta(days=3))
    issued = ca.issue_svid(authority, WEB, now=now - timedelta(days=2), ttl=timedelta(hours=1))
    result = openssl_verify(tmp_path, "sslserver", issued.bundle_pem(), b"", issued.cert.public_bytes(PEM))
    assert result.returncode != 0
    assert "certificate has expired" in result.stdout + result.stderr


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"a.pem": (b"a", 0o644), "b.pem": (b"b", 0o644)}
    with pytest.raises(CertificateError, match=r"File name too long"):
        pem.write_files(tmp_path / "new", {**files, "x" * 300: (b"", 0o644)}, force=False)
    assert not (tmp_path / "new").exists()

    # A disk that fills up while writing the second file: the first must not survive, nor the new directory.
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CertificateError, match=r"new: cannot write: No space left on device"):
        pem.write_files(tmp_path / "new", files, force=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    calls.clear()
    with pytest.raises(CertificateError, match=r"cannot write: No space left on device"):
        pem.write_files(tmp_path / "old", files, force=False)
    assert list((tmp_path / "old").iterdir()) == []


@pytest.mark.parametrize("module", ["mtlsmesh.ca", "mtlsmesh.svid", "mtlsmesh.pem", "mtlsmesh.identity"])
def test_the_ca_core_loads_no_io_machinery(module: str) -> None:
    # `socket` is not on the list: cryptography.x509 loads email.utils, which imports it; nothing here uses it.
    io_modules = ("trio", "ssl", "OpenSSL", "subprocess", "asyncio")
    probe = f"import sys, {module}; print(','.join(m for m in {io_modules!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""
