"""Decisions the sidecar takes from config alone: who may call an inbound port, and how an outbound flow leaves.

`authorize(rules, caller, port)` applies the authorization rules to an authenticated caller (or to None, a
plaintext caller in PERMISSIVE mode). `route_outbound(cfg, dst_ip, dst_port)` says whether an outbound connection
goes to the mesh (mTLS, with the server identities to expect), passes through as plain TCP, or is refused.
`sniffs(mode, server_first)` and `route_inbound(mode, server_first, mesh_hello)` say how an inbound connection to a
port is carried: terminated mTLS, passed through, or refused (STRICT and not mesh mTLS). The inbound handler and
`mtlsmesh explain` both call these, so the explanation cannot disagree with the sidecar.

Both are pure functions over frozen values; each answer carries a short reason for the connection log. What this
module does not do: validate rules (the config parser did that), or look at certificates (`svid` extracts the
caller's SPIFFE ID after OpenSSL verified the chain).

Authorization semantics (those of Istio's AuthorizationPolicy, reduced to principals and ports):
  1. a DENY rule that covers the port and matches the caller refuses, whatever else says (DENY beats ALLOW);
  2. if ALLOW rules cover the port, the caller must match one of them;
  3. if none does, the port is open to every caller that was not denied.
A rule with no ports covers every port. A principal is an exact SPIFFE ID, a prefix pattern `spiffe://td/ns/x/*`
that matches IDs below that path, or `*` for any authenticated caller. A plaintext caller (None) matches nothing:
it passes rule 3 but never rule 2, and no DENY rule can name it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from mtlsmesh.addresses import IPAddress, unmapped
from mtlsmesh.config import Action, AuthzRule, Mode, OutboundConfig, OutboundPolicy
from mtlsmesh.identity import SpiffeId

ANY_PRINCIPAL = "*"
PREFIX_SUFFIX = "/*"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: int | None  # index of the deciding rule in the configured list; None when no single rule decided
    reason: str

    def __str__(self) -> str:
        return self.reason


class RouteKind(enum.Enum):
    MTLS = "mtls"  # inside the mesh: originate mTLS, verify the server's SPIFFE ID
    PASSTHROUGH = "passthrough"  # outside the mesh, ALLOW_ANY: relay plain TCP untouched
    REFUSE = "refuse"  # outside the mesh, REGISTRY_ONLY: reset the app's connection


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    identities: tuple[SpiffeId, ...]  # MTLS only: expected server IDs; empty means any ID of our trust domain
    reason: str

    def __str__(self) -> str:
        return self.reason


def principal_matches(principal: str, caller: SpiffeId | None) -> bool:
    """Whether one configured principal (exact ID, `.../*` prefix or `*`) matches the caller."""
    if caller is None:
        return False
    if principal == ANY_PRINCIPAL:
        return True
    caller_text = str(caller)
    if principal.endswith(PREFIX_SUFFIX):
        # Keep the '/' so that spiffe://td/ns/default/* cannot match spiffe://td/ns/defaultx/...
        return caller_text.startswith(principal[:-1])
    return caller_text == principal


def rule_matches(rule: AuthzRule, caller: SpiffeId | None) -> bool:
    return any(principal_matches(principal, caller) for principal in rule.principals)


def covers_port(rule: AuthzRule, port: int) -> bool:
    return not rule.ports or port in rule.ports


def authorize(rules: Sequence[AuthzRule], caller: SpiffeId | None, port: int) -> Decision:
    """Apply the rules to `caller` (None: a plaintext caller) connecting to the app's `port`."""
    who = str(caller) if caller is not None else "plaintext caller"
    allow_rules: list[int] = []
    for index, rule in enumerate(rules):
        if not covers_port(rule, port):
            continue
        if rule.action is Action.DENY:
            if rule_matches(rule, caller):
                return Decision(False, index, f"rule {index} DENY matches {who} on port {port}")
        else:
            allow_rules.append(index)
    if not allow_rules:
        return Decision(True, None, f"no ALLOW rule covers port {port}")
    for index in allow_rules:
        if rule_matches(rules[index], caller):
            return Decision(True, index, f"rule {index} ALLOW matches {who} on port {port}")
    shown = ", ".join(str(index) for index in allow_rules)
    return Decision(False, None, f"{who} matches no ALLOW rule for port {port} (rules {shown})")


def route_outbound(cfg: OutboundConfig, dst_ip: IPAddress, dst_port: int) -> Route:
    """Where an outbound connection to `dst_ip`:`dst_port` goes: the first matching destination decides."""
    # An IPv4 peer reached through a dual-stack socket shows up as ::ffff:a.b.c.d; match it as the IPv4 it is.
    dst_ip = unmapped(dst_ip)
    for index, destination in enumerate(cfg.destinations):
        if destination.ports and dst_port not in destination.ports:
            continue
        if destination.cidrs and not any(dst_ip in cidr for cidr in destination.cidrs):
            continue
        return Route(RouteKind.MTLS, destination.identities, f"destination {index} matches {dst_ip} port {dst_port}")
    if cfg.policy is OutboundPolicy.REGISTRY_ONLY:
        return Route(RouteKind.REFUSE, (), f"no destination matches {dst_ip} port {dst_port} (REGISTRY_ONLY)")
    return Route(RouteKind.PASSTHROUGH, (), f"no destination matches {dst_ip} port {dst_port} (ALLOW_ANY)")


class InboundKind(enum.Enum):
    MTLS = "mtls"  # mesh mTLS: terminate it, then authorize the caller's SPIFFE ID
    PASSTHROUGH = "passthrough"  # hand the bytes to the app untouched; authorized as a plaintext caller
    REFUSE = "refuse"  # STRICT, and not mesh mTLS: reset


@dataclass(frozen=True, slots=True)
class InboundRoute:
    kind: InboundKind
    reason: str

    def __str__(self) -> str:
        return self.reason


# The answers, made once (the handler asks once per connection).
_IN_DISABLE = InboundRoute(InboundKind.PASSTHROUGH, "mode DISABLE: passed through, never sniffed")
_IN_SERVER_FIRST_STRICT = InboundRoute(InboundKind.MTLS, "server-first port in STRICT: mTLS, without sniffing")
# A server-first port cannot be both: its plaintext client sends nothing until the app speaks, so there is nothing to
# tell it from a ClientHello by, and passing everything through would hand mesh callers' ClientHellos to the app.
# Declaring a port server-first declares it mesh-only (Linkerd's opaque ports, Istio's declared protocols): mTLS
# without sniffing, in PERMISSIVE as in STRICT. A port that must serve plaintext server-first clients is DISABLE.
_IN_SERVER_FIRST_OPEN = InboundRoute(
    InboundKind.MTLS, "server-first port in PERMISSIVE: mesh mTLS only, without sniffing (nothing to sniff)"
)
_IN_MESH = InboundRoute(InboundKind.MTLS, "a ClientHello offering ALPN mtlsmesh: mesh mTLS")
_IN_STRICT_REFUSED = InboundRoute(InboundKind.REFUSE, "STRICT: not mesh mTLS, refused")
_IN_PERMISSIVE = InboundRoute(InboundKind.PASSTHROUGH, "PERMISSIVE: not mesh mTLS, passed through")


def sniffs(mode: Mode, server_first: bool) -> bool:
    """Whether an inbound connection's first bytes are read to tell mesh mTLS from anything else."""
    return mode is not Mode.DISABLE and not server_first


def route_inbound(mode: Mode, server_first: bool, mesh_hello: bool | None) -> InboundRoute:
    """How an inbound connection is carried, given the port's mode, whether it is server-first, and (when
    `sniffs`) whether its first bytes were a ClientHello offering the mesh's ALPN (None: not sniffed)."""
    if mode is Mode.DISABLE:
        return _IN_DISABLE
    if server_first:
        return _IN_SERVER_FIRST_STRICT if mode is Mode.STRICT else _IN_SERVER_FIRST_OPEN
    if mesh_hello:
        return _IN_MESH
    return _IN_STRICT_REFUSED if mode is Mode.STRICT else _IN_PERMISSIVE


def listener_admits(identities: Sequence[SpiffeId], caller: SpiffeId | None) -> Decision:
    """An explicit terminate listener's own check of a caller its handshake authenticated (the handshake already
    held it to our trust domain): when the listener names `identities`, the caller must be one of them."""
    if not identities:
        return Decision(True, None, "the listener names no identities: any workload of the trust domain")
    if caller in identities:
        return Decision(True, None, f"{caller} is one of this listener's identities")
    allowed = ", ".join(str(identity) for identity in identities)
    return Decision(False, None, f"{caller} is not one of this listener's identities ({allowed})")


def loops_to_listener(listen_port: int, ip: IPAddress, port: int, *, local: bool) -> bool:
    """Whether a captured connection whose original destination is `ip`:`port` would come back to the listener on
    `listen_port` if dialed: the port is the listener's and the address is this namespace's own (`local`: the one
    the connection arrived on, or any other bound here), loopback or unspecified."""
    ip = unmapped(ip)
    return port == listen_port and (local or ip.is_loopback or ip.is_unspecified)
