"""SPIFFE IDs and trust domains: parsing by the SPIFFE-ID grammar, and the mesh's naming convention.

`parse_spiffe_id` is the one gate every ID passes (CLI flags, config, certificates). It applies the rules of
section 2 of the SPIFFE ID standard (ID-1 ... ID-13 in docs/svid-profile.md) and names the rule it found broken.
Leaf-only rules (a non-root path, L-2/V-5) are the caller's: `SpiffeId.is_root` tells.

What this module does not do: certificates (see `ca` and `svid`), or policy matching (see `policy`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mtlsmesh.errors import IdentityError

SCHEME = "spiffe"
DEFAULT_TRUST_DOMAIN = "cluster.local"
MAX_ID_BYTES = 2048  # ID-11: accept up to 2048 bytes, generate no longer
MAX_TRUST_DOMAIN_BYTES = 255  # ID-12: RFC 3986's host limit, which the SPIFFE ID standard inherits

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[a-zA-Z0-9._-]+")


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A validated trust domain name, lowercase (`cluster.local`)."""

    name: str

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own ID, `spiffe://<td>`, as a signing authority carries it (ID-13)."""
        return SpiffeId(self.name, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID; `path` is empty or starts with `/`. Build with `parse_spiffe_id` or `workload_id`."""

    trust_domain_name: str
    path: str

    @property
    def trust_domain(self) -> TrustDomain:
        return TrustDomain(self.trust_domain_name)

    @property
    def is_root(self) -> bool:
        """True for `spiffe://td` alone: valid for a CA, never for a workload (L-2, V-5)."""
        return self.path == ""

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """The Kubernetes namespace of an `/ns/<ns>/sa/<sa>` ID, else None."""
        seg = self.segments
        return seg[1] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

    @property
    def service_account(self) -> str | None:
        seg = self.segments
        return seg[3] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

    def __str__(self) -> str:
        return f"{SCHEME}://{self.trust_domain_name}{self.path}"


def parse_trust_domain(text: str) -> TrustDomain:
    """Validate a bare trust domain name (`cluster.local`), or the `spiffe://td` form of it."""
    if text.lower().startswith(f"{SCHEME}://"):
        spiffe_id = parse_spiffe_id(text)
        if not spiffe_id.is_root:
            raise IdentityError(text, "a trust domain has no path", "ID-13")
        return spiffe_id.trust_domain
    _check_trust_domain(text, text)
    return TrustDomain(text)


def _check_trust_domain(value: str, host: str) -> None:
    if not host:
        raise IdentityError(value, "the trust domain is empty", "ID-2")
    if "@" in host:
        raise IdentityError(value, "userinfo is not allowed in the authority", "ID-3")
    if ":" in host:
        raise IdentityError(value, "a port or ':' is not allowed in the authority", "ID-3")
    if "%" in host:
        raise IdentityError(value, "percent-encoding is not allowed in the trust domain", "ID-4")
    if len(host.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityError(value, f"the trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes", "ID-12")
    if host != host.lower():
        raise IdentityError(value, "the trust domain must be lowercase", "ID-4")
    if not _TRUST_DOMAIN_CHARS.fullmatch(host):
        raise IdentityError(value, "the trust domain may hold only the characters a-z 0-9 . - _", "ID-4")


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse and validate a SPIFFE ID; raise `IdentityError` naming the broken rule.

    The scheme is matched case-insensitively (ID-1); the trust domain must already be lowercase (ID-4).
    """
    if not isinstance(text, str):
        raise IdentityError(repr(text), "a SPIFFE ID must be text", "ID-1")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise IdentityError(text, f"longer than {MAX_ID_BYTES} bytes", "ID-11")
    prefix = f"{SCHEME}://"
    if not text[: len(prefix)].lower() == prefix:
        raise IdentityError(text, "the scheme must be 'spiffe://'", "ID-1")
    rest = text[len(prefix) :]
    if "#" in rest:
        raise IdentityError(text, "a fragment is not allowed", "ID-6")
    if "?" in rest:
        raise IdentityError(text, "a query is not allowed", "ID-6")
    host, slash, path = rest.partition("/")
    _check_trust_domain(text, host)
    path = slash + path
    if path:
        if path == "/" or path.endswith("/"):
            raise IdentityError(text, "the path must not end with '/'", "ID-9")
        if "%" in path:
            raise IdentityError(text, "percent-encoding is not allowed in the path", "ID-7")
        for segment in path.split("/")[1:]:
            if segment == "":
                raise IdentityError(text, "the path has an empty segment", "ID-8")
            if segment in (".", ".."):
                raise IdentityError(text, f"the path has a {segment!r} segment", "ID-8")
            if not _SEGMENT_CHARS.fullmatch(segment):
                raise IdentityError(text, f"path segment {segment!r} may hold only a-z A-Z 0-9 . - _", "ID-10")
    return SpiffeId(host, path)


def parse_workload_id(text: str) -> SpiffeId:
    """Parse an ID that names a workload: a valid SPIFFE ID with a non-root path (L-2, V-5)."""
    spiffe_id = parse_spiffe_id(text)
    if spiffe_id.is_root:
        raise IdentityError(text, "a workload ID needs a path; 'spiffe://<td>' alone names the trust domain", "L-2")
    return spiffe_id


def workload_id(trust_domain: TrustDomain | str, namespace: str, service_account: str) -> SpiffeId:
    """The mesh's convention: `spiffe://<td>/ns/<namespace>/sa/<service-account>`, validated."""
    td = trust_domain.name if isinstance(trust_domain, TrustDomain) else trust_domain
    # Each name must stay one segment: `--namespace a/b` would otherwise mint `/ns/a/b/sa/...`, an ID of another
    # shape that no namespace owns.
    for what, name in (("namespace", namespace), ("service account", service_account)):
        if "/" in name:
            text = f"{SCHEME}://{td}/ns/{namespace}/sa/{service_account}"
            raise IdentityError(text, f"the {what} {name!r} must be one path segment, without '/'", "ID-10")
    return parse_workload_id(f"{SCHEME}://{td}/ns/{namespace}/sa/{service_account}")
