"""The sidecar's credentials: its SVID and trust bundle loaded from files, and reloaded when the files change.

What it does: `load_credentials` reads cert (leaf + intermediates), key and bundle, checks them (PEM parses, the key
matches the leaf, the leaf is a valid SVID of our trust domain and chains to the bundle, it is within its validity
period) and builds a fresh server and client TLS context. `CredentialStore.serve_reload` polls the files every
`reload_interval` (stat of the resolved path: a Kubernetes Secret volume swaps a `..data` symlink, so the inode
changes) and swaps in new material; new handshakes use it, open connections keep the context they started with.
A bad new file is logged and refused while the old material keeps serving.

`CredentialSource` is what the listeners and the admin endpoints use of a store: `CredentialStore` here (files)
and `agent.IdentityAgent` (an SVID from the CA service) are its two implementations.

What it does not: issue or renew certificates (see `ca` and `agent`), or watch with inotify (polling is simple and
enough).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto

from mtlsmesh import durations, handshake, pem, svid
from mtlsmesh.config import CredentialFiles
from mtlsmesh.errors import CertificateError
from mtlsmesh.identity import SpiffeId, TrustDomain

log = logging.getLogger("mtlsmesh.credentials")

FileStamp = tuple[pem.FileStamp, ...]  # one per file: cert, key, bundle


@dataclass(frozen=True, slots=True)
class Credentials:
    """One loaded generation of credentials: what the next handshakes use."""

    spiffe_id: SpiffeId
    material: handshake.Material
    server_context: SSL.Context
    client_context: SSL.Context
    not_after: datetime
    fingerprint: str  # SHA-256 of the leaf, hex: names the generation in logs and the admin page
    stamp: FileStamp

    def describe(self) -> dict[str, object]:
        """What the admin endpoint shows: public facts only, never key material."""
        leaf = self.material.chain[0]
        return {
            "spiffe_id": str(self.spiffe_id),
            "serial": format(leaf.serial_number, "x"),
            "not_before": durations.format_time(leaf.not_valid_before_utc),
            "not_after": durations.format_time(self.not_after),
            "sha256": self.fingerprint,
            "intermediates": len(self.material.chain) - 1,
            "chain_issuer": self.material.chain[-1].issuer.rfc4514_string(),  # the root the bundle must hold
            "roots": [root.subject.rfc4514_string() or _uri(root) for root in self.material.roots],
        }


def _uri(cert: x509.Certificate) -> str:
    try:
        return str(svid.ca_spiffe_id(cert))
    except CertificateError:  # only for display; a root without a SPIFFE ID is still a root
        return format(cert.serial_number, "x")


def stamp_files(files: CredentialFiles) -> FileStamp:
    """Identity of the three files as they are now; raises OSError when one is missing."""
    return tuple(pem.file_stamp(path) for path in (files.cert, files.key, files.bundle))


def load_credentials(files: CredentialFiles, trust_domain: TrustDomain, *, now: datetime | None = None) -> Credentials:
    """Read, check and build; raises `CertificateError` naming the file and the problem in one line."""
    now = now or datetime.now(UTC)
    try:
        stamp = stamp_files(files)
    except FileNotFoundError as exc:
        raise CertificateError(exc.filename or files.cert, "no such file") from exc
    except OSError as exc:
        raise CertificateError(exc.filename or files.cert, f"cannot read: {exc.strerror or exc}") from exc
    chain = pem.load_certificates(files.cert)
    key = pem.load_private_key(files.key)
    roots = pem.load_certificates(files.bundle)
    leaf = chain[0]
    pem.check_key_matches(leaf, key, files.key)
    spiffe_id = svid.leaf_spiffe_id(leaf, files.cert)
    if spiffe_id.trust_domain != trust_domain:
        raise CertificateError(files.cert, f"the SVID {spiffe_id} is not in trust domain {trust_domain}")
    if now < leaf.not_valid_before_utc:
        raise CertificateError(
            files.cert, f"the SVID is not valid before {durations.format_time(leaf.not_valid_before_utc)}"
        )
    if now > leaf.not_valid_after_utc:
        raise CertificateError(files.cert, f"the SVID expired at {durations.format_time(leaf.not_valid_after_utc)}")
    _check_chain(files, chain, roots)
    material = handshake.Material(chain, key, roots)
    try:
        server_context = handshake.build_context(material, handshake.Side.SERVER)
        client_context = handshake.build_context(material, handshake.Side.CLIENT)
    except CertificateError as exc:
        raise CertificateError(files.cert, exc.message) from exc
    return Credentials(
        spiffe_id=spiffe_id,
        material=material,
        server_context=server_context,
        client_context=client_context,
        not_after=leaf.not_valid_after_utc,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        stamp=stamp,
    )


def _check_chain(
    files: CredentialFiles, chain: tuple[x509.Certificate, ...], roots: tuple[x509.Certificate, ...]
) -> None:
    """Our own SVID must verify against our bundle, as a peer will check it (same OpenSSL, same store)."""
    check_chain(chain, roots, files.cert, f"the bundle {files.bundle}")


def check_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], source: str, bundle: str = "the bundle"
) -> None:
    """`chain` (leaf first) verifies against `roots` now, with OpenSSL; `CertificateError` naming `source` if not."""
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    untrusted = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(chain[0]), untrusted)
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise CertificateError(source, f"the SVID does not chain to {bundle}: {exc}") from exc


class CredentialSource(Protocol):
    """What the listeners and the admin endpoints use of a credential store: the generation the next handshakes
    use, counters for the metrics, and the task `serve_sidecar` runs to keep it fresh."""

    reloads: int
    reload_failures: int

    @property
    def current(self) -> Credentials: ...

    async def serve_reload(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...


class CredentialStore:
    """The current credentials, swapped atomically on a successful reload."""

    def __init__(self, files: CredentialFiles, trust_domain: TrustDomain, initial: Credentials) -> None:
        self.files = files
        self.trust_domain = trust_domain
        self.current = initial
        self.reloads = 0
        self.reload_failures = 0
        self._last_attempt: FileStamp = initial.stamp

    @classmethod
    def load(cls, files: CredentialFiles, trust_domain: TrustDomain) -> CredentialStore:
        return cls(files, trust_domain, load_credentials(files, trust_domain))

    def check_once(self, *, force: bool = False) -> bool:
        """Reload when the files changed since the last attempt (`force`: whether or not they did, as on SIGHUP).
        True when new credentials were swapped in."""
        try:
            stamp = stamp_files(self.files)
        except OSError as exc:
            if self._last_attempt != ():
                reason = f"cannot stat: {exc}"
                log.warning("event=reload_refused reason=%r keeping=%s", reason, self.current.fingerprint)
                self._last_attempt = ()
                self.reload_failures += 1
            return False
        if stamp == self._last_attempt and not force:
            return False
        # Remember the attempt even when it fails: a half-written update is retried when the files change again
        # (the next write finishes it), not logged every poll.
        self._last_attempt = stamp
        try:
            fresh = load_credentials(self.files, self.trust_domain)
        except CertificateError as exc:
            self.reload_failures += 1
            log.warning("event=reload_refused reason=%r keeping=%s", str(exc), self.current.fingerprint)
            return False
        except Exception as exc:  # a bug in the checks must not end a serving sidecar: keep the old SVID, loudly
            self.reload_failures += 1
            reason = f"unexpected {type(exc).__name__}: {exc}"
            log.error("event=reload_refused reason=%r keeping=%s", reason, self.current.fingerprint, exc_info=True)
            return False
        self.current = fresh
        self.reloads += 1
        log.info(
            "event=credentials_reloaded spiffe_id=%s sha256=%s not_after=%s",
            fresh.spiffe_id,
            fresh.fingerprint,
            durations.format_time(fresh.not_after),
        )
        return True

    async def serve_reload(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the files forever."""
        task_status.started()
        while True:
            await trio.sleep(self.files.reload_interval)
            self.check_once()
