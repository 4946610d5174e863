"""Test CAs in one place: a CA that writes SVIDs into directories, in-memory TLS material, and forged leaves.

Every test that needs certificates makes them here, from the real `mtlsmesh.ca`, in a temporary directory or in
memory; no private key is ever kept in the tree. `forge_leaf` is the one exception to using `ca.issue_svid`: it
signs, with a real CA key, a leaf that breaks the SVID rules on purpose, so tests can show each rule is enforced.

What this module does not do: check certificates (the tests do, against `svid` and OpenSSL), or start anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from mtlsmesh import ca, handshake
from mtlsmesh.config import CredentialFiles
from mtlsmesh.identity import SpiffeId, TrustDomain, workload_id

TD = TrustDomain("cluster.local")


class Pki:
    """One CA (optionally with an intermediate) that writes SVIDs into directories."""

    def __init__(self, root: Path, *, intermediate: bool = False, trust_domain: TrustDomain = TD) -> None:
        self.root = root
        self.now = datetime.now(UTC)
        # Backdated so that tests can issue leaves that have already expired.
        self.authority = ca.create_ca(trust_domain, now=self.now - timedelta(days=3), intermediate=intermediate)

    def issue(
        self, name: str, namespace: str = "default", service_account: str | None = None, **kwargs: object
    ) -> CredentialFiles:
        spiffe_id = workload_id(self.authority.trust_domain, namespace, service_account or name)
        issued = ca.issue_svid(self.authority, spiffe_id, now=kwargs.pop("now", self.now), **kwargs)  # type: ignore[arg-type]
        directory = self.root / name
        issued.write_to_dir(directory, force=True)
        return files_in(directory)

    def id_of(self, name: str, namespace: str = "default") -> SpiffeId:
        return workload_id(self.authority.trust_domain, namespace, name)


def files_in(directory: Path, reload_interval: float = 0.2) -> CredentialFiles:
    return CredentialFiles(
        str(directory / "cert.pem"), str(directory / "key.pem"), str(directory / "bundle.pem"), reload_interval
    )


def material_for(
    authority: ca.Authority, spiffe_id: SpiffeId, *, now: datetime | None = None, **kwargs: object
) -> handshake.Material:
    """An SVID issued by `authority` (now, unless told), as the in-memory material `handshake.build_context` takes."""
    issued = ca.issue_svid(authority, spiffe_id, now=now or datetime.now(UTC), **kwargs)  # type: ignore[arg-type]
    assert issued.key is not None
    return handshake.Material((issued.cert, *issued.chain), issued.key, issued.roots)


def key_usage(**flags: bool) -> x509.KeyUsage:
    """A keyUsage with only the named flags set (`key_usage(digital_signature=True)`)."""
    names = [
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
        "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    ]  # fmt: skip
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def uri_sans(*uris: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri) for uri in uris])


# A subjectAltName whose one URI is the byte 0xff, not IA5: it loads, and fails only when the extensions are parsed.
MALFORMED_SAN = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x86\x01\xff")
NOT_CA = x509.BasicConstraints(ca=False, path_length=None)
SIGNING = key_usage(digital_signature=True)
BOTH_EKUS = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def forge_leaf(
    authority: ca.Authority,
    *,
    now: datetime,
    san: x509.SubjectAlternativeName | x509.UnrecognizedExtension | None,
    subject: x509.Name | None = None,
    san_critical: bool = True,
    basic: x509.BasicConstraints | None = NOT_CA,
    usage: x509.KeyUsage | None = SIGNING,
    usage_critical: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = BOTH_EKUS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 leaf valid from `now` for an hour, signed by `authority`'s signer, with exactly the given extensions
    (None leaves one out); the defaults make a valid SVID for the SPIFFE ID in `san`. Returns it with its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else x509.Name([]))
        .issuer_name(authority.signer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.signer_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=san_critical)
    if basic is not None:
        builder = builder.add_extension(basic, critical=True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=usage_critical)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(authority.signer_key, hashes.SHA256()), key
