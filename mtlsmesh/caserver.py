"""The CA service (`mtlsmesh ca serve`): sidecars send a CSR and prove who they are; it answers a short-lived SVID.

What it does: `CaService` holds one *generation* at a time: the authority loaded from the CA directory, the
service's own SVID (`spiffe://<td>/ns/mtlsmesh-system/sa/mtlsmesh-ca`, DNS SAN `mtlsmesh-ca.mtlsmesh-system.svc`,
issued from that authority at start, its key in memory only) in a TLS 1.3 server context that speaks ALPN
`http/1.1`, asks for a client certificate without requiring one and lets OpenSSL verify one that is sent, and the
trust bundle it serves. `check_once` (polled by `serve_reload`) swaps in a new generation when the CA directory
changed and has stopped changing for one poll (an operator's copy of several files is read once it is complete),
reissues the service's own SVID at half its life, and rereads the token issuer's JWKS file; a directory or a JWKS
that does not load is logged and refused while the old one keeps serving. A JWKS URL (`jwtverify.KeyUrl`) is
fetched before the port serves and then by a task of its own, again at once (rate-limited) for a token whose
`kid` it does not know; until a first fetch works, tokens are refused 503 with the reason and renewals with an
SVID are served. New handshakes use the new generation, open connections keep theirs.

A request (`handle`) is judged in this order: the credential (a service-account token in `Authorization: Bearer`,
else the caller's current SVID as TLS client certificate), the rate limit of that identity (a token bucket), the
body and its CSR (only the CSR's public key is used; the identity is the credential's), then the signature. A
request with a token is judged by the token, even when the connection also presented a client certificate.
`GET /v1/bundle` and `GET /healthz/ready` need no credential. Every
issuance and every refusal is one key=value log line and a Prometheus counter; a refusal is a status and
`{"error": "<one line>"}`. Whatever one caller does (garbage instead of TLS, a slow request, a flood), it costs that
caller's connection only; everyone else is served.

The CA is stateless: serials are random, the bundle's sequence is derived from the clock when a change is seen,
and several replicas can serve one directory side by side.

What it does not: parse flags (see `cli.ca`), keep any record of what it issued, revoke, or ask the Kubernetes API
whether a token's pod still exists; it never writes a file. With `publish` set it keeps each trust bundle ConfigMap
named current (`bundlepublish`, a task of its own per ConfigMap); that is its one write, and through the Kubernetes
API.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
from cryptography import x509
from OpenSSL import SSL
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from mtlsmesh import bundlepublish, ca, caproto, handshake, http11, jwtverify, kubeapi, pem, svid, tls
from mtlsmesh.addresses import WILDCARD_HOSTS, unmapped_host_port
from mtlsmesh.caproto import Refusal
from mtlsmesh.config import ListenAddr
from mtlsmesh.errors import CertificateError, ConfigError, HandshakeError, IdentityError, MeshError
from mtlsmesh.identity import SpiffeId, TrustDomain
from mtlsmesh.runtime import render_kv
from mtlsmesh.tokens import TokenError, TokenPolicy

log = logging.getLogger("mtlsmesh.ca")

DEFAULT_TTL = timedelta(hours=24)
DEFAULT_RELOAD_INTERVAL = 2.0
DEFAULT_REFRESH_HINT = 300  # seconds: how often clients should fetch the bundle again
HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 1024
MAX_METRICS_CLIENTS = 16  # concurrent scrapes of --metrics-listen; more are closed at once
RATE_BURST = 10.0  # sign requests one identity may make at once ...
RATE_PER_SECOND = 2.0  # ... and on average after that
LIMITS = http11.Limits(max_head=8 * 1024, max_body=caproto.MAX_BODY, read_timeout=10.0, max_requests=100)
KEY_FILES = (ca.ROOT_KEY_FILE, ca.INTERMEDIATE_KEY_FILE)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `mtlsmesh ca serve` was told, checked."""

    directory: str
    listen: tuple[ListenAddr, ...]
    policy: TokenPolicy
    jwks: str  # a file, or an https URL
    ttl: timedelta = DEFAULT_TTL  # the longest SVID it issues, and the lifetime of its own
    metrics_listen: ListenAddr | None = None
    reload_interval: float = DEFAULT_RELOAD_INTERVAL
    refresh_hint: int = DEFAULT_REFRESH_HINT
    extra_names: tuple[str, ...] = ()  # DNS names or IP addresses for its own certificate, beyond the defaults
    rate_burst: float = RATE_BURST
    rate_per_second: float = RATE_PER_SECOND
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    limits: http11.Limits = LIMITS
    # A JWKS URL: whom to trust for it (None: the system's roots), the bearer token file to send (None: none),
    # how often to fetch it, and how soon again for a token with an unknown kid.
    jwks_ca: str | None = None
    jwks_token: str | None = None
    jwks_refresh: float = jwtverify.DEFAULT_REFRESH
    jwks_min_refetch: float = jwtverify.DEFAULT_MIN_REFETCH
    jwks_timeout: float = kubeapi.DEFAULT_TIMEOUT
    publish: tuple[bundlepublish.PublishConfig, ...] = ()  # the trust bundle ConfigMaps to keep current, if any


# ---------------------------------------------------------------------------------------------------------------
# The CA directory


def key_mode_problem(mode: int, file_gid: int, euid: int, egid: int) -> str | None:
    """Why a CA key with these permission bits may not be used, or None. Owner-only (0600, 0400) always passes.
    Group *read* passes only for a process that is not root and whose own group owns the file: what a Kubernetes
    Secret volume gives a pod with `fsGroup` equal to its `runAsGroup` (the kubelet turns 0400 into 0440 and
    gives the file that group; kubernetes/kubernetes#57923). Anything for others, or group write, never passes."""
    group_read_ok = euid != 0 and file_gid == egid and not mode & (stat.S_IWGRP | stat.S_IXGRP)
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and not group_read_ok):
        return (
            f"is accessible by group or others (mode {mode:04o}); the CA's key must be 0600 or 0400, or 0440 in the "
            f"CA process's own group (a pod's fsGroup equal to its runAsGroup)"
        )
    return None


def check_key_modes(directory: str | os.PathLike[str]) -> None:
    """The CA's private keys must be readable by their owner alone (or the CA's own group, see
    `key_mode_problem`): refuse them otherwise."""
    for name in KEY_FILES:
        path = Path(directory) / name
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CertificateError(str(path), f"cannot read: {exc.strerror or exc}") from exc
        problem = key_mode_problem(stat.S_IMODE(info.st_mode), info.st_gid, os.geteuid(), os.getegid())
        if problem is not None:
            raise CertificateError(str(path), f"{problem} (chmod 600 {path})")


DirStamp = tuple[pem.FileStamp | None, ...]


def stamp_directory(directory: str) -> DirStamp:
    """What the CA files are right now (`pem.file_stamp`, so a chmod counts; None for a missing one)."""
    out: list[pem.FileStamp | None] = []
    for name in ca.CA_FILES:
        try:
            out.append(pem.file_stamp(os.path.join(directory, name)))
        except OSError:
            out.append(None)
    return tuple(out)


def load_directory(directory: str) -> ca.Authority:
    check_key_modes(directory)
    return ca.load_authority(directory)


# ---------------------------------------------------------------------------------------------------------------
# One generation: an authority, the service's own SVID and TLS context, and the bundle


@dataclass(frozen=True, slots=True)
class Generation:
    authority: ca.Authority
    own: ca.IssuedSvid
    context: SSL.Context
    renew_own_at: datetime
    bundle: caproto.TrustBundle
    bundle_body: bytes  # the encoded bundle, as served
    stamp: DirStamp


def _own_names(cfg: ServeConfig) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The service's own SANs besides its SPIFFE ID: its Service's DNS name, the addresses it listens on (unless
    wildcards), and what `--san` added. Clients that check hostnames (curl) need one of them."""
    dns, ips = [caproto.CA_SERVICE_DNS], []
    hosts = [addr.host for addr in cfg.listen if addr.host not in WILDCARD_HOSTS] + list(cfg.extra_names)
    for host in hosts:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name = ca.parse_dns_name(host)
            if name not in dns:
                dns.append(name)
            continue
        if address not in ips:
            ips.append(address)
    return dns, ips


def _issue_own(cfg: ServeConfig, authority: ca.Authority, now: datetime) -> tuple[ca.IssuedSvid, SSL.Context]:
    dns, ips = _own_names(cfg)
    ttl = min(cfg.ttl, authority.signer_cert.not_valid_after_utc - now)
    if ttl <= timedelta(0):
        raise CertificateError(
            "", f"the signing CA expired at {ca.format_time(authority.signer_cert.not_valid_after_utc)}"
        )
    own = ca.issue_svid(
        authority, caproto.ca_workload_id(authority.trust_domain), now=now, ttl=ttl, dns_names=dns, ip_addresses=ips
    )
    assert own.key is not None  # issue_svid made the key: it lives in this process only
    material = handshake.Material((own.cert, *own.chain), own.key, authority.roots)
    context = handshake.build_context(
        material, handshake.Side.SERVER, alpn=(caproto.ALPN,), require_peer_certificate=False
    )
    return own, context


def _renew_at(cert: x509.Certificate, issued: datetime) -> datetime:
    # Half of the lifetime from when it was issued: not_before is backdated (ca.BACKDATE) and would bring it forward.
    return issued + (cert.not_valid_after_utc - issued) / 2


# ---------------------------------------------------------------------------------------------------------------
# Rate limit


class RateLimiter:
    """A token bucket per key: `burst` requests at once, then `rate` per second. Buckets that have refilled are
    forgotten when the table grows large (a full bucket is the same as none)."""

    MAX_KEYS = 10_000

    def __init__(self, burst: float, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.clock = burst, rate, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when)

    def allow(self, key: str) -> float:
        """0 when a request may go now (and takes a token); else the seconds until one may."""
        now = self.clock()
        tokens, when = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        if len(self._buckets) >= self.MAX_KEYS and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, when) in self._buckets.items() if tokens + (now - when) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]


# ---------------------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """The service's Prometheus counters, in a registry of its own (several services can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.issued = Counter(
            "mtlsmesh_ca_issued", "SVIDs issued, by credential.", ["credential"], registry=self.registry
        )
        self.refused = Counter(
            "mtlsmesh_ca_refused", "Requests and connections refused, by reason.", ["reason"], registry=self.registry
        )
        self.reloads = Counter("mtlsmesh_ca_reloads", "CA directory reloads.", registry=self.registry)
        self.reload_failures = Counter(
            "mtlsmesh_ca_reload_failures", "CA directory or JWKS changes refused.", registry=self.registry
        )
        self.roots = Gauge("mtlsmesh_ca_bundle_roots", "Roots in the trust bundle.", registry=self.registry)
        self.sequence = Gauge("mtlsmesh_ca_bundle_sequence", "The bundle's spiffe_sequence.", registry=self.registry)
        self.configmap_current = Gauge(
            "mtlsmesh_ca_bundle_configmap_current",
            "1 while the trust bundle ConfigMap is known to hold the roots served (--publish-bundle), else 0.",
            ["configmap"],
            registry=self.registry,
        )
        self.signer_expiry = Gauge(
            "mtlsmesh_ca_signer_expiry_seconds",
            "When the signing certificate expires (Unix time).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------------------------
# The service


@dataclass(slots=True)
class Caller:
    """Who is on the other end of one connection, as far as TLS showed."""

    address: str
    svid: SpiffeId | None = None
    svid_not_after: datetime | None = None
    svid_problem: str | None = None  # a client certificate that verified but breaks the SVID rules


@dataclass(slots=True)
class _Outcome:
    credential: str = "-"
    spiffe_id: str = "-"


@dataclass(slots=True)
class State:
    bound: dict[str, tuple[str, int]] = field(default_factory=dict)
    active: int = 0


class CaService:
    """See the module docstring. Construct it (loading and checking everything) before binding anything."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.limiter = RateLimiter(cfg.rate_burst, cfg.rate_per_second)
        source = jwtverify.check_jwks_source(cfg.jwks)
        self.keys: jwtverify.KeyFile | jwtverify.KeyUrl
        if isinstance(source, kubeapi.HttpsUrl):
            client = kubeapi.Client(cfg.jwks_ca, cfg.jwks_token, cfg.jwks_timeout)
            self.keys = jwtverify.KeyUrl(source, client, refresh=cfg.jwks_refresh, min_refetch=cfg.jwks_min_refetch)
        else:
            self.keys = jwtverify.KeyFile(source)
        self._jwks_failures = 0  # of self.keys, as counted in the metrics
        self.state = State()
        stamp = stamp_directory(cfg.directory)
        self.current = self._generation(load_directory(cfg.directory), stamp, previous=None)
        self._seen = stamp  # the directory as the last poll saw it
        targets = [str(publish.target) for publish in cfg.publish]
        twice = sorted({target for target in targets if targets.count(target) > 1})
        if twice:  # the flags are checked the same way (bundlepublish.parse_targets); this is for other callers
            raise ConfigError("--publish-bundle", f"{', '.join(twice)} is given twice; name each ConfigMap once")
        self.publishers = tuple(bundlepublish.BundlePublisher(publish, self.bundle_pem) for publish in cfg.publish)
        for target in targets:
            self.metrics.configmap_current.labels(configmap=target).set(0)
        self._attempted = stamp  # the directory as last loaded (or refused)

    # --- generations -------------------------------------------------------------------------------------------

    def bundle_pem(self) -> bytes:
        """The roots the service trusts now, as PEM: what the trust bundle ConfigMap holds."""
        return pem.render_certificates(self.current.bundle.roots)

    def _generation(self, authority: ca.Authority, stamp: DirStamp, previous: Generation | None) -> Generation:
        now = datetime.now(UTC)
        own, context = _issue_own(self.cfg, authority, now)
        if previous is not None and previous.bundle.roots == authority.roots:
            bundle = previous.bundle
        else:
            # Increasing with every change, and close to the time the change was seen, so that replicas reading
            # one directory agree roughly without sharing any state.
            last = previous.bundle.sequence if previous is not None else 0
            bundle = caproto.TrustBundle(authority.roots, max(last + 1, int(time.time())), self.cfg.refresh_hint)
        self.metrics.roots.set(len(bundle.roots))
        self.metrics.sequence.set(bundle.sequence)
        self.metrics.signer_expiry.set(authority.signer_cert.not_valid_after_utc.timestamp())
        return Generation(authority, own, context, _renew_at(own.cert, now), bundle, bundle.encode(), stamp)

    def check_once(self) -> None:
        """One poll: the CA directory (once it is stable), the service's own SVID, the JWKS."""
        stamp = stamp_directory(self.cfg.directory)
        previous_seen, self._seen = self._seen, stamp
        if stamp == previous_seen and stamp != self._attempted:
            self._attempted = stamp
            self._reload(stamp)
        elif datetime.now(UTC) >= self.current.renew_own_at:
            self._rotate_own()
        bundle = self.bundle_pem()
        for publisher in self.publishers:
            current = 1 if publisher.published == bundle else 0
            self.metrics.configmap_current.labels(configmap=str(publisher.cfg.target)).set(current)
        self.keys.check_once()  # a URL is fetched by its own task (serve); its failures are counted here too
        if self.keys.reload_failures > self._jwks_failures:
            self.metrics.reload_failures.inc(self.keys.reload_failures - self._jwks_failures)
            self._jwks_failures = self.keys.reload_failures

    def _reload(self, stamp: DirStamp) -> None:
        old = self.current
        try:
            fresh = self._generation(load_directory(self.cfg.directory), stamp, previous=old)
        except MeshError as exc:
            self.metrics.reload_failures.inc()
            log.warning(
                "event=reload_refused dir=%s reason=%r keeping=%s",
                self.cfg.directory,
                str(exc),
                _serial(old.authority.signer_cert),
            )
            return
        except Exception as exc:  # a bug in the checks must not end a serving CA: keep the old authority, loudly
            self.metrics.reload_failures.inc()
            log.error("event=reload_refused dir=%s reason=%r", self.cfg.directory, f"unexpected: {exc}", exc_info=True)
            return
        self.current = fresh
        self.metrics.reloads.inc()
        log.info(
            "event=reloaded dir=%s signer=%s roots=%d bundle_sequence=%d own_serial=%s",
            self.cfg.directory,
            _serial(fresh.authority.signer_cert),
            len(fresh.bundle.roots),
            fresh.bundle.sequence,
            _serial(fresh.own.cert),
        )

    def _rotate_own(self) -> None:
        old, now = self.current, datetime.now(UTC)
        try:
            own, context = _issue_own(self.cfg, old.authority, now)
        except MeshError as exc:
            log.warning("event=own_svid_refused reason=%r keeping=%s", str(exc), _serial(old.own.cert))
            self.current = _replace_renewal(old, now + timedelta(seconds=self.cfg.reload_interval * 10))
            return
        self.current = Generation(
            old.authority, own, context, _renew_at(own.cert, now), old.bundle, old.bundle_body, old.stamp
        )
        log.info(
            "event=own_svid_rotated serial=%s not_after=%s",
            _serial(own.cert),
            caproto.format_time(own.cert.not_valid_after_utc),
        )

    async def serve_reload(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.cfg.reload_interval)
            self.check_once()

    # --- requests ----------------------------------------------------------------------------------------------

    async def _verify_token(self, token: str, trust_domain: TrustDomain) -> SpiffeId:
        keys = self.keys
        if isinstance(keys, jwtverify.KeyUrl) and not keys.current.keys:
            await keys.refetch()  # at most once per min_refetch, whoever asks
            if not keys.current.keys:
                message = f"the token issuer's keys are not available: {keys.problem}"
                raise Refusal(caproto.UNAVAILABLE, "jwks_unavailable", message)
        try:
            return jwtverify.verify_token(token, self.cfg.policy, keys.current.keys, trust_domain)
        except jwtverify.UnknownKidError as exc:
            # A key the issuer may have rotated in since the last fetch: fetch again (rate-limited; or another
            # request's fetch, or the periodic one, got there first), and judge again if the keys changed.
            before = keys.current
            if isinstance(keys, jwtverify.KeyUrl):
                await keys.refetch()
            if keys.current is before:
                raise Refusal(caproto.UNAUTHORIZED, "bad_token", str(exc)) from None
        except TokenError as exc:
            raise Refusal(caproto.UNAUTHORIZED, "bad_token", str(exc)) from None
        try:
            return jwtverify.verify_token(token, self.cfg.policy, keys.current.keys, trust_domain)
        except TokenError as exc:
            raise Refusal(caproto.UNAUTHORIZED, "bad_token", str(exc)) from None

    async def _authenticate(self, caller: Caller, request: http11.Request, outcome: _Outcome) -> SpiffeId:
        trust_domain = self.current.authority.trust_domain
        header = request.header("authorization")
        if header is not None:
            outcome.credential = "token"
            token = caproto.bearer_token(header)
            spiffe_id = await self._verify_token(token, trust_domain)
        elif caller.svid is not None or caller.svid_problem is not None:
            outcome.credential = "svid"
            if caller.svid is None:
                raise Refusal(
                    caproto.UNAUTHORIZED, "bad_svid", f"the client certificate is not an SVID: {caller.svid_problem}"
                )
            if caller.svid_not_after is not None and caller.svid_not_after <= datetime.now(UTC):
                raise Refusal(
                    caproto.UNAUTHORIZED,
                    "bad_svid",
                    f"the client SVID expired at {caproto.format_time(caller.svid_not_after)}",
                )
            spiffe_id = caller.svid
            if spiffe_id.trust_domain != trust_domain:
                outcome.spiffe_id = str(spiffe_id)
                message = f"{spiffe_id} is not in trust domain {trust_domain}; this CA renews its own only"
                raise Refusal(caproto.FORBIDDEN, "not_allowed", message)
        else:
            raise Refusal(
                caproto.UNAUTHORIZED,
                "no_credential",
                "no credential: send a service-account token (Authorization: Bearer) or present your current SVID "
                "as the TLS client certificate",
            )
        outcome.spiffe_id = str(spiffe_id)
        if spiffe_id == caproto.ca_workload_id(trust_domain):
            raise Refusal(caproto.FORBIDDEN, "not_allowed", f"{spiffe_id} is the CA's own identity; it is never issued")
        return spiffe_id

    async def _sign(self, caller: Caller, request: http11.Request, outcome: _Outcome) -> caproto.SignResponse:
        spiffe_id = await self._authenticate(caller, request, outcome)
        wait = self.limiter.allow(str(spiffe_id))
        if wait:
            seconds = math.ceil(wait)
            refusal = Refusal(
                caproto.TOO_MANY, "rate_limited", f"too many requests for {spiffe_id}; retry in {seconds} s"
            )
            refusal.retry_after = seconds
            raise refusal
        sign = caproto.parse_sign_request(request.body)
        public_key = caproto.csr_public_key(sign.csr)
        generation = self.current
        authority = generation.authority
        now = datetime.now(UTC)
        ttl = self.cfg.ttl if sign.ttl_seconds is None else min(self.cfg.ttl, timedelta(seconds=sign.ttl_seconds))
        ttl = min(ttl, authority.signer_cert.not_valid_after_utc - now)
        if ttl <= timedelta(0):
            raise Refusal(caproto.UNAVAILABLE, "ca_expired", "the CA's signing certificate has expired")
        try:
            issued = ca.issue_svid(authority, spiffe_id, now=now, ttl=ttl, public_key=public_key)
        except (CertificateError, IdentityError) as exc:
            raise Refusal(caproto.BAD_REQUEST, "bad_csr", str(exc)) from None
        leaf = issued.cert
        return caproto.SignResponse(
            spiffe_id, leaf.serial_number, leaf.not_valid_after_utc, (leaf, *issued.chain), authority.roots
        )

    async def handle(self, caller: Caller, request: http11.Request) -> http11.Response:
        path = request.path
        if path == caproto.BUNDLE_PATH:
            if request.method != "GET":
                return self._refusal(caller, _Outcome(), Refusal(caproto.METHOD_NOT_ALLOWED, "method", "use GET"))
            return http11.Response(200, self.current.bundle_body)
        if path == "/healthz/ready":
            return http11.Response(200, b"ready\n", "text/plain")
        if path != caproto.SIGN_PATH:
            return self._refusal(caller, _Outcome(), Refusal(caproto.NOT_FOUND, "not_found", f"no such path {path}"))
        outcome = _Outcome()
        if request.method != "POST":
            return self._refusal(caller, outcome, Refusal(caproto.METHOD_NOT_ALLOWED, "method", "use POST"))
        try:
            answer = await self._sign(caller, request, outcome)
        except Refusal as refusal:
            return self._refusal(caller, outcome, refusal)
        self.metrics.issued.labels(outcome.credential).inc()
        log.info(
            "%s",
            render_kv(
                {
                    "event": "issued",
                    "client": caller.address,
                    "credential": outcome.credential,
                    "spiffe_id": answer.spiffe_id,
                    "serial": format(answer.serial, "x"),
                    "not_after": caproto.format_time(answer.not_after),
                }
            ),
        )
        return http11.Response(200, answer.encode())

    def _refusal(self, caller: Caller, outcome: _Outcome, refusal: Refusal) -> http11.Response:
        self._log_refusal(caller.address, outcome, str(refusal.status), refusal.reason, refusal.message)
        headers: tuple[tuple[str, str], ...] = ()
        if refusal.retry_after is not None:
            headers = (("retry-after", str(refusal.retry_after)),)
        return http11.Response(refusal.status, caproto.encode_error(refusal.message), headers=headers)

    def _log_refusal(self, client: str, outcome: _Outcome, status: str, reason: str, message: str) -> None:
        self.metrics.refused.labels(reason).inc()
        fields: dict[str, object] = {
            "event": "refused",
            "client": client,
            "credential": outcome.credential,
            "spiffe_id": outcome.spiffe_id,
            "status": status,
            "refusal": reason,
            "reason": message,
        }
        log.info("%s", render_kv(fields))

    def _http_refusal(self, client: str, status: int, message: str) -> http11.Response:
        """What http11 refuses itself (malformed, too large, too slow): logged and counted like the others."""
        reason = {400: "malformed", 408: "timeout", 413: "too_large", 431: "too_large"}.get(status, "malformed")
        self._log_refusal(client, _Outcome(), str(status), reason, message)
        return http11.Response(status, caproto.encode_error(message))

    # --- connections -------------------------------------------------------------------------------------------

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """One client: the TLS handshake (bounded in time), then HTTP/1.1 until it is done. Never raises."""
        try:
            host, port = stream.socket.getpeername()[:2]
            client = unmapped_host_port(str(host), int(port))
        except OSError:
            client = "-"
        if self.state.active >= self.cfg.max_connections:
            self._log_refusal(client, _Outcome(), "-", "busy", f"more than {self.cfg.max_connections} connections")
            await trio.aclose_forcefully(stream)
            return
        self.state.active += 1
        generation = self.current
        tls_stream = tls.TLSStream(stream, generation.context, handshake.Side.SERVER, client)
        caller = Caller(client)
        try:
            try:
                with trio.fail_after(self.cfg.handshake_timeout):
                    await tls_stream.do_handshake(lambda: _read_client_certificate(tls_stream, caller))
            except HandshakeError as exc:
                self._log_refusal(client, _Outcome(), "-", "tls", f"TLS handshake failed: {exc.reason}")
                return
            except trio.TooSlowError:
                self._log_refusal(
                    client, _Outcome(), "-", "timeout", f"no TLS handshake within {self.cfg.handshake_timeout:g} s"
                )
                return
            await http11.serve_connection(
                tls_stream,
                lambda request: self.handle(caller, request),
                self.cfg.limits,
                lambda status, message: self._http_refusal(client, status, message),
            )
        except Exception:  # a bug: show it, close this connection, keep serving everyone else
            log.error("event=internal_error client=%s", client, exc_info=True)
        finally:
            self.state.active -= 1
            await trio.aclose_forcefully(tls_stream)

    async def _serve_metrics(self, listener: trio.SocketListener) -> None:
        async def answer(request: http11.Request) -> http11.Response:
            if request.path != "/metrics":
                return http11.Response(404, b"not found\n", "text/plain")
            return http11.Response(200, self.metrics.render(), CONTENT_TYPE_LATEST)

        async def one(stream: trio.SocketStream) -> None:
            # As for the TLS port: nothing a scraper sends may end the process (trio.serve_listeners would let an
            # escaping error stop every listener), and the endpoint holds at most MAX_METRICS_CLIENTS at once.
            if metrics_clients.active >= MAX_METRICS_CLIENTS:
                await trio.aclose_forcefully(stream)
                return
            metrics_clients.active += 1
            try:
                await http11.serve_connection(stream, answer, http11.Limits(read_timeout=5.0, max_requests=10))
            except Exception:  # a bug: show it, close this connection, keep serving
                log.error("event=internal_error listener=metrics", exc_info=True)
            finally:
                metrics_clients.active -= 1
                await trio.aclose_forcefully(stream)

        metrics_clients = State()

        await trio.serve_listeners(one, [listener])

    async def serve(self, *, task_status: trio.TaskStatus[State] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (a failure is a `ConfigError` naming the flag), report the bound ports, serve until cancelled."""
        listeners: list[tuple[str, trio.SocketListener]] = []
        try:
            for addr in self.cfg.listen:
                listeners += [("ca", listener) for listener in await _bind(addr, "--listen")]
            if self.cfg.metrics_listen is not None:
                listeners += [("metrics", m) for m in await _bind(self.cfg.metrics_listen, "--metrics-listen")]
        except BaseException:
            for _, listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        for name, listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            self.state.bound.setdefault(name, (str(host), int(port)))
        if isinstance(self.keys, jwtverify.KeyUrl):
            await self.keys.fetch()  # a failure is logged; tokens wait for the keys, renewals are served meanwhile
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.serve_reload)
            if isinstance(self.keys, jwtverify.KeyUrl):
                nursery.start_soon(self.keys.run)
            for publisher in self.publishers:  # one task each: a failing or slow ConfigMap delays no other
                nursery.start_soon(publisher.run, self.cfg.reload_interval)
            for name, listener in listeners:
                if name == "metrics":
                    nursery.start_soon(self._serve_metrics, listener)
                else:
                    nursery.start_soon(trio.serve_listeners, self.handle_connection, [listener])
            generation = self.current
            log.info(
                "event=ready spiffe_id=%s trust_domain=%s roots=%d signer=%s listen=%s",
                caproto.ca_workload_id(generation.authority.trust_domain),
                generation.authority.trust_domain,
                len(generation.bundle.roots),
                _serial(generation.authority.signer_cert),
                ",".join(f"{name}={host}:{port}" for name, (host, port) in self.state.bound.items()),
            )
            task_status.started(self.state)


def _read_client_certificate(stream: tls.TLSStream, caller: Caller) -> None:
    """During the handshake, after OpenSSL verified it: what the client certificate says (if one was sent)."""
    der = stream.peer_certificate_der()
    if der is None:
        return
    try:
        cert = x509.load_der_x509_certificate(der)
        caller.svid = svid.leaf_spiffe_id(cert)
        caller.svid_not_after = cert.not_valid_after_utc
    except (CertificateError, ValueError) as exc:
        caller.svid_problem = exc.message if isinstance(exc, CertificateError) else str(exc)


def _replace_renewal(generation: Generation, when: datetime) -> Generation:
    return Generation(
        generation.authority,
        generation.own,
        generation.context,
        when,
        generation.bundle,
        generation.bundle_body,
        generation.stamp,
    )


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


async def _bind(addr: ListenAddr, flag: str) -> Sequence[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(addr.port, host=addr.host)
    except OSError as exc:
        raise ConfigError(flag, f"cannot listen on {addr}: {exc.strerror or exc}") from exc
