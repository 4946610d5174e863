"""PEM files in and out: certificates, private keys and certificate requests, and all-or-nothing writes.

`parse_*` turns bytes into values and `load_*` reads a file first; every failure is a `CertificateError` naming
the file and what is wrong with it (no PEM block, corrupt DER, an encrypted or unsupported key, a key that does
not match its certificate, a request whose signature does not verify). `write_files` writes a set of files into
one directory, checking every target before it writes any and renaming temporary files into place, so a refusal
or a crash leaves no half-written output.

What this module does not do: decide what a certificate means (see `svid`) or make one (see `ca`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mtlsmesh.errors import CertificateError

# The key algorithms the mesh uses (ca.KeyType generates them; a CSR may also bring RSA >= 2048).
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
MIN_RSA_BITS = 2048  # the smallest RSA key a CSR may bring; we generate 3072

KEY_MODE = 0o600  # private keys: the owner alone
PUBLIC_MODE = 0o644  # certificates and bundles


def key_type_name(key: PrivateKey | PublicKey | object) -> str:
    """A short human name for a key (`ecdsa-p256`, `rsa-2048`, `ed25519`), or the class name when unknown."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        names = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384", "secp521r1": "ecdsa-p521"}
        return names.get(key.curve.name, f"ecdsa-{key.curve.name}")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def check_public_key(key: object, source: str = "") -> PublicKey:
    """Accept only the public keys we would generate ourselves (P-256, P-384, Ed25519, RSA >= 2048)."""
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key
    raise CertificateError(
        source, f"unsupported public key {key_type_name(key)}; use ECDSA P-256/P-384, Ed25519 or RSA >= 2048"
    )


def render_certificates(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def render_private_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def parse_certificates(data: bytes, source: str) -> tuple[x509.Certificate, ...]:
    """All certificates in a PEM blob, in order; a blob with none, or a corrupt one, is an error."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(source, "no PEM certificate found")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(source, f"corrupt PEM certificate: {exc}") from exc
    return tuple(certs)


def parse_private_key(data: bytes, source: str) -> PrivateKey:
    """One unencrypted private key (PKCS#8, or the traditional EC/RSA forms) of a supported type."""
    if b"PRIVATE KEY-----" not in data:
        raise CertificateError(source, "no PEM private key found")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(source, f"corrupt or encrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(source, f"unsupported private key type {type(key).__name__}")
    check_public_key(key.public_key(), source)
    return key


def check_key_matches(cert: x509.Certificate, key: PrivateKey, source: str) -> None:
    """Refuse a private key that does not belong to the certificate (comparing the public halves)."""
    encoding, public_format = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(encoding, public_format) != key.public_key().public_bytes(
        encoding, public_format
    ):
        raise CertificateError(source, "the private key does not match the certificate")


def parse_csr_public_key(data: bytes, source: str) -> PublicKey:
    """The public key of a PEM certificate request whose signature verifies; nothing else of it is used.

    The CA signs the identity its caller is told to sign, never the subject or SANs a request claims
    (docs/ARCHITECTURE.md §7); the self-signature only proves the requester holds the matching private key.
    """
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CertificateError(source, f"not a PEM certificate request: {exc}") from exc
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(source, f"unreadable certificate request: {exc}") from exc
    if not valid:
        raise CertificateError(source, "the request's signature does not verify; refusing to sign its key")
    return check_public_key(public_key, source)


def load_csr_public_key(path: str | os.PathLike[str]) -> PublicKey:
    return parse_csr_public_key(_read(Path(path)), str(path))


def load_certificates(path: str | os.PathLike[str]) -> tuple[x509.Certificate, ...]:
    return parse_certificates(_read(Path(path)), str(path))


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    return parse_private_key(_read(Path(path)), str(path))


FileStamp = tuple[str, int, int, int, int]  # resolved path, inode, mode, mtime (ns), size


def file_stamp(path: str | os.PathLike[str]) -> FileStamp:
    """What a file is right now, to notice that it changed: through a symlink swap (a Kubernetes Secret volume), a
    rewrite, or a chmod (which alone changes none of the others). Raises OSError when it cannot be read."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return (real, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_size)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(str(path), "no such file") from exc
    except OSError as exc:
        raise CertificateError(str(path), f"cannot read: {exc.strerror or exc}") from exc


def check_writable(directory: Path, names: Iterable[str], *, force: bool) -> None:
    """Refuse, before anything is written or generated, outputs that exist (unless `force`) or cannot be files."""
    try:
        not_a_directory = directory.exists() and not directory.is_dir()
    except OSError as exc:  # a parent we may not search (EACCES), a name too long
        raise CertificateError(str(directory), f"cannot write here: {exc.strerror or exc}") from exc
    if not_a_directory:
        raise CertificateError(str(directory), "exists and is not a directory")
    for name in names:
        target = directory / name
        try:
            exists, is_dir = target.exists(), target.is_dir()
        except OSError as exc:  # a name too long, a path through a file, no permission
            raise CertificateError(str(target), f"cannot write here: {exc.strerror or exc}") from exc
        if is_dir:
            raise CertificateError(str(target), "is a directory")
        if exists and not force:
            raise CertificateError(str(target), "already exists (--force replaces it)")


def write_files(
    directory: Path, files: Mapping[str, tuple[bytes, int]], *, force: bool, directory_mode: int = 0o700
) -> None:
    """Write several files into `directory` (created with `directory_mode` if missing) or none of them.

    Every target is checked before anything is written; each file goes to a temporary name in the same directory
    with its final mode set before any content, then all are renamed into place.
    """
    check_writable(directory, files, force=force)
    created = not directory.exists()
    try:
        directory.mkdir(mode=directory_mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(str(directory), f"cannot create: {exc.strerror or exc}") from exc
    temps: dict[str, str] = {}
    done = False
    try:
        for name, (data, mode) in files.items():
            fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            temps[name] = temp
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for name, temp in list(temps.items()):
            os.replace(temp, directory / name)
            del temps[name]
        done = True
    except OSError as exc:
        raise CertificateError(str(directory), f"cannot write: {exc.strerror or exc}") from exc
    finally:
        for temp in temps.values():
            Path(temp).unlink(missing_ok=True)
        if created and not done and not any(directory.iterdir()):
            directory.rmdir()  # leave no empty directory behind a failed first write
