"""The `mtlsmesh.io/*` pod annotations: their names, and their validation into capture settings and the SVID source.

Annotation values are strings in Kubernetes; a value that is not (`mtlsmesh.io/inject: false` unquoted), an
unknown `mtlsmesh.io/` name (a typo would otherwise be ignored silently), a port outside 1-65535, a CIDR with host
bits set, an unknown inbound or interception mode or SVID source is a `ConfigError` whose path is the caller's
`label` (file, document, workload).
Lists are comma-separated, blanks allowed; they are normalised (`"80, 443"` -> `80,443`) for the environment of
`mtlsmesh iptables`. This module does not decide where the annotations are read from: that is `inject`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mtlsmesh.conventions import NEVER_CAPTURED_INBOUND, InterceptionMode
from mtlsmesh.errors import ConfigError

ANNOTATION_PREFIX = "mtlsmesh.io/"
INJECT_ANNOTATION = "mtlsmesh.io/inject"
STATUS_ANNOTATION = "mtlsmesh.io/status"
EXCLUDE_INBOUND_PORTS = "mtlsmesh.io/exclude-inbound-ports"
EXCLUDE_OUTBOUND_PORTS = "mtlsmesh.io/exclude-outbound-ports"
EXCLUDE_OUTBOUND_CIDRS = "mtlsmesh.io/exclude-outbound-cidrs"
INCLUDE_INBOUND_PORTS = "mtlsmesh.io/include-inbound-ports"
INCLUDE_OUTBOUND_CIDRS = "mtlsmesh.io/include-outbound-cidrs"
INBOUND_MODE = "mtlsmesh.io/inbound-mode"
# REDIRECT or TPROXY: one value for both the init step (`--interception-mode`) and the sidecar
# (`inbound.interception_mode`), so the two cannot disagree.
INTERCEPTION_MODE = "mtlsmesh.io/interception-mode"
# Where the injected sidecar gets its SVID: "ca" (the CA service, with a projected token) or "secret" (the Secret
# `mtlsmesh ca issue --k8s-secret` writes, for clusters without the CA service).
IDENTITY = "mtlsmesh.io/identity"

INBOUND_MODES = ("strict", "permissive", "disable")
IDENTITY_SOURCES = ("ca", "secret")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """The validated `mtlsmesh.io/*` annotations of one pod template."""

    inbound_ports: str = "*"
    exclude_inbound_ports: str = ""
    exclude_outbound_ports: str = ""
    include_outbound_cidrs: str = "*"
    exclude_outbound_cidrs: str = ""
    inbound_mode: str | None = None  # None: the mode in the mesh config
    interception_mode: str = InterceptionMode.REDIRECT.value


def read_annotations(obj: Mapping[str, object], label: str) -> dict[str, str]:
    """The object's `mtlsmesh.io/*` annotations, each checked to be a string and a name we know."""
    metadata = obj.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise ConfigError(label, "metadata.annotations: expected a mapping")
    ours: dict[str, str] = {}
    for key, value in annotations.items():
        if not isinstance(key, str) or not key.startswith(ANNOTATION_PREFIX):
            continue
        if key not in _KNOWN_ANNOTATIONS:
            known = ", ".join(sorted(_KNOWN_ANNOTATIONS))
            raise ConfigError(label, f"annotation {key}: unknown; known: {known}")
        if not isinstance(value, str):
            raise ConfigError(label, f'annotation {key}: annotation values are strings, quote it ({key}: "{value}")')
        ours[key] = value
    return ours


def opted_out(annotations: Mapping[str, str], label: str) -> bool:
    value = annotations.get(INJECT_ANNOTATION)
    if value is None:
        return False
    if value not in ("true", "false"):
        raise ConfigError(label, f'annotation {INJECT_ANNOTATION}: expected "true" or "false", got {value!r}')
    return value == "false"


def _parse_ports(value: str, name: str, label: str, *, allow_all: bool) -> str:
    text = value.strip()
    if allow_all and text == "*":
        return "*"
    ports: list[str] = []
    for item in (part.strip() for part in text.split(",")) if text else ():
        if not _PORT.fullmatch(item) or not 1 <= int(item) <= 65535:
            raise ConfigError(label, f"annotation {name}: {item!r} is not a port (1-65535)")
        ports.append(str(int(item)))
    return ",".join(ports)


def _parse_cidrs(value: str, name: str, label: str, *, allow_all: bool) -> str:
    text = value.strip()
    if allow_all and text == "*":
        return "*"
    cidrs: list[str] = []
    for item in (part.strip() for part in text.split(",")) if text else ():
        try:
            cidrs.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as exc:
            raise ConfigError(label, f"annotation {name}: {item!r} is not a CIDR ({exc})") from exc
    return ",".join(cidrs)


def _parse_mode(value: str, name: str, label: str) -> str:
    mode = value.strip().lower()
    if mode not in INBOUND_MODES:
        raise ConfigError(label, f"annotation {name}: expected one of {', '.join(INBOUND_MODES)}, got {value!r}")
    return mode


def _parse_interception(value: str, name: str, label: str) -> str:
    mode = value.strip().upper()
    choices = [member.value for member in InterceptionMode]
    if mode not in choices:
        raise ConfigError(label, f"annotation {name}: expected one of {', '.join(choices)}, got {value!r}")
    return mode


_Parser = Callable[[str, str, str], str]
_CAPTURE_FIELDS: dict[str, tuple[str, _Parser]] = {
    INCLUDE_INBOUND_PORTS: ("inbound_ports", lambda v, n, lb: _parse_ports(v, n, lb, allow_all=True)),
    EXCLUDE_INBOUND_PORTS: ("exclude_inbound_ports", lambda v, n, lb: _parse_ports(v, n, lb, allow_all=False)),
    EXCLUDE_OUTBOUND_PORTS: ("exclude_outbound_ports", lambda v, n, lb: _parse_ports(v, n, lb, allow_all=False)),
    INCLUDE_OUTBOUND_CIDRS: ("include_outbound_cidrs", lambda v, n, lb: _parse_cidrs(v, n, lb, allow_all=True)),
    EXCLUDE_OUTBOUND_CIDRS: ("exclude_outbound_cidrs", lambda v, n, lb: _parse_cidrs(v, n, lb, allow_all=False)),
    INBOUND_MODE: ("inbound_mode", _parse_mode),
    INTERCEPTION_MODE: ("interception_mode", _parse_interception),
}
_KNOWN_ANNOTATIONS = frozenset({INJECT_ANNOTATION, STATUS_ANNOTATION, IDENTITY, *_CAPTURE_FIELDS})


def identity_source(annotations: Mapping[str, str], label: str, default: str) -> str:
    """The pod's SVID source, one of `IDENTITY_SOURCES`: its `mtlsmesh.io/identity` annotation, else `default`."""
    value = annotations.get(IDENTITY)
    if value is None:
        return default
    source = value.strip().lower()
    if source not in IDENTITY_SOURCES:
        raise ConfigError(label, f"annotation {IDENTITY}: expected one of {', '.join(IDENTITY_SOURCES)}, got {value!r}")
    return source


def parse_capture(annotations: Mapping[str, str], label: str) -> CaptureSettings:
    values = {
        field: parse(annotations[name], name, label)
        for name, (field, parse) in _CAPTURE_FIELDS.items()
        if name in annotations
    }
    settings = CaptureSettings(**values)
    _check_consistency(settings, label)
    return settings


def _check_consistency(settings: CaptureSettings, label: str) -> None:
    """Refuse here what `mtlsmesh iptables` would refuse when the pod starts: better at inject than at run time."""
    included = [] if settings.inbound_ports == "*" else [p for p in settings.inbound_ports.split(",") if p]
    excluded = set(settings.exclude_inbound_ports.split(","))
    for port in included:
        if int(port) in NEVER_CAPTURED_INBOUND:  # health and metrics: they cannot be "included"
            raise ConfigError(
                label, f"annotation {INCLUDE_INBOUND_PORTS}: port {port} is the sidecar's own and is never captured"
            )
        if port in excluded:
            raise ConfigError(
                label,
                f"annotations {INCLUDE_INBOUND_PORTS} and {EXCLUDE_INBOUND_PORTS}: port {port} "
                "is both captured and excluded",
            )
    cidrs = set(settings.exclude_outbound_cidrs.split(","))
    for cidr in [] if settings.include_outbound_cidrs == "*" else settings.include_outbound_cidrs.split(","):
        if cidr and cidr in cidrs:
            raise ConfigError(
                label,
                f"annotations {INCLUDE_OUTBOUND_CIDRS} and {EXCLUDE_OUTBOUND_CIDRS}: {cidr} is "
                "both included and excluded",
            )
