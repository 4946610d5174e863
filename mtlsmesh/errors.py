"""The error hierarchy: one root, subclasses that carry what a person needs to act.

Every error that user input can cause is a `MeshError`. The CLI prints `mtlsmesh: error: <message>` and exits 2;
the sidecar logs it on one line and refuses the connection. Anything else escaping is a bug.

Messages that apply a SPIFFE rule name it by id in parentheses (`(ID-4)`, `(L-1, V-6)`); `RULES_DOC` explains
every id, and `with_rules_doc` adds that pointer to a line shown to a person (the CLI does, for its one error line).

What it does not: format, log or count errors; the CLI and the sidecar's connection handling do that.
"""

from __future__ import annotations

import re

RULES_DOC = "docs/svid-profile.md"  # in the repository: every rule id a message cites, defined once
_RULE_IDS = re.compile(r"\((?:ID|L|S|V|B)-[0-9]+(?:, (?:ID|L|S|V|B)-[0-9]+)*\)")


def with_rules_doc(text: str) -> str:
    """`text`, followed by where its rule ids are explained when it cites one; else `text` unchanged."""
    return f"{text}; see {RULES_DOC}" if _RULE_IDS.search(text) else text


class MeshError(Exception):
    """Root of every error that bad input (not a bug) can cause."""


class ConfigError(MeshError):
    """A config file, flag or environment variable is invalid; `path` names where (`inbound.ports.9080.mode`)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class IdentityError(MeshError):
    """A SPIFFE ID or trust domain breaks the SPIFFE ID grammar; `rule` is its id in `RULES_DOC` (ID-4 ...)."""

    def __init__(self, value: str, message: str, rule: str = "") -> None:
        self.value = value
        self.message = message
        self.rule = rule
        shown = value if len(value) <= 80 else value[:77] + "..."
        suffix = f" ({rule})" if rule else ""
        super().__init__(f"invalid SPIFFE ID {shown!r}: {message}{suffix}")


class CertificateError(MeshError):
    """A certificate, key, CSR or bundle file is unreadable, corrupt, mismatched or breaks an SVID rule (the message
    names its id in `RULES_DOC`: L-1 ..., S-1 ..., V-2 ...)."""

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
