"""The trust bundle ConfigMaps kept current by the CA service: the roots it trusts, as PEM, in one key of each
ConfigMap named (one per namespace whose pods mount it: a pod can only mount a ConfigMap of its own namespace),
written through the Kubernetes API.

What it does: `BundlePublisher.run` compares, every `poll` seconds, the bundle the CA serves now (a callable) with
what it last knew its ConfigMap to hold. When they differ (at start, after `mtlsmesh ca bundle --add/--remove`,
after `ca rotate`, after any reload that changes the roots), and every `resync` seconds in any case (someone may
have re-applied the placeholder), it reads the ConfigMap (`GET`) and, only if its key holds other roots, writes
that key alone (`PATCH` with a JSON merge patch, so the object's other keys, labels and annotations stay as they
are). A failure (the API server unreachable, 401/403, the ConfigMap missing) is retried with capped exponential
backoff and jitter; the CA keeps serving meanwhile. One log line per change of state: the ConfigMap found current,
written, or failing (again only when the reason changes). There is one publisher per ConfigMap, each a task of its
own with its own state and backoff: a namespace whose Role is missing, or an answer that is slow, holds up no other.

What it does not: create the ConfigMap (RBAC cannot limit `create` to one name, so the CA's Roles do not have it:
the manifests create it), delete it, watch it, or write anything but the one key. Nor does it coordinate replicas:
while an updated CA Secret has reached one replica and not yet another (the kubelet syncs volumes about a minute
apart), each writes the roots it trusts; they agree once both have the new directory.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mtlsmesh import http11, kubeapi
from mtlsmesh.errors import ConfigError

log = logging.getLogger("mtlsmesh.ca")

DEFAULT_KEY = "bundle.pem"
DEFAULT_RESYNC = 60.0  # seconds: a GET per minute and replica, so a ConfigMap someone overwrote is put right soon
FIRST_RETRY = 1.0
MAX_RETRY = 60.0
MERGE_PATCH = "application/merge-patch+json"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True, slots=True)
class Target:
    """One ConfigMap and the key in it that holds the bundle."""

    namespace: str
    name: str
    key: str = DEFAULT_KEY

    @classmethod
    def parse(cls, text: str, flag: str) -> Target:
        namespace, slash, name = text.partition("/")
        if not slash or not _DNS_LABEL.fullmatch(namespace) or not _SUBDOMAIN.fullmatch(name) or len(name) > 253:
            raise ConfigError(flag, f"{text!r} is not NAMESPACE/NAME of a ConfigMap (lowercase DNS names)")
        return cls(namespace, name)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/configmaps/{self.name}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_targets(texts: Sequence[str], flag: str) -> tuple[Target, ...]:
    """Each NAMESPACE/NAME once, in the order given; the same ConfigMap twice is refused (two publishers would
    write one object, each with its own idea of what it last held)."""
    targets: list[Target] = []
    for text in texts:
        target = Target.parse(text, flag)
        if any(str(target) == str(seen) for seen in targets):
            raise ConfigError(flag, f"{target} is given twice; name each ConfigMap once")
        targets.append(target)
    return tuple(targets)


@dataclass(frozen=True, slots=True)
class PublishConfig:
    target: Target
    api: kubeapi.HttpsUrl  # the API server; its path is ignored
    client: kubeapi.Client
    resync: float = DEFAULT_RESYNC
    first_retry: float = FIRST_RETRY
    max_retry: float = MAX_RETRY


class PublishError(Exception):
    pass


def _status_message(answer: http11.Answer) -> str:
    """What a Kubernetes `Status` answer says, else the start of the body."""
    try:
        document = json.loads(answer.body)
        message = document.get("message") if isinstance(document, dict) else None
    except ValueError:
        message = None
    text = message if isinstance(message, str) and message else answer.body[:200].decode("utf-8", "replace")
    return f"{answer.status} {' '.join(text.split()) or 'no body'}"


def _same_roots(found: object, bundle: bytes) -> bool:
    """The ConfigMap already holds these roots: the same text, or the same certificates in another order (after
    `ca rotate` the new root comes first; writing that would change nothing for anyone reading the bundle)."""
    if not isinstance(found, str):
        return False
    if found == bundle.decode():
        return True
    try:
        held = x509.load_pem_x509_certificates(found.encode())
    except ValueError:
        return False
    ours = x509.load_pem_x509_certificates(bundle)
    return sorted(c.fingerprint(hashes.SHA256()) for c in held) == sorted(c.fingerprint(hashes.SHA256()) for c in ours)


class BundlePublisher:
    """See the module docstring. `desired` gives the bundle's PEM as the CA serves it right now."""

    def __init__(self, cfg: PublishConfig, desired: Callable[[], bytes]) -> None:
        self.cfg = cfg
        self.desired = desired
        self.published: bytes | None = None  # what the ConfigMap held at our last successful look or write
        self.state = "unknown"  # "current", "written" or the reason of the last failure
        self.writes = 0
        self.failures = 0

    @property
    def _where(self) -> kubeapi.HttpsUrl:
        return self.cfg.api.with_path(self.cfg.target.path)

    async def sync_once(self, bundle: bytes) -> bool:
        """Make the ConfigMap's key hold `bundle`; True when it had to be written. `PublishError` otherwise."""
        target, client = self.cfg.target, self.cfg.client
        try:
            found = await client.call("GET", self._where)
        except kubeapi.ApiError as exc:
            raise PublishError(f"cannot read the ConfigMap: {exc.message}") from None
        if found.status == 404:
            raise PublishError(
                f"the ConfigMap {target} does not exist; the CA only updates it (kubectl apply -k deploy/ca creates "
                "those of mtlsmesh-system and default; for another namespace see deploy/README.md)"
            )
        if found.status != 200:
            raise PublishError(f"cannot read the ConfigMap: {_status_message(found)}")
        try:
            data = json.loads(found.body).get("data") or {}
        except (ValueError, AttributeError):
            raise PublishError("the API server's answer is not a ConfigMap") from None
        if isinstance(data, dict) and _same_roots(data.get(target.key), bundle):
            return False
        patch = json.dumps({"data": {target.key: bundle.decode()}}).encode()
        try:
            written = await client.call("PATCH", self._where, body=patch, content_type=MERGE_PATCH)
        except kubeapi.ApiError as exc:
            raise PublishError(f"cannot write the ConfigMap: {exc.message}") from None
        if written.status != 200:
            raise PublishError(f"cannot write the ConfigMap: {_status_message(written)}")
        return True

    async def run(self, poll: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        retry, retry_at, resync_at = self.cfg.first_retry, 0.0, 0.0
        while True:
            now = trio.current_time()
            bundle = self.desired()
            if (bundle != self.published or now >= resync_at) and now >= retry_at:
                try:
                    wrote = await self.sync_once(bundle)
                except Exception as exc:  # PublishError: the API's answer; anything else, a bug: the CA serves on
                    self.failures += 1
                    wait = retry * random.uniform(0.8, 1.2)
                    retry_at, retry = trio.current_time() + wait, min(retry * 2, self.cfg.max_retry)
                    reason = str(exc) if isinstance(exc, PublishError) else f"unexpected: {exc!r}"
                    if reason != self.state:  # once per state: the same failure again is not logged again
                        self.state = reason
                        log.log(
                            logging.WARNING if isinstance(exc, PublishError) else logging.ERROR,
                            "event=bundle_publish_failed configmap=%s reason=%r retry_in=%.1fs",
                            self.cfg.target,
                            reason,
                            wait,
                            exc_info=not isinstance(exc, PublishError),
                        )
                else:
                    self.published, retry, retry_at = bundle, self.cfg.first_retry, 0.0
                    resync_at = trio.current_time() + self.cfg.resync
                    roots = bundle.count(b"-----BEGIN CERTIFICATE-----")
                    if wrote:
                        self.writes += 1
                        self.state = "written"
                        log.info("event=bundle_published configmap=%s key=%s roots=%d", self.cfg.target,
                                 self.cfg.target.key, roots)  # fmt: skip
                    elif self.state != "current" and self.state != "written":
                        self.state = "current"
                        log.info("event=bundle_current configmap=%s key=%s roots=%d", self.cfg.target,
                                 self.cfg.target.key, roots)  # fmt: skip
            await trio.sleep(poll)
