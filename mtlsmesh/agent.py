"""The sidecar's identity from the CA service: a key made in memory, an SVID asked for, renewed and swapped in.

What it does: `IdentityAgent` is the second implementation of `credentials.CredentialSource` (the first reads
files). `enroll` gets the first SVID before the sidecar binds anything: it makes an ECDSA P-256 key, sends a CSR
for it with the pod's projected service-account token (read from its file afresh every time) and keeps retrying,
with capped exponential backoff and jitter, until the CA answers. `serve_reload` then keeps the SVID fresh:

- renewal at `renew_fraction` of the lifetime (counted from when the SVID arrived, with +-10 % jitter), or at
  once when `renew_now` asks (SIGHUP), with a new key, over mTLS with the current SVID as client certificate,
  falling back to the token when that fails;
- the trust bundle, fetched from `GET /v1/bundle` at the CA's refresh hint; a change of roots builds new contexts
  around the same SVID (and renews at once if our own SVID no longer chains to the new roots).

Each new generation is swapped in the way a file reload is: the next handshakes use it, open connections keep what
they started with. When the CA cannot be reached the current SVID stays in use, every retry waits longer (up to
`max_backoff`), and one line is logged when renewals start failing, one when they work again and one when the SVID
expires meanwhile, not one per retry (`event=svid_renewal_failing`, `svid_renewal_recovered`, `svid_expired`; for
the first SVID `svid_enrollment_failing`, `svid_enrollment_recovered`). Every CA connection verifies the CA's chain
against the roots we hold and that its SPIFFE ID is `identity.ca_identity` (`caclient`).

What it does not: write any file (the key exists in this process only), parse config, or serve connections.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import caclient, caproto, handshake, pem, svid
from mtlsmesh.config import IdentityConfig
from mtlsmesh.credentials import Credentials, check_chain
from mtlsmesh.errors import CertificateError, ConfigError, MeshError
from mtlsmesh.identity import TrustDomain

log = logging.getLogger("mtlsmesh.identity")

CALL_TIMEOUT = 10.0  # one call to the CA, connect to answer
MIN_BACKOFF = 1.0  # the first retry after a failure, in seconds; then doubling ...
MAX_BACKOFF = 60.0  # ... up to this
JITTER = 0.1  # renewals spread by +-10 % of the renewal point, retries by up to -50 %
MIN_REFRESH = 1.0  # bounds on the CA's bundle refresh hint, in seconds
MAX_REFRESH = 3600.0
DEFAULT_REFRESH = 300.0


@dataclass(frozen=True, slots=True)
class Issued:
    """A swapped-in SVID and when it arrived (renewal points are counted from then: not_before is backdated)."""

    credentials: Credentials
    received: datetime


def build_credentials(
    chain: tuple[x509.Certificate, ...],
    key: ec.EllipticCurvePrivateKey,
    roots: tuple[x509.Certificate, ...],
    trust_domain: TrustDomain,
) -> Credentials:
    """Check an SVID the CA sent for our key (ours, an SVID of our trust domain, chaining to `roots`, valid now) and
    build the TLS contexts around it. Raises `CertificateError`."""
    source = "the CA's answer"
    leaf = chain[0]
    pem.check_key_matches(leaf, key, source)
    spiffe_id = svid.leaf_spiffe_id(leaf, source)
    if spiffe_id.trust_domain != trust_domain:
        raise CertificateError(source, f"the SVID {spiffe_id} is not in trust domain {trust_domain}")
    now = datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        until = caproto.format_time(leaf.not_valid_after_utc)
        raise CertificateError(source, f"the SVID is not valid now (it is valid until {until})")
    check_chain(chain, roots, source, "the CA's trust bundle")
    material = handshake.Material(chain, key, roots)
    return Credentials(
        spiffe_id=spiffe_id,
        material=material,
        server_context=handshake.build_context(material, handshake.Side.SERVER),
        client_context=handshake.build_context(material, handshake.Side.CLIENT),
        not_after=leaf.not_valid_after_utc,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        stamp=(),
    )


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """A CSR that only proves we hold `key`: the CA decides the identity, so it names none."""
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()


class IdentityAgent:
    """See the module docstring. Construct it (reading the bundle file) before anything binds; then `enroll`."""

    def __init__(
        self,
        cfg: IdentityConfig,
        trust_domain: TrustDomain,
        *,
        call_timeout: float = CALL_TIMEOUT,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.trust_domain = trust_domain
        ca_identity = cfg.ca_identity or caproto.ca_workload_id(trust_domain)
        if ca_identity.trust_domain != trust_domain:
            raise ConfigError("identity.ca_identity", f"{ca_identity} is not in trust domain {trust_domain}")
        self.endpoint = caclient.CaEndpoint(cfg.ca_address.host, cfg.ca_address.port, ca_identity)
        self.initial_roots = pem.load_certificates(cfg.bundle)  # CertificateError: one line and exit 2 at start
        self.call_timeout, self.min_backoff, self.max_backoff = call_timeout, min_backoff, max_backoff
        self.rng = rng or random.Random()
        self.reloads = 0
        self.reload_failures = 0
        self.received = 0  # SVIDs received from the CA, the first one included
        self.refresh_hint = DEFAULT_REFRESH
        self._issued: Issued | None = None
        self._failing: str | None = None  # why requests to the CA fail, while they do (logged when it starts)
        self._bundle_failing = False
        self._expired_logged = False
        self._renew_now = trio.Event()

    # --- the CredentialSource interface --------------------------------------------------------------------------

    @property
    def current(self) -> Credentials:
        if self._issued is None:
            raise RuntimeError("no SVID yet: enroll first")
        return self._issued.credentials

    async def serve_reload(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew and follow the bundle, forever."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_renewed)
            nursery.start_soon(self._follow_bundle)
            task_status.started()

    # --- talking to the CA ---------------------------------------------------------------------------------------

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """What we trust the CA (and every peer) with: the CA's latest bundle, the bundle file before that."""
        return self._issued.credentials.material.roots if self._issued is not None else self.initial_roots

    def _token(self) -> str:
        try:
            token = Path(self.cfg.token).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise caclient.CaError(f"cannot read the token file {self.cfg.token}: {reason}") from None
        if not token:
            raise caclient.CaError(f"the token file {self.cfg.token} is empty")
        return token

    async def _sign(self, *, use_svid: bool) -> tuple[str, Issued]:
        """One attempt: (the credential used, the new SVID). Raises `CaError` or `CertificateError`."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = caproto.SignRequest(make_csr(key), max(1, int(self.cfg.ttl)))
        token = None if use_svid else self._token()
        material = self.current.material if use_svid else None
        try:
            with trio.fail_after(self.call_timeout):
                answer = await caclient.sign(self.endpoint, self.roots, request, token=token, material=material)
        except trio.TooSlowError:
            message = f"the CA at {self.endpoint} did not answer within {self.call_timeout:g} s"
            raise caclient.CaError(message, unreachable=True) from None
        received = datetime.now(UTC)
        credentials = build_credentials(answer.chain, key, answer.bundle, self.trust_domain)
        if self._issued is not None and credentials.spiffe_id != self.current.spiffe_id:
            # A sidecar's identity does not change under it: a different token mounted, or a CA that signed the
            # wrong name, must not turn it into another workload. Keep the SVID we have, loudly.
            raise CertificateError(
                "the CA's answer",
                f"the SVID names {credentials.spiffe_id}, not this sidecar's {self.current.spiffe_id}",
            )
        return ("svid" if use_svid else "token"), Issued(credentials, received)

    async def renew_once(self) -> str:
        """One renewal: with the current SVID while it is valid, else (or when that fails) with the token. Swaps
        the new SVID in and returns the credential used; raises `CaError`/`CertificateError` when both fail."""
        svid_error: Exception | None = None
        valid = self._issued is not None and self.current.not_after > datetime.now(UTC)
        result: tuple[str, Issued] | None = None
        if valid:
            try:
                result = await self._sign(use_svid=True)
            except caclient.CaError as exc:
                if exc.unreachable:
                    raise  # the token would not get through either
                svid_error = exc
            except CertificateError as exc:
                svid_error = exc
        if result is None:
            try:
                result = await self._sign(use_svid=False)
            except (caclient.CaError, CertificateError) as exc:
                if svid_error is not None:
                    raise caclient.CaError(f"with our SVID: {svid_error}; with the token: {exc}") from None
                raise
        credential, issued = result
        self._install(issued, credential, fallback=str(svid_error) if svid_error is not None else None)
        return credential

    def _install(self, issued: Issued, credential: str, *, fallback: str | None = None) -> None:
        first = self._issued is None
        self._issued = issued
        self._expired_logged = False
        self._renew_now = trio.Event()
        creds = issued.credentials
        if not first:
            self.reloads += 1
        self.received += 1
        leaf = creds.material.chain[0]
        extra = f" fallback_from_svid={fallback!r}" if fallback is not None else ""
        log.info(
            "event=%s spiffe_id=%s credential=%s serial=%x not_after=%s ca=%s%s",
            "svid_issued" if first else "svid_renewed",
            creds.spiffe_id,
            credential,
            leaf.serial_number,
            caproto.format_time(creds.not_after),
            self.endpoint,
            extra,
        )

    # --- the loops -----------------------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        """Capped exponential, with jitter so that a fleet of sidecars does not retry in step."""
        delay: float = min(self.max_backoff, self.min_backoff * 2.0 ** min(attempt, 30))
        return delay * self.rng.uniform(0.5, 1.0)

    def _failed(self, exc: Exception, retry_in: float, what: str = "renewal") -> None:
        self.reload_failures += 1
        reason = str(exc)
        if self._failing is None:
            left = self._seconds_left()
            log.warning(
                "event=svid_%s_failing reason=%r svid_seconds_left=%s retrying=backoff",
                what,
                reason,
                "-" if left is None else f"{left:.0f}",
            )
        else:
            log.debug("event=svid_%s_retry reason=%r retry_in=%.1f", what, reason, retry_in)
        self._failing = reason
        left = self._seconds_left()
        if left is not None and left <= 0 and not self._expired_logged:
            self._expired_logged = True
            expired = caproto.format_time(self.current.not_after)
            log.error("event=svid_expired spiffe_id=%s not_after=%s", self.current.spiffe_id, expired)

    def _recovered(self, what: str = "renewal") -> None:
        if self._failing is not None:
            log.info("event=svid_%s_recovered after=%r", what, self._failing)
            self._failing = None

    def _seconds_left(self) -> float | None:
        if self._issued is None:
            return None
        return (self.current.not_after - datetime.now(UTC)).total_seconds()

    async def enroll(self) -> None:
        """The first SVID, with the token; retried until the CA gives one."""
        attempt = 0
        while self._issued is None:
            try:
                credential, issued = await self._sign(use_svid=False)
            except (caclient.CaError, CertificateError) as exc:
                delay = self._backoff(attempt)
                self._failed(exc, delay, "enrollment")
                attempt += 1
                await trio.sleep(delay)
                continue
            self._install(issued, credential)
            self._recovered("enrollment")

    def renew_now(self) -> bool:
        """Ask the renewal loop to renew at once instead of at its next renewal point (SIGHUP does); False, and
        nothing asked, before the first SVID (enrolment already retries as fast as its backoff allows)."""
        if self._issued is None:
            return False
        log.info("event=svid_renewal_requested spiffe_id=%s", self.current.spiffe_id)
        self._renew_now.set()
        return True

    def renew_at(self) -> datetime:
        """When the current SVID should be renewed: its renewal fraction, jittered, from when it arrived."""
        assert self._issued is not None
        received, not_after = self._issued.received, self._issued.credentials.not_after
        fraction = min(0.99, self.cfg.renew_fraction * self.rng.uniform(1 - JITTER, 1 + JITTER))
        return received + (not_after - received) * fraction

    async def _keep_renewed(self) -> None:
        attempt = 0
        while True:
            wait = (self.renew_at() - datetime.now(UTC)).total_seconds()
            with trio.move_on_after(max(0.0, wait)):
                await self._renew_now.wait()
            while True:
                try:
                    await self.renew_once()
                except (caclient.CaError, CertificateError) as exc:
                    delay = self._backoff(attempt)
                    attempt += 1
                    self._failed(exc, delay)
                    await trio.sleep(delay)
                    continue
                attempt = 0
                self._recovered()
                break

    async def _follow_bundle(self) -> None:
        # At once first: the sign answer carries the roots but not the refresh hint.
        while True:
            try:
                with trio.fail_after(self.call_timeout):
                    bundle = await caclient.fetch_bundle(self.endpoint, self.roots)
            except (caclient.CaError, trio.TooSlowError) as exc:
                if not self._bundle_failing:
                    self._bundle_failing = True
                    log.warning("event=bundle_fetch_failing reason=%r", str(exc) or "timeout")
            else:
                if self._bundle_failing:
                    self._bundle_failing = False
                    log.info("event=bundle_fetch_recovered")
                self.refresh_hint = float(bundle.refresh_hint) if bundle.refresh_hint > 0 else DEFAULT_REFRESH
                try:
                    self.apply_bundle(bundle)
                except MeshError as exc:  # a root OpenSSL refuses: keep the contexts we have, and say so
                    self.reload_failures += 1
                    log.warning("event=bundle_refused reason=%r", str(exc))
            await trio.sleep(min(MAX_REFRESH, max(MIN_REFRESH, self.refresh_hint)))

    def apply_bundle(self, bundle: caproto.TrustBundle) -> bool:
        """Swap in contexts trusting `bundle`'s roots when they differ from ours; True when they did."""
        current = self.current
        if set(bundle.roots) == set(current.material.roots):
            return False
        material = current.material
        try:
            check_chain(material.chain, bundle.roots, "our SVID", "the new trust bundle")
            ours_chains = True
        except CertificateError:
            ours_chains = False  # our root left the bundle: peers will refuse us; renew under the new one at once
        trusted = handshake.Material(material.chain, material.key, bundle.roots)
        fresh = Credentials(
            spiffe_id=current.spiffe_id,
            material=trusted,
            server_context=handshake.build_context(trusted, handshake.Side.SERVER),
            client_context=handshake.build_context(trusted, handshake.Side.CLIENT),
            not_after=current.not_after,
            fingerprint=current.fingerprint,
            stamp=(),
        )
        assert self._issued is not None
        self._issued = Issued(fresh, self._issued.received)
        self.reloads += 1
        chains = str(ours_chains).lower()
        log.info("event=bundle_updated roots=%d sequence=%d svid_chains=%s", len(bundle.roots), bundle.sequence, chains)
        if not ours_chains:
            self._renew_now.set()
        return True
