"""A tiny SPIFFE certificate authority: a root, an optional intermediate, and short-lived X.509-SVID leaves.

Every certificate comes out of one private builder, `_build_certificate`, which differs between root,
intermediate and leaf only by the values handed to it; the profile is docs/svid-profile.md §6:

- leaf: empty subject, exactly one URI SAN (critical, because the subject is empty), optional DNS SANs,
  basicConstraints CA:false (critical), keyUsage digitalSignature only (critical), EKU serverAuth+clientAuth,
  SKI/AKI, a random positive serial of 159 bits, not-before backdated by `BACKDATE`, 24 h by default.
- root: self-signed, named subject, URI SAN `spiffe://<td>` (not critical: the subject is not empty; a CA ID has
  no path, ID-13/S-4), CA:true pathlen 1,
  keyUsage keyCertSign+cRLSign (critical), SKI/AKI, 10 years by default.
- intermediate (optional): the same with pathlen 0, signed by the root; it then signs every leaf.
- name constraint (optional): a critical permitted URI subtree naming the trust domain, on every CA certificate.

The clock is passed in (`now`), so tests can mint certificates that are expired or not yet valid. This module uses
`cryptography` only; it neither verifies chains (OpenSSL does that in the TLS layer, see `svid` for the SPIFFE
rules on top) nor talks to the network. It touches files only in `save_authority`, `load_authority` and
`IssuedSvid.write_to_dir`, through `pem`, which checks every output before it writes any and renames temporary
files into place so a failure leaves nothing half-written.

The CA signs the identity it is told to sign, never one a CSR claims: `issue_svid(..., public_key=...)` takes only
the key from a request.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtlsmesh import durations, pem, svid
from mtlsmesh.conventions import BUNDLE_FILE, CERT_FILE, KEY_FILE
from mtlsmesh.errors import CertificateError, IdentityError
from mtlsmesh.identity import MAX_ID_BYTES, SpiffeId, TrustDomain, parse_spiffe_id

PrivateKey = pem.PrivateKey
PublicKey = pem.PublicKey

DEFAULT_CA_TTL = timedelta(days=3650)  # a 10-year root (docs/svid-profile.md §6)
DEFAULT_SVID_TTL = timedelta(hours=24)  # short-lived leaves, rotated by reissue (docs/svid-profile.md §6)
# Peers whose clocks run a little behind still accept a fresh certificate. SPIRE backdates 10 s; anything from
# there to a few minutes does, and a minute covers the skew of machines that run NTP at all.
BACKDATE = timedelta(minutes=1)

# The file layout of a CA directory (save_authority / load_authority); its roots are in BUNDLE_FILE, as an SVID's.
# An issued SVID (IssuedSvid.write_to_dir) is CERT_FILE, KEY_FILE and BUNDLE_FILE (`conventions`).
ROOT_CERT_FILE = "root.pem"
ROOT_KEY_FILE = "root-key.pem"
INTERMEDIATE_CERT_FILE = "intermediate.pem"
INTERMEDIATE_KEY_FILE = "intermediate-key.pem"
CA_FILES = (ROOT_CERT_FILE, ROOT_KEY_FILE, INTERMEDIATE_CERT_FILE, INTERMEDIATE_KEY_FILE, BUNDLE_FILE)

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)
_MAX_DNS_NAME = 253  # RFC 1035 2.3.4, without the trailing dot


class KeyType(enum.Enum):
    """Key algorithms the CA generates; each implies its signature hash (`_hash_for`)."""

    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    ED25519 = "ed25519"
    RSA_3072 = "rsa-3072"


@dataclass(frozen=True, slots=True)
class Authority:
    """A loaded CA: the certificate and key that sign leaves, what a leaf must carry above it, and the roots.

    `chain` holds the intermediates a leaf's cert.pem carries after the leaf, leaf-side first (the signer itself
    when it is an intermediate), never a root. `roots` is the trust bundle (several during a rotation), the first
    being the one this CA's chain ends in. `root_key` is the root's key when known: the signer's key when the root
    signs, None when an intermediate signs and the root key is kept elsewhere.
    """

    signer_cert: x509.Certificate
    signer_key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    trust_domain: TrustDomain
    root_key: PrivateKey | None = None


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """A leaf SVID with its intermediates and roots; `key` is None when the caller kept its own key (a CSR)."""

    cert: x509.Certificate
    key: PrivateKey | None
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    def cert_chain_pem(self) -> bytes:
        """The leaf followed by its intermediates: what a TLS peer presents."""
        return pem.render_certificates((self.cert, *self.chain))

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 (file permissions protect it)."""
        if self.key is None:
            raise CertificateError("", "this SVID was issued for an outside key; there is no private key to write")
        return pem.render_private_key(self.key)

    def bundle_pem(self) -> bytes:
        """The trust bundle: the roots a peer's chain must end in."""
        return pem.render_certificates(self.roots)

    def write_to_dir(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write cert.pem, key.pem (0600, skipped when there is no key) and bundle.pem into `path`."""
        files: dict[str, tuple[bytes, int]] = {
            CERT_FILE: (self.cert_chain_pem(), pem.PUBLIC_MODE),
            BUNDLE_FILE: (self.bundle_pem(), pem.PUBLIC_MODE),
        }
        if self.key is not None:
            files[KEY_FILE] = (self.key_pem(), pem.KEY_MODE)
        # The directory is world-listable: the key's own 0600 protects it, and a sidecar running as another user
        # (uid 1337) that was given the files must be able to reach them.
        pem.write_files(Path(path), files, force=force, directory_mode=0o755)


# ---------------------------------------------------------------------------------------------------------------
# Keys


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.ECDSA_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    # Ed25519 signs the message itself (RFC 8410): cryptography wants no hash. P-384 pairs with SHA-384 (RFC 5480).
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


# ---------------------------------------------------------------------------------------------------------------
# The one builder


def _build_certificate(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    issuer_public_key: PublicKey,
    not_before: datetime,
    not_after: datetime,
    uri: SpiffeId,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    path_length: int | None = None,
    is_ca: bool,
    name_constraint: TrustDomain | None = None,
) -> x509.Certificate:
    """Every certificate of the CA, root to leaf; what differs is passed in, the profile is fixed here."""
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(uri))]
    san += [x509.IPAddress(address) for address in ip_addresses]
    san += [x509.DNSName(name) for name in dns_names]
    # S-8 (docs/svid-profile.md): a CA only signs certificates (and CRLs); a leaf only signs handshakes.
    key_usage = x509.KeyUsage(
        digital_signature=not is_ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())  # 159 random bits, positive: far beyond the 64 required
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # RFC 5280 §4.1.2.6: the SAN is critical when the subject is empty (a leaf) and should be non-critical when
        # the subject names the certificate (a CA's), so a CA's SAN is not critical.
        .add_extension(x509.SubjectAlternativeName(san), critical=not len(subject))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False)
    )
    if not is_ca:
        # L-9 (docs/svid-profile.md): both usages, so one SVID serves a sidecar as TLS client and as TLS server.
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        builder = builder.add_extension(eku, critical=False)
    if name_constraint is not None:
        # For a URI constraint a bare host matches exactly that host (RFC 5280 4.2.1.10), which is the trust domain.
        constraint = x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(name_constraint.name)], excluded_subtrees=None
        )
        builder = builder.add_extension(constraint, critical=True)
    # cryptography types the hash as a closed list of classes; _hash_for returns one of them or None (Ed25519).
    return builder.sign(issuer_key, _hash_for(issuer_key))  # type: ignore[arg-type]


def _ca_subject(trust_domain: TrustDomain, role: str, public_key: PublicKey) -> x509.Name:
    # Distinct subjects per key, so two roots of one trust domain in a bundle (a rotation) are told apart by name
    # and not only by key identifier.
    key_id = x509.SubjectKeyIdentifier.from_public_key(public_key).digest.hex()[:16]
    common_name = f"{role} {trust_domain.name}"[:64]  # X.520 ub-common-name
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtlsmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, key_id),
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# The CA


def _utc(now: datetime) -> datetime:
    # A naive clock is taken as UTC, the same reading cryptography gives it; everything after compares aware values.
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def create_ca(
    trust_domain: TrustDomain,
    *,
    now: datetime,
    key_type: KeyType = KeyType.ECDSA_P256,
    ttl: timedelta = DEFAULT_CA_TTL,
    intermediate: bool = False,
    name_constraint: bool = False,
) -> Authority:
    """A new self-signed root for `trust_domain`, and with `intermediate` an intermediate that does the signing."""
    now = _utc(now)
    if ttl <= timedelta(0):
        raise CertificateError("", f"the CA lifetime must be positive, not {format_timedelta(ttl)}")
    not_before, not_after = now - BACKDATE, now + ttl
    constraint = trust_domain if name_constraint else None
    root_key = generate_key(key_type)
    root_public = pem.check_public_key(root_key.public_key())
    root_name = _ca_subject(trust_domain, "mtlsmesh root CA", root_public)
    root = _build_certificate(
        subject=root_name,
        public_key=root_public,
        issuer=root_name,
        issuer_key=root_key,
        issuer_public_key=root_public,
        not_before=not_before,
        not_after=not_after,
        uri=trust_domain.id,
        path_length=1,
        is_ca=True,
        name_constraint=constraint,
    )
    if not intermediate:
        return Authority(
            signer_cert=root, signer_key=root_key, chain=(), roots=(root,), trust_domain=trust_domain, root_key=root_key
        )
    signer_key = generate_key(key_type)
    signer_public = pem.check_public_key(signer_key.public_key())
    signer = _build_certificate(
        subject=_ca_subject(trust_domain, "mtlsmesh intermediate CA", signer_public),
        public_key=signer_public,
        issuer=root_name,
        issuer_key=root_key,
        issuer_public_key=root_public,
        not_before=not_before,
        not_after=not_after,
        uri=trust_domain.id,
        path_length=0,
        is_ca=True,
        name_constraint=constraint,
    )
    return Authority(
        signer_cert=signer,
        signer_key=signer_key,
        chain=(signer,),
        roots=(root,),
        trust_domain=trust_domain,
        root_key=root_key,
    )


def issue_svid(
    authority: Authority,
    spiffe_id: SpiffeId,
    *,
    now: datetime,
    ttl: timedelta = DEFAULT_SVID_TTL,
    dns_names: Iterable[str] = (),
    key_type: KeyType = KeyType.ECDSA_P256,
    public_key: PublicKey | None = None,
    ip_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
) -> IssuedSvid:
    """Sign a leaf SVID for `spiffe_id`: a fresh key of `key_type`, or the caller's `public_key` (then key=None).
    `ip_addresses` become IP SANs (the CA service's own certificate, for clients that dial it by address).

    Refuses an ID that names no workload (root path), an ID over 2048 bytes or outside the CA's trust domain,
    and a lifetime that would outlast the signing certificate (the message says until when it could go).
    """
    now = _utc(now)
    text = str(spiffe_id)
    if len(text.encode()) > MAX_ID_BYTES:
        raise IdentityError(text, f"longer than {MAX_ID_BYTES} bytes; the CA does not issue such IDs", "ID-11")
    spiffe_id = parse_spiffe_id(text)  # re-check an ID that was built without the parser
    if spiffe_id.is_root:
        raise IdentityError(text, "a leaf SVID needs a path; 'spiffe://<td>' alone names the trust domain", "L-2")
    if spiffe_id.trust_domain != authority.trust_domain:
        raise IdentityError(
            text, f"not in this CA's trust domain {authority.trust_domain.name!r}; it signs only its own", "S-5"
        )
    names = tuple(parse_dns_name(name) for name in dns_names)
    if ttl <= timedelta(0):
        raise CertificateError("", f"the SVID lifetime must be positive, not {format_timedelta(ttl)}")
    signer_start = authority.signer_cert.not_valid_before_utc
    signer_end = authority.signer_cert.not_valid_after_utc
    if now >= signer_end:
        raise CertificateError("", f"the signing CA expired at {format_time(signer_end)}; create a new one")
    if now < signer_start:
        raise CertificateError("", f"the signing CA is not valid before {format_time(signer_start)}")
    not_after = now + ttl
    if not_after > signer_end:
        raise CertificateError(
            "",
            f"a TTL of {format_timedelta(ttl)} ends {format_time(not_after)}, after the signing CA expires; "
            f"it could go until {format_time(signer_end)} (a TTL of at most {format_timedelta(signer_end - now)})",
        )
    key: PrivateKey | None = None
    if public_key is None:
        key = generate_key(key_type)
        public_key = key.public_key()
    leaf = _build_certificate(
        subject=x509.Name([]),
        public_key=pem.check_public_key(public_key),
        issuer=authority.signer_cert.subject,
        issuer_key=authority.signer_key,
        issuer_public_key=pem.check_public_key(authority.signer_key.public_key()),
        # Never before the signer itself: a chain whose leaf predates its CA confuses strict verifiers.
        not_before=max(now - BACKDATE, signer_start),
        not_after=not_after,
        uri=spiffe_id,
        dns_names=names,
        ip_addresses=tuple(ip_addresses),
        is_ca=False,
    )
    return IssuedSvid(cert=leaf, key=key, chain=authority.chain, roots=authority.roots)


def parse_dns_name(name: str) -> str:
    """A DNS SAN: LDH labels, optionally a leading `*.` wildcard label; returned lowercase."""
    host = name[2:] if name.startswith("*.") else name
    labels = host.split(".")
    if not host or len(name) > _MAX_DNS_NAME or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise CertificateError("", f"{name!r} is not a valid DNS name (letters, digits, '-', labels joined by '.')")
    return name.lower()


# ---------------------------------------------------------------------------------------------------------------
# A CA directory


def save_authority(authority: Authority, directory: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write the CA into `directory`: root.pem, bundle.pem, root-key.pem (when known), intermediate{,-key}.pem."""
    root = _chain_root(authority)
    files: dict[str, tuple[bytes, int]] = {
        ROOT_CERT_FILE: (pem.render_certificates([root]), pem.PUBLIC_MODE),
        BUNDLE_FILE: (pem.render_certificates(authority.roots), pem.PUBLIC_MODE),
    }
    if authority.root_key is not None:
        files[ROOT_KEY_FILE] = (pem.render_private_key(authority.root_key), pem.KEY_MODE)
    if authority.chain:
        files[INTERMEDIATE_CERT_FILE] = (pem.render_certificates(authority.chain), pem.PUBLIC_MODE)
        files[INTERMEDIATE_KEY_FILE] = (pem.render_private_key(authority.signer_key), pem.KEY_MODE)
    pem.check_writable(Path(directory), CA_FILES, force=force)  # any file of another CA there counts as existing
    pem.write_files(Path(directory), files, force=force)
    # A replaced CA must not leave a file of the old one behind: load_authority would sign with a stale
    # intermediate under the new root.
    for name in CA_FILES:
        if name not in files:
            (Path(directory) / name).unlink(missing_ok=True)


def _chain_root(authority: Authority) -> x509.Certificate:
    top = authority.chain[-1] if authority.chain else authority.signer_cert
    for root in authority.roots:
        if root.subject == top.issuer:
            return root
    raise CertificateError("", "no root in the bundle issued the signing certificate")


def _exists(path: Path, *, directory: bool = False) -> bool:
    """`Path.exists`/`is_dir`, with the errors they do not swallow (EACCES on a parent) as a `CertificateError`."""
    try:
        return path.is_dir() if directory else path.exists()
    except OSError as exc:
        raise CertificateError(str(path), f"cannot read: {exc.strerror or exc}") from exc


def load_authority(directory: str | os.PathLike[str]) -> Authority:
    """Read a CA directory written by `save_authority`: the intermediate signs if there is one, else the root.

    bundle.pem (the roots peers trust, possibly several) is optional; without it the root alone is the bundle.
    Every key is checked against its certificate and the signer must be a CA for the trust domain in its URI SAN.
    """
    base = Path(directory)
    if not _exists(base, directory=True):
        raise CertificateError(str(base), "no CA directory here (`mtlsmesh ca init` creates one)")
    root_path = base / ROOT_CERT_FILE
    (root, *extra) = pem.load_certificates(root_path)
    if extra:
        raise CertificateError(str(root_path), "holds more than one certificate; expected the root alone")
    root_key_path = base / ROOT_KEY_FILE
    root_key = pem.load_private_key(root_key_path) if _exists(root_key_path) else None
    if root_key is not None:
        pem.check_key_matches(root, root_key, str(root_key_path))
    intermediate_path = base / INTERMEDIATE_CERT_FILE
    if _exists(intermediate_path):
        chain = pem.load_certificates(intermediate_path)
        signer_cert, signer_path, signer_key_path = chain[0], intermediate_path, base / INTERMEDIATE_KEY_FILE
        signer_key = pem.load_private_key(signer_key_path)
        pem.check_key_matches(signer_cert, signer_key, str(signer_key_path))
        try:
            chain[-1].verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateError(str(intermediate_path), f"was not issued by {ROOT_CERT_FILE}") from exc
    else:
        if root_key is None:
            raise CertificateError(str(root_key_path), "no such file, and no intermediate to sign with instead")
        chain, signer_cert, signer_key, signer_path = (), root, root_key, root_path
    bundle_path = base / BUNDLE_FILE
    roots = pem.load_certificates(bundle_path) if _exists(bundle_path) else (root,)
    if root not in roots:
        raise CertificateError(str(bundle_path), f"does not hold the CA's own {ROOT_CERT_FILE}")
    roots = (root, *(r for r in roots if r != root))
    trust_domain = svid.ca_spiffe_id(signer_cert, str(signer_path)).trust_domain
    return Authority(
        signer_cert=signer_cert,
        signer_key=signer_key,
        chain=chain,
        roots=roots,
        trust_domain=trust_domain,
        root_key=root_key,
    )


# ---------------------------------------------------------------------------------------------------------------
# Human-readable times


def format_time(moment: datetime) -> str:
    return durations.format_time(moment)


def format_timedelta(delta: timedelta) -> str:
    """`3d4h`, `23h59m`, `45s`, `-2h`: the two largest units, which is all a person reads."""
    return durations.format_duration(delta.total_seconds())
