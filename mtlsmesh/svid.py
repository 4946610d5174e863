"""The SPIFFE X.509-SVID rules that OpenSSL does not check, applied to a leaf after OpenSSL verified its chain.

`leaf_spiffe_id(cert)` returns the workload's `SpiffeId` or raises `CertificateError` naming the broken rule
(docs/svid-profile.md §2 and §4: L-1 ... L-9, V-2 ... V-6). `ca_spiffe_id(cert)` does the same for a signing
certificate (S-1, S-4, S-7), which the CLI uses to describe and to build bundles.

What this module does not do: chain building, signatures, validity dates, or name constraints — RFC 5280 path
validation is OpenSSL's job (V-1), done before these checks. Nor does it decide whether an ID is *allowed*; that
is `policy`.
"""

from __future__ import annotations

from typing import TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsmesh.errors import CertificateError, IdentityError
from mtlsmesh.identity import SpiffeId, parse_spiffe_id

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


# What cryptography raises from `cert.extensions` when an extension's DER does not parse (it parses them lazily, on
# first access, so a certificate that loaded fine can still fail here).
_MALFORMED = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def extension(cert: x509.Certificate, kind: type[_Ext], source: str = "") -> x509.Extension[_Ext] | None:
    """The certificate's extension of `kind`, or None; `CertificateError` when its extensions cannot be parsed."""
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except _MALFORMED as exc:
        raise CertificateError(source, f"malformed certificate extensions: {exc}") from exc


def _the_uri_san(cert: x509.Certificate, source: str) -> tuple[SpiffeId, x509.Extension[x509.SubjectAlternativeName]]:
    san = extension(cert, x509.SubjectAlternativeName, source)
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    if san is None or not uris:
        raise CertificateError(source, "no URI SAN: an SVID carries its SPIFFE ID as exactly one URI SAN (L-1)")
    if len(uris) > 1:
        raise CertificateError(source, f"{len(uris)} URI SANs: an SVID carries exactly one (L-1, V-6)")
    try:
        return parse_spiffe_id(uris[0]), san
    except IdentityError as exc:
        raise CertificateError(source, f"URI SAN is not a valid SPIFFE ID: {exc} (V-4)") from exc


def is_ca(cert: x509.Certificate, source: str = "") -> bool:
    constraints = extension(cert, x509.BasicConstraints, source)
    return constraints is not None and constraints.value.ca


def leaf_spiffe_id(cert: x509.Certificate, source: str = "") -> SpiffeId:
    """The SPIFFE ID of a leaf X.509-SVID, after checking every leaf rule; `source` prefixes the error."""
    if is_ca(cert, source):
        raise CertificateError(source, "a CA certificate (CA:true) is never accepted as an SVID (L-4, V-2, S-6)")
    spiffe_id, san = _the_uri_san(cert, source)
    if spiffe_id.is_root:
        raise CertificateError(source, f"{spiffe_id} has no path; a leaf SVID's ID needs one (L-2, V-5)")
    if len(cert.subject) == 0 and not san.critical:
        raise CertificateError(source, "the subject is empty, so the SAN extension must be critical (L-3)")
    key_usage = extension(cert, x509.KeyUsage, source)
    if key_usage is None:
        raise CertificateError(source, "no keyUsage extension; an SVID must carry one (L-5)")
    if not key_usage.critical:
        raise CertificateError(source, "the keyUsage extension must be critical (L-5)")
    if not key_usage.value.digital_signature:
        raise CertificateError(source, "keyUsage lacks digitalSignature (L-6)")
    if key_usage.value.key_cert_sign or key_usage.value.crl_sign:
        raise CertificateError(source, "keyUsage of a leaf must not have keyCertSign or cRLSign (L-8, V-3)")
    eku = extension(cert, x509.ExtendedKeyUsage, source)
    if eku is not None:
        wanted = ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"), (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"))
        missing = [name for oid, name in wanted if oid not in eku.value]
        if missing:
            raise CertificateError(source, f"extendedKeyUsage lacks {' and '.join(missing)} (L-9)")
    return spiffe_id


def ca_spiffe_id(cert: x509.Certificate, source: str = "") -> SpiffeId:
    """The ID `spiffe://<td>` of a signing certificate, after checking it may sign (S-1, S-4, S-7)."""
    if not is_ca(cert, source):
        raise CertificateError(source, "not a CA certificate (basicConstraints CA:true is missing) (S-1)")
    key_usage = extension(cert, x509.KeyUsage, source)
    if key_usage is None or not key_usage.critical:
        raise CertificateError(source, "a CA certificate needs a critical keyUsage extension (S-7)")
    if not key_usage.value.key_cert_sign:
        raise CertificateError(source, "keyUsage of a CA certificate lacks keyCertSign (S-1)")
    spiffe_id, _ = _the_uri_san(cert, source)
    if not spiffe_id.is_root:
        raise CertificateError(source, f"a CA certificate's ID {spiffe_id} must not have a path (S-4)")
    return spiffe_id
