"""The error hierarchy: one root, subclasses that carry what a person needs to act.

Every error that user input can cause is a `MeshError`. The CLI prints `mtlsmesh: error: <message>` and exits 2;
the sidecar logs it on one line and refuses the connection. Anything else escaping is a bug.

What it does not: format, log or count errors; the CLI and the sidecar's connection handling do that.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error that bad input (not a bug) can cause."""


class ConfigError(MeshError):
    """A config file, flag or environment variable is invalid; `path` names where (`inbound.ports.9080.mode`)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class IdentityError(MeshError):
    """A SPIFFE ID or trust domain breaks the SPIFFE-ID grammar; `rule` names the checklist rule (ID-4 ...)."""

    def __init__(self, value: str, message: str, rule: str = "") -> None:
        self.value = value
        self.message = message
        self.rule = rule
        shown = value if len(value) <= 80 else value[:77] + "..."
        suffix = f" ({rule})" if rule else ""
        super().__init__(f"invalid SPIFFE ID {shown!r}: {message}{suffix}")


class CertificateError(MeshError):
    """A certificate, key, CSR or bundle file is unreadable, corrupt, mismatched or breaks the SVID profile."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class HandshakeError(MeshError):
    """A TLS handshake failed or the peer's credential was refused."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"handshake with {peer} failed: {reason}")


class CaptureError(MeshError):
    """Applying, checking or removing the iptables capture rules failed."""


class LabError(MeshError):
    """The pod lab cannot be built here (not root, a tool missing, a namespace left over)."""
