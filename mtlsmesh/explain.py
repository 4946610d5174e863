"""Why a connection is (not) encrypted: the capture rules, the sidecar's decision and the policy, walked in one go.

What it does: `capture_walk(tables, packet)` follows a connection's first packet through the namespace's rules as
`iptables-save` printed them (`capture_plan.parse_save`): from the built-in chain (nat OUTPUT for what an app
sends; mangle then nat PREROUTING for what arrives), rule by rule, into our chains and back, to the rule that
decides: a REDIRECT or TPROXY to one of the sidecar's ports, or a RETURN/ACCEPT (or the end of a built-in chain)
that lets it go by. `explain_outbound(cfg, tables, ip, port)` and `explain_inbound(cfg, tables, port, caller)` then
ask the functions the sidecar itself runs (`policy.route_outbound`; `policy.sniffs`, `policy.route_inbound` and
`policy.authorize`), so the explanation cannot disagree with what the sidecar does; each answers an `Explanation`
with every step and a one-sentence verdict. A captured connection to the listener's own port on one of the pod's
addresses is refused as a loop (`policy.loops_to_listener`, as the handlers refuse it). `explain_listener(cfg,
listener, caller)` explains an explicit listener (`find_listener` by name or port): no capture rules, STRICT mTLS
with no sniffing, its `identities` (`policy.listener_admits`) and then the authorization rules for a terminate
listener, the server identities expected for an originate one. A connection the rules let by to a port where an
explicit listener of the pod listens is explained by that listener.

The walk understands the matches and targets our rules (and a kube-proxy-like node) use: `-p tcp`, `--dport`,
`-s`/`-d` with or without `!`, `-i`/`-o`, the owner match, `--ctstate` (a first packet is NEW), `-m mark` and
`-m connmark` (an app's first packet has no mark; TPROXY's transparent dials do), and the targets
RETURN, ACCEPT, DROP, REJECT, REDIRECT, TPROXY, DNAT, MARK and jumps (`-j`, `-g`) into user chains. A rule with any
other match is reported as not understood, and the walk stops there rather than guess.

What it does not: read the rules or the config (the CLI does, from the namespace or files), or know which
addresses are the pod's own (the caller says whether a destination leaves through `lo`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mtlsmesh.addresses import IPAddress, host_port, unmapped
from mtlsmesh.capture_plan import SavedTable
from mtlsmesh.config import Config, ExplicitListener, ExplicitMode, Mode
from mtlsmesh.errors import ConfigError
from mtlsmesh.identity import SpiffeId
from mtlsmesh.policy import (
    InboundKind,
    RouteKind,
    authorize,
    listener_admits,
    loops_to_listener,
    route_inbound,
    route_outbound,
    sniffs,
)

# What a walk can end in.
CAPTURED = "captured"  # REDIRECT/TPROXY to a port of this namespace
LET_BY = "let_by"  # RETURN from a built-in chain, ACCEPT, or the end of a built-in chain: not captured
DROPPED = "dropped"  # DROP or REJECT
UNKNOWN = "unknown"  # a rule the walk does not understand decided, or might have
_MAX_STEPS = 1000  # a loop of jumps is an iptables error, never a walk forever


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a TCP connection, as far as the capture rules look at it."""

    dst: IPAddress
    dport: int
    src: IPAddress | None = None  # None: an address no `-s` of ours names (an app's, a remote caller's)
    out_iface: str | None = None  # locally sent: `lo` when the destination is this namespace's, else `eth0`
    in_iface: str | None = None  # arriving: the interface it came in on
    uid: int | None = None  # locally sent: the owner; None: an app (not the proxy uid)
    gid: int | None = None
    mark: int = 0  # its mark, and its connection's (-m mark, -m connmark): only TPROXY's transparent dials have one


@dataclass(frozen=True, slots=True)
class Step:
    table: str
    chain: str
    rule: str  # the `-A` line as iptables-save prints it, or `policy ACCEPT` at a built-in chain's end
    matched: bool


@dataclass(frozen=True, slots=True)
class Walk:
    outcome: str  # CAPTURED, LET_BY, DROPPED or UNKNOWN
    port: int | None  # CAPTURED: the port it is redirected to
    deciding: str  # the rule that decided (or why none did)
    steps: tuple[Step, ...]  # every rule looked at, in order

    def matched(self) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.matched)


class _NotUnderstood(Exception):
    pass


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def _rule_matches(words: list[str], packet: Packet) -> bool:
    """Whether the match part of a rule (`-A CHAIN` and the target removed) matches `packet`."""
    i, negate = 0, False
    result = True
    while i < len(words):
        word = words[i]
        if word == "!":
            negate, i = True, i + 1
            continue
        value = words[i + 1] if i + 1 < len(words) else ""
        if word in ("-m", "--match"):
            if value not in ("tcp", "owner", "conntrack", "comment", "mark", "connmark"):
                raise _NotUnderstood(f"match module {value}")
            i += 2
            continue
        if word == "--comment":
            i += 2
            continue
        if word in ("-p", "--protocol"):
            hit = value in ("tcp", "6", "all")
        elif word in ("--dport", "--destination-port"):
            low, _, high = value.partition(":")
            hit = int(low) <= packet.dport <= int(high or low)
        elif word in ("-d", "--destination"):
            network = _network(value)
            hit = network.version == packet.dst.version and unmapped(packet.dst) in network
        elif word in ("-s", "--source"):
            network = _network(value)
            hit = packet.src is not None and network.version == packet.src.version and packet.src in network
            hit = hit or network.prefixlen == 0
        elif word in ("-o", "--out-interface"):
            hit = packet.out_iface is not None and _iface(value, packet.out_iface)
        elif word in ("-i", "--in-interface"):
            hit = packet.in_iface is not None and _iface(value, packet.in_iface)
        elif word == "--uid-owner":
            hit = packet.uid is not None and packet.uid == int(value)
        elif word == "--gid-owner":
            hit = packet.gid is not None and packet.gid == int(value)
        elif word == "--ctstate":
            hit = "NEW" in value.split(",")
        elif word == "--mark":
            wanted, _, mask = value.partition("/")
            hit = packet.mark & int(mask or "0xffffffff", 0) == int(wanted, 0)
        else:
            raise _NotUnderstood(word)
        if hit == negate:
            result = False  # keep reading: an option the walk does not understand must still say so
        negate = False
        i += 2
    return result


def _iface(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def _split(rule: str) -> tuple[str, list[str], str, list[str], bool]:
    """(chain, match words, target, target options, goto) of an `-A` line."""
    words = rule.split()
    chain = words[1]
    for flag in ("-j", "-g"):
        if flag in words:
            at = words.index(flag)
            return chain, words[2:at], words[at + 1], words[at + 2 :], flag == "-g"
    return chain, words[2:], "", [], False


def _option(options: list[str], name: str) -> str | None:
    return options[options.index(name) + 1] if name in options and options.index(name) + 1 < len(options) else None


def walk_chain(table: SavedTable, chain: str, packet: Packet) -> Walk:
    """Follow `packet` from the built-in `chain` of `table` to what decides it."""
    steps: list[Step] = []
    # A stack of (chain, next rule index) to return to; a goto replaces the top instead of pushing.
    rules = {name: table.chain_rules(name) for name in {*table.chains, chain}}
    stack: list[tuple[str, int]] = [(chain, 0)]
    returned, jumped = "", False  # the last RETURN taken; whether any jump into a user chain was
    while stack:
        current, index = stack.pop()
        chain_rules = rules.get(current, ())
        if index >= len(chain_rules):
            if not stack:  # the end of the built-in chain: its policy (ACCEPT in every pod we know)
                steps.append(Step(table.name, current, f"end of {current}: policy ACCEPT", True))
                return Walk(LET_BY, None, _why_let_by(table.name, current, returned, jumped), tuple(steps))
            continue  # the end of a user chain: back to the caller
        rule = chain_rules[index]
        _, match, target, options, goto = _split(rule)
        try:
            hit = _rule_matches(match, packet)
        except _NotUnderstood as exc:
            steps.append(Step(table.name, current, rule, False))
            return Walk(UNKNOWN, None, f"{rule} (explain does not evaluate {exc})", tuple(steps))
        steps.append(Step(table.name, current, rule, hit))
        if len(steps) > _MAX_STEPS:
            return Walk(UNKNOWN, None, "more than 1000 rules walked: a loop of jumps?", tuple(steps))
        if not hit or target in ("", "MARK", "LOG", "CONNMARK"):
            stack.append((current, index + 1))
            continue
        if target == "RETURN":
            returned = rule
            if not stack:
                return Walk(LET_BY, None, rule, tuple(steps))
            continue
        if target == "ACCEPT":
            return Walk(LET_BY, None, rule, tuple(steps))
        if target in ("DROP", "REJECT"):
            return Walk(DROPPED, None, rule, tuple(steps))
        if target == "REDIRECT":
            port = _option(options, "--to-ports")
            return Walk(CAPTURED, int(port.split("-")[0]) if port else packet.dport, rule, tuple(steps))
        if target == "TPROXY":
            port = _option(options, "--on-port")
            return Walk(CAPTURED, int(port) if port else packet.dport, rule, tuple(steps))
        if target == "DNAT":
            return Walk(LET_BY, None, f"{rule} (rewritten to another destination, not captured)", tuple(steps))
        if target in rules or target in table.chains:
            jumped = True
            if not goto:
                stack.append((current, index + 1))
            stack.append((target, 0))
            continue
        return Walk(UNKNOWN, None, f"{rule} (explain does not evaluate target {target})", tuple(steps))
    return Walk(LET_BY, None, "no rule captured it", tuple(steps))  # a goto chain ran out: back to the policy


def _why_let_by(table: str, chain: str, returned: str, jumped: bool) -> str:
    if returned:
        return f"{returned} sends it back"
    if not jumped:
        return f"{table} {chain} has no rule for it: no jump into the capture chains (are the rules missing?)"
    return f"no rule in {table} {chain} or the chains it jumps to captures it"


def capture_walk(tables: Mapping[str, SavedTable], packet: Packet, *, inbound: bool) -> Walk:
    """The whole walk: arriving packets through mangle then nat PREROUTING, sent ones through nat OUTPUT."""
    if inbound:
        mangle = tables.get("mangle")
        if mangle is not None and mangle.chain_rules("PREROUTING"):
            # TPROXY mode captures here. An ACCEPT or RETURN ends only the mangle table: nat PREROUTING comes next.
            first = walk_chain(mangle, "PREROUTING", packet)
            nat = tables.get("nat")
            if first.outcome != LET_BY or nat is None:
                return first
            second = walk_chain(nat, "PREROUTING", packet)
            # Let by in both: the mangle rule that let it by (an excluded port) says more than nat's policy.
            by_rule = second.outcome == LET_BY and first.deciding.startswith("-A ")
            deciding = first.deciding if by_rule else second.deciding
            return Walk(second.outcome, second.port, deciding, first.steps + second.steps)
        chain = "PREROUTING"
    else:
        chain = "OUTPUT"
    nat = tables.get("nat")
    if nat is None:
        return Walk(LET_BY, None, "no nat table: nothing is captured", ())
    return walk_chain(nat, chain, packet)


# ---------------------------------------------------------------------------------------------------------------
# The whole explanation


@dataclass(slots=True)
class Explanation:
    direction: str  # outbound or inbound
    target: str  # ip:port (outbound) or the port and caller (inbound)
    capture: Walk | None  # None: no rules given
    captured: bool  # by the capture rules (assumed when there are none to look at)
    decision: str  # mtls, passthrough, refuse, not_captured, dropped, unknown
    reason: str  # the decision function's own words
    identities: tuple[str, ...] = ()  # outbound mTLS: the server IDs expected (empty: any of the trust domain)
    mode: str | None = None  # inbound: the port's mode
    sniffed: bool | None = None  # inbound: whether the first bytes are read
    authorization: dict[str, Any] | None = None  # inbound: the deciding rule
    verdict: str = ""
    notes: list[str] = field(default_factory=list)
    listener: str | None = None  # an explicit listener's name, when it is what carries the connection

    def to_dict(self) -> dict[str, Any]:
        capture = None
        if self.capture is not None:
            capture = {
                "outcome": self.capture.outcome,
                "port": self.capture.port,
                "deciding_rule": self.capture.deciding,
                "matched": [f"{step.table} {step.chain}: {step.rule}" for step in self.capture.matched()],
            }
        return {
            "direction": self.direction,
            "target": self.target,
            "capture": capture,
            "captured": self.captured,
            "decision": self.decision,
            "reason": self.reason,
            "identities": list(self.identities),
            "mode": self.mode,
            "sniffed": self.sniffed,
            "authorization": self.authorization,
            "verdict": self.verdict,
            "notes": list(self.notes),
            "listener": self.listener,
        }


def _begin(direction: str, target: str, walk: Walk | None, listen_port: int) -> tuple[Explanation, str | None]:
    """The explanation as far as the capture rules take it, and why it was not captured (None: it was, or no
    rules). Its decision is "unknown" when the rules cannot tell, and then it is complete."""
    captured, why_not = _capture_or_none(walk, listen_port, direction)
    out = Explanation(direction, target, walk, captured, "", "")
    if walk is None:
        out.notes.append("no capture rules given: assuming the connection is captured")
    elif walk.outcome == UNKNOWN:
        out.decision, out.reason = "unknown", why_not or ""
        out.verdict = f"{target}: cannot tell whether it is captured ({walk.deciding})."
    return out, why_not


def _capture_or_none(walk: Walk | None, expected_port: int, what: str) -> tuple[bool, str | None]:
    """(captured, why not) for the listener `expected_port`; no rules: assume captured, say so."""
    if walk is None:
        return True, None
    if walk.outcome == CAPTURED and walk.port == expected_port:
        return True, None
    if walk.outcome == CAPTURED:
        return False, f"captured to port {walk.port}, which is not the {what} listener ({expected_port})"
    if walk.outcome == DROPPED:
        return False, f"dropped by {walk.deciding}"
    if walk.outcome == UNKNOWN:
        return False, f"undecided: {walk.deciding}"
    return False, walk.deciding


def explain_outbound(
    cfg: Config,
    tables: Mapping[str, SavedTable] | None,
    dst: IPAddress,
    port: int,
    *,
    local: bool = False,
) -> Explanation:
    """An app in this pod connecting to `dst`:`port` (`local`: an address of this pod, which leaves through lo)."""
    dst = unmapped(dst)
    target = host_port(str(dst), port)
    iface = "lo" if local or dst.is_loopback else "eth0"
    walk = None if tables is None else capture_walk(tables, Packet(dst, port, out_iface=iface), inbound=False)
    out, why_not = _begin("outbound", target, walk, cfg.outbound.listen.port)
    captured = out.captured
    if out.decision == "unknown":
        return out
    if not captured:
        listener = _listening(cfg, ExplicitMode.ORIGINATE, port) if local or dst.is_loopback else None
        if listener is not None and walk is not None and walk.outcome == LET_BY:
            return _by_listener(explain_listener(cfg, listener, None), walk, target, f"not captured ({why_not})")
        direct = [
            name
            for name, enabled, listen in (
                ("outbound", cfg.outbound.enabled, cfg.outbound.listen.port),
                ("inbound", cfg.inbound.enabled, cfg.inbound.listen.port),
            )
            if enabled and (local or dst.is_loopback) and loops_to_listener(listen, dst, port, local=local)
        ]
        if direct and walk is not None and walk.outcome == LET_BY:
            # Not redirected, yet it reaches a capture listener itself, whose original destination is then itself.
            out.decision, out.reason = "refuse", LOOP_REASON
            out.verdict = (
                f"{target} is not captured but is the {direct[0]} listener itself: refused (reset), {LOOP_REASON}."
            )
            return out
        out.decision = "dropped" if walk is not None and walk.outcome == DROPPED else "not_captured"
        out.reason = why_not or ""
        out.verdict = f"{target} is not captured, so it leaves as the app sent it (no sidecar sees it): {why_not}."
        return out
    if not cfg.outbound.enabled:
        out.decision, out.reason = "refuse", "outbound.enabled is false: no outbound listener"
        out.verdict = f"{target} is captured, but the outbound listener is off: the connection fails."
        return out
    if loops_to_listener(cfg.outbound.listen.port, dst, port, local=local):
        out.decision, out.reason = "refuse", LOOP_REASON
        out.verdict = f"{target} is captured and refused (reset): {LOOP_REASON}, so dialing it would loop."
        return out
    route = route_outbound(cfg.outbound, dst, port)
    out.decision, out.reason = route.kind.value, route.reason
    out.identities = tuple(str(identity) for identity in route.identities)
    if route.kind is RouteKind.MTLS:
        expect = (
            f"expecting {' or '.join(out.identities)}"
            if out.identities
            else f"accepting any workload of {cfg.trust_domain.name}"
        )
        out.verdict = f"{target} is captured and sent in mutual TLS ({route.reason}), {expect}."
    elif route.kind is RouteKind.PASSTHROUGH:
        out.verdict = f"{target} is captured and passed through in plaintext: {route.reason}."
    else:
        out.verdict = f"{target} is captured and refused (reset): {route.reason}."
    return out


def explain_inbound(
    cfg: Config,
    tables: Mapping[str, SavedTable] | None,
    port: int,
    caller: SpiffeId | None,
    *,
    dst: IPAddress | None = None,
) -> Explanation:
    """A connection arriving at this pod's `port`, from a mesh workload `caller` (its sidecar sends mTLS) or, with
    None, from a plaintext client. `dst`: the pod's address it is sent to (only TPROXY's rules look at it)."""
    who = str(caller) if caller is not None else "a plaintext client"
    target = f"port {port} from {who}"
    address = dst if dst is not None else ipaddress.IPv4Address("198.18.255.254")  # any non-loopback address
    packet = Packet(address, port, in_iface="eth0")
    walk = None if tables is None else capture_walk(tables, packet, inbound=True)
    out, why_not = _begin("inbound", target, walk, cfg.inbound.listen.port)
    captured = out.captured
    if out.decision == "unknown":
        return out
    if not captured:
        listener = _listening(cfg, ExplicitMode.TERMINATE, port)
        if listener is not None and (walk is None or walk.outcome == LET_BY):
            return _by_listener(explain_listener(cfg, listener, caller), walk, target, f"not captured ({why_not})")
        out.decision = "dropped" if walk is not None and walk.outcome == DROPPED else "not_captured"
        out.reason = why_not or ""
        sent = (
            "its mTLS bytes reach the app as they are (the app sees TLS it cannot read)"
            if caller
            else ("it reaches the app in plaintext, with no authorization")
        )
        out.verdict = f"{target} is not captured, so {sent}: {why_not}."
        return out
    if not cfg.inbound.enabled:
        out.decision, out.reason = "refuse", "inbound.enabled is false: no inbound listener"
        out.verdict = f"{target} is captured, but the inbound listener is off: the connection fails."
        return out
    if loops_to_listener(cfg.inbound.listen.port, address, port, local=True):  # it arrived at an address of ours
        out.decision, out.reason = "refuse", LOOP_REASON
        out.verdict = f"{target} is captured and refused (reset): {LOOP_REASON}, so dialing it would loop."
        return out
    mode, server_first = cfg.inbound.port_mode(port), cfg.inbound.is_server_first(port)
    out.mode, out.sniffed = mode.value, sniffs(mode, server_first)
    # A mesh caller's sidecar opens with a ClientHello offering ALPN mtlsmesh; a plaintext client does not.
    route = route_inbound(mode, server_first, (caller is not None) if out.sniffed else None)
    out.decision, out.reason = route.kind.value, route.reason
    if route.kind is InboundKind.REFUSE:
        out.verdict = f"{target} is captured and refused (reset): {route.reason}."
        return out
    if route.kind is InboundKind.MTLS and caller is None:  # server-first: mTLS without sniffing, and no ClientHello
        wait = cfg.timeouts.handshake
        out.decision, out.reason = "refuse", f"{route.reason}; a plaintext client sends no ClientHello"
        out.verdict = (
            f"{target} is captured and reset after timeouts.handshake ({wait:g} s): the port is server-first, so it"
            " carries mesh mTLS only, and a plaintext client sends nothing until the app speaks; the app never sees"
            " it (give the port mode disable for plaintext callers)."
        )
        return out
    if out.sniffed and caller is None and mode is Mode.PERMISSIVE:
        out.notes.append(
            f"sniffed: a plaintext client of a server-first protocol (MySQL, SMTP: it waits for the app to speak)"
            f" sends nothing, so it waits the whole inbound.sniff_timeout ({cfg.inbound.sniff_timeout:g} s) before"
            " it is passed through; declare the port server_first (mesh callers only) or mode disable (plaintext)"
        )
    authenticated = caller if route.kind is InboundKind.MTLS else None
    if route.kind is InboundKind.PASSTHROUGH and caller is not None:
        out.notes.append("passed through: the app receives the caller's TLS bytes, and the caller is not authenticated")
    decision = authorize(cfg.authorization, authenticated, port)
    rule = cfg.authorization[decision.rule] if decision.rule is not None else None
    out.authorization = {
        "allowed": decision.allowed,
        "rule": decision.rule,
        "reason": decision.reason,
        "action": rule.action.value if rule is not None else None,
        "principals": list(rule.principals) if rule is not None else [],
    }
    carried = "in mutual TLS" if route.kind is InboundKind.MTLS else "passed through in plaintext"
    if decision.allowed:
        out.verdict = f"{target} is captured, {carried} ({route.reason}), and allowed: {decision.reason}."
    else:
        out.decision, out.reason = "refuse", decision.reason
        out.verdict = f"{target} is captured, {carried} ({route.reason}), and denied (reset): {decision.reason}."
    return out


# ---------------------------------------------------------------------------------------------------------------
# Explicit listeners

LOOP_REASON = "the original destination is this listener"  # steps.LOOP_TO_LISTENER's detail


def find_listener(cfg: Config, name_or_port: str) -> ExplicitListener:
    """The explicit listener named so, or listening on that port; ConfigError naming those there are."""
    for listener in cfg.explicit:
        if listener.name == name_or_port or (name_or_port.isdigit() and listener.listen.port == int(name_or_port)):
            return listener
    known = ", ".join(f"{x.name} ({x.listen})" for x in cfg.explicit) or "none in this config"
    raise ConfigError("--listener", f"no explicit listener named or listening on {name_or_port!r} ({known})")


def _listening(cfg: Config, mode: ExplicitMode, port: int) -> ExplicitListener | None:
    return next((x for x in cfg.explicit if x.mode is mode and x.listen.port == port), None)


def explain_listener(cfg: Config, listener: ExplicitListener, caller: SpiffeId | None) -> Explanation:
    """A connection through an explicit listener: the app dials it itself (originate) or a peer does (terminate),
    so no capture rule is involved. Always STRICT mTLS, never sniffed; `caller` (terminate only): who calls."""
    where = f"listener {listener.name} ({listener.listen} -> {listener.forward_to})"
    tls_from = f"TLS {listener.min_tls_version} or later"
    records = listener.records(cfg.record_layer).value
    identities = tuple(str(identity) for identity in listener.identities)
    notes = [
        f"explicit {listener.mode.value} listener: no capture rule is involved ({tls_from}, record layer {records})"
    ]
    if listener.mode is ExplicitMode.ORIGINATE:
        out = Explanation("outbound", where, None, False, "mtls", "explicit originate listener: always mutual TLS")
        out.identities, out.notes, out.listener = identities, notes, listener.name
        expect = (
            f"expecting {' or '.join(identities)}"
            if identities
            else f"accepting any workload of {cfg.trust_domain.name}"
        )
        out.verdict = f"{where}: the app's plaintext is sent in mutual TLS to {listener.forward_to}, {expect}."
        return out
    who = str(caller) if caller is not None else "a plaintext client"
    target = f"{where} from {who}"
    out = Explanation("inbound", target, None, False, "mtls", "explicit terminate listener: STRICT mutual TLS")
    out.identities, out.notes, out.mode, out.sniffed = identities, notes, "strict", False
    out.listener = listener.name
    if caller is None:
        out.decision, out.reason = "refuse", "STRICT: a client without an SVID fails the handshake"
        out.verdict = f"{target} is refused: the listener is STRICT mutual TLS and the client presents no SVID."
        return out
    if caller.trust_domain != cfg.trust_domain:
        out.decision, out.reason = "refuse", f"{caller} is not in trust domain {cfg.trust_domain.name}"
        out.verdict = f"{target} is refused in the handshake: {out.reason}."
        return out
    admitted = listener_admits(listener.identities, caller)
    if not admitted.allowed:
        out.decision, out.reason = "refuse", admitted.reason
        out.verdict = f"{target} completes the handshake and is refused (reset): {admitted.reason}."
        return out
    decision = authorize(cfg.authorization, caller, listener.forward_to.port)
    rule = cfg.authorization[decision.rule] if decision.rule is not None else None
    out.authorization = {
        "allowed": decision.allowed,
        "rule": decision.rule,
        "reason": decision.reason,
        "action": rule.action.value if rule is not None else None,
        "principals": list(rule.principals) if rule is not None else [],
    }
    if decision.allowed:
        out.verdict = (
            f"{target} is carried in mutual TLS to {listener.forward_to} ({admitted.reason}), and allowed: "
            f"{decision.reason}."
        )
    else:
        out.decision, out.reason = "refuse", decision.reason
        out.verdict = f"{target} completes the handshake and is denied (reset): {decision.reason}."
    return out


def _by_listener(answer: Explanation, walk: Walk | None, target: str, why: str) -> Explanation:
    """`answer` (an explicit listener's) for a connection the capture rules let by to that listener's port."""
    answer.capture, answer.target = walk, f"{target}, {answer.target}"
    answer.notes.insert(0, f"{why}: it reaches the explicit listener on that port")
    return answer
