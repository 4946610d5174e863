"""The service-account token check: the issuer's public keys and PyJWT's verdict on signature, issuer, audience, time.

What it does: `KeyFile` reads the token issuer's JWKS (`kubectl get --raw /openid/v1/jwks`) from a file and
polls it (stat of the resolved path, like `credentials`): a new file is read when it changes, and one that does not
parse is logged and refused while the old keys stay in use. `KeyUrl` fetches it from an https URL (the API
server's `/openid/v1/jwks`, through `kubeapi`: TLS verified against a CA file, an optional bearer token, an answer
of at most `MAX_JWKS_BYTES`, a deadline) at start and every `refresh` seconds, sooner (at most once per
`min_refetch` seconds) when a token names a `kid` it does not know, so a key rotated in at the issuer is picked up
at the first token signed with it. A fetch that fails or answers something unusable keeps the last good keys; the
failure is logged when the state changes (working → failing, one failure → another, failing → working), and
retried with capped exponential backoff. Only RSA and EC keys are kept (never an `oct` HMAC key, whatever the
JWKS says). `verify_token` checks one token: the header's algorithm (`tokens.check_header`), the key by `kid`
(every key of the right type when the token names none), then PyJWT verifies the signature and `iss`, `aud`,
`exp`, `nbf`, `iat` with `tokens.LEEWAY_SECONDS` of leeway, and `tokens.service_account_id` reads the identity.

What it does not: fetch over plain http (refused when the flag is read), follow OIDC discovery
(`/.well-known/openid-configuration`; give the `jwks_uri` itself), or share keys between replicas.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
import trio

from mtlsmesh import kubeapi, pem, tokens
from mtlsmesh.errors import ConfigError
from mtlsmesh.identity import SpiffeId, TrustDomain
from mtlsmesh.tokens import TokenError, TokenPolicy

log = logging.getLogger("mtlsmesh.ca")

MAX_JWKS_BYTES = 1024 * 1024
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC"}  # algorithm family → the JWK kty that can verify it
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}  # RFC 7518 3.4: each ES algorithm has its curve


@dataclass(frozen=True, slots=True)
class IssuerKey:
    """One public key of the issuer, with what its JWK says about it."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any  # a cryptography RSA or EC public key, as PyJWT made it

    def can_verify(self, alg: str) -> bool:
        if self.alg not in (None, alg) or self.kty != _KEY_TYPES[alg[:2]]:
            return False
        return self.kty != "EC" or self.crv == _CURVES[alg]


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """One reading of the JWKS: the usable public keys."""

    keys: tuple[IssuerKey, ...]
    stamp: pem.FileStamp | None  # None for keys fetched from a URL


class UnknownKidError(TokenError):
    """The token names a key the issuer's JWKS, as last read, does not hold."""


def is_url(source: str) -> bool:
    return source.lower().startswith(("https://", "http://"))


def check_jwks_source(source: str, flag: str = "--token-jwks") -> str | kubeapi.HttpsUrl:
    """A JWKS location the CA can use: a file path, or an https URL (plain http is refused)."""
    if is_url(source):
        return kubeapi.HttpsUrl.parse(source, flag)
    return source


def parse_jwks(data: bytes, source: str) -> tuple[IssuerKey, ...]:
    """The RSA and EC keys of a JWK Set; `ConfigError` naming `source` when there is none or it is not JSON."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise ConfigError(source, "the JWKS is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(source, "the JWKS has no 'keys' list")
    keys: list[IssuerKey] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
            continue  # an HMAC (oct) key would let a token signed with a "secret" through: never load one
        alg = entry.get("alg")
        if alg is not None and alg not in tokens.ALGORITHMS:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        kid, crv = entry.get("kid"), entry.get("crv")
        try:
            parsed = jwt.PyJWK(entry)
            keys.append(
                IssuerKey(
                    kid if isinstance(kid, str) else None,
                    entry["kty"],
                    crv if isinstance(crv, str) else None,
                    alg,
                    parsed.key,
                )
            )
        except jwt.PyJWTError as exc:
            log.warning("event=jwks_key_skipped source=%s reason=%r", source, str(exc))
    if not keys:
        raise ConfigError(source, "the JWKS holds no usable RSA or EC signing key")
    return tuple(keys)


def load_jwks(path: str) -> IssuerKeys:
    try:
        stamp = pem.file_stamp(path)
        with open(path, "rb") as handle:
            data = handle.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, f"cannot read the JWKS: {exc.strerror or exc}") from exc
    if len(data) > MAX_JWKS_BYTES:
        raise ConfigError(path, f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    return IssuerKeys(parse_jwks(data, path), stamp)


class KeyFile:
    """The issuer's keys from a file, swapped when the file changes and the new one parses."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.current = load_jwks(path)
        self.reloads = 0
        self.reload_failures = 0
        self._last_attempt: pem.FileStamp | None = self.current.stamp

    def check_once(self) -> bool:
        """Reload when the file changed since the last attempt; True when new keys are in use."""
        try:
            stamp = pem.file_stamp(self.path)
        except OSError as exc:
            if self._last_attempt is not None:
                self._last_attempt = None
                self.reload_failures += 1
                log.warning("event=jwks_refused path=%s reason=%r keeping=old", self.path, f"cannot stat: {exc}")
            return False
        if stamp == self._last_attempt:
            return False
        self._last_attempt = stamp  # a failed attempt is retried when the file changes again, not every poll
        try:
            fresh = load_jwks(self.path)
        except ConfigError as exc:
            self.reload_failures += 1
            log.warning("event=jwks_refused path=%s reason=%r keeping=old", self.path, exc.message)
            return False
        self.current = fresh
        self.reloads += 1
        log.info("event=jwks_reloaded path=%s keys=%d", self.path, len(fresh.keys))
        return True


DEFAULT_REFRESH = 300.0  # seconds between two fetches of a JWKS URL that works
DEFAULT_MIN_REFETCH = 10.0  # at most one early fetch (a token with an unknown kid) per this many seconds
FIRST_RETRY = 1.0  # the first retry after a failed fetch; it doubles up to the refresh interval


class KeyUrl:
    """The issuer's keys from an https URL: fetched at start (`fetch`), then by `run` every `refresh` seconds and
    on an unknown kid (`refetch`); the last good keys stay when a fetch fails. Before the first good fetch it has no
    keys, and `problem` says why."""

    def __init__(
        self,
        url: kubeapi.HttpsUrl,
        client: kubeapi.Client,
        *,
        refresh: float = DEFAULT_REFRESH,
        min_refetch: float = DEFAULT_MIN_REFETCH,
    ) -> None:
        self.url = url
        self.client = kubeapi.Client(client.ca_file, client.token_file, client.timeout, MAX_JWKS_BYTES)
        self.refresh, self.min_refetch = refresh, min_refetch
        self.current = IssuerKeys((), None)
        self.problem: str | None = "not fetched yet"
        self.reloads = 0
        self.reload_failures = 0
        self._last_fetch = -float("inf")  # trio.current_time() of the last fetch's start
        self._lock = trio.Lock()
        self._retry = FIRST_RETRY

    def check_once(self) -> bool:
        """For the CA's poll, as `KeyFile`: a URL is fetched by `run` instead."""
        return False

    async def _get(self) -> tuple[IssuerKey, ...]:
        source = str(self.url)
        try:
            answer = await self.client.call("GET", self.url)
        except kubeapi.ApiError as exc:
            raise ConfigError(source, exc.message) from None
        if answer.status != 200:
            snippet = answer.body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
            hint = ""
            if answer.status in (401, 403):
                hint = " (a bearer token of a service account bound to system:service-account-issuer-discovery?)"
            raise ConfigError(source, f"answered {answer.status}{hint}: {snippet or 'no body'}")
        return parse_jwks(answer.body, source)

    async def fetch(self) -> bool:
        """One fetch now; True when it worked. Never raises for what the server does."""
        async with self._lock:
            return await self._fetch_locked()

    async def _fetch_locked(self) -> bool:
        self._last_fetch = trio.current_time()
        try:
            keys = await self._get()
        except Exception as exc:  # ConfigError: the server's fault; anything else, a bug that must not end the CA
            self.reload_failures += 1
            message = exc.message if isinstance(exc, ConfigError) else f"unexpected: {exc!r}"
            if message != self.problem:  # once per state: the same failure again is not logged again
                log.log(
                    logging.WARNING if isinstance(exc, ConfigError) else logging.ERROR,
                    "event=jwks_refresh_failed url=%s reason=%r keeping=%d",
                    self.url,
                    message,
                    len(self.current.keys),
                    exc_info=not isinstance(exc, ConfigError),
                )
            self.problem = message
            return False
        changed = keys != self.current.keys
        recovered = self.problem is not None
        self.problem = None
        self._retry = FIRST_RETRY
        if changed:
            self.current = IssuerKeys(keys, None)
            self.reloads += 1
            kids = ",".join(key.kid or "-" for key in keys)
            log.info("event=jwks_reloaded url=%s keys=%d kids=%s", self.url, len(keys), kids)
        elif recovered:
            log.info("event=jwks_recovered url=%s keys=%d", self.url, len(keys))
        return True

    async def refetch(self) -> bool:
        """An early fetch for a token whose kid is unknown; False when one ran too recently (or it failed)."""
        async with self._lock:
            if trio.current_time() - self._last_fetch < self.min_refetch:
                return False
            return await self._fetch_locked()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch every `refresh` seconds while it works, with capped exponential backoff (and jitter) while not."""
        task_status.started()
        while True:
            if self.problem is None:
                wait = self.refresh
            else:
                wait = self._retry * random.uniform(0.8, 1.2)
                self._retry = min(self._retry * 2, self.refresh)
            deadline = self._last_fetch + wait
            while trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                deadline = self._last_fetch + wait  # an early refetch meanwhile moves the next one
            await self.fetch()


def _candidates(header: dict[str, Any], alg: str, keys: Sequence[IssuerKey]) -> list[IssuerKey]:
    kid = header.get("kid")
    found = list(keys)
    if kid is not None:
        found = [key for key in keys if key.kid == kid]
        if not found:
            raise UnknownKidError(f"no key with kid {kid!r} in the issuer's JWKS (is the JWKS current?)")
    usable = [key for key in found if key.can_verify(alg)]
    if not usable:
        raise TokenError(f"the issuer has no key that verifies {alg}")
    return usable


def _expiry(token: str) -> str:
    """`exp` of a token whose signature has been verified, for the refusal's message."""
    claims = jwt.decode(token, options={"verify_signature": False})
    try:
        return datetime.fromtimestamp(int(claims["exp"]), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (KeyError, TypeError, ValueError, OverflowError):
        return "?"


def verify_token(token: str, policy: TokenPolicy, keys: Sequence[IssuerKey], trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID a projected service-account token proves; `TokenError` with the reason otherwise."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("the bearer token is not a well-formed JWT") from None
    alg = tokens.check_header(header)
    for key in _candidates(header, alg, keys):
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=policy.audience,
                issuer=policy.issuer,
                leeway=policy.leeway,
                options={"require": list(tokens.REQUIRED_CLAIMS)},
            )
        except jwt.InvalidSignatureError:
            continue  # without a kid, another key of the issuer may have signed it
        except jwt.ExpiredSignatureError:
            raise TokenError(f"the token expired at {_expiry(token)}") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("the token is not valid yet (nbf or iat lies in the future)") from None
        except jwt.InvalidAudienceError:
            raise TokenError(f"the token's audience is not {policy.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise TokenError(f"the token's issuer is not {policy.issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"the token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"the token is invalid: {exc}") from None
        return tokens.service_account_id(claims, trust_domain)
    raise TokenError("the token's signature does not verify with the issuer's keys")
