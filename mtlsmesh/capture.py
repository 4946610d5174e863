"""The pod's traffic-capture rules as data: validated options in, frozen rules out.

What it does: validates the capture options (flags and environment variables arrive as strings), builds the rules
for each address family in the order docs/ARCHITECTURE.md §3 gives, and renders them as `iptables-save` prints them.
What it does not: read the namespace's current rules or plan commands (`capture_plan`), or run anything
(`installer`). No socket, subprocess or file is touched here, so every byte it produces is pinned by golden files.

Theory of operation
-------------------
A pod's TCP is bent to the sidecar in the nat table, by four chains of our own:

    PREROUTING -p tcp → MTLSMESH_INBOUND → (unless excluded) MTLSMESH_IN_REDIRECT → REDIRECT :15006
    OUTPUT     -p tcp → MTLSMESH_OUTPUT  → (unless exempt)   MTLSMESH_REDIRECT    → REDIRECT :15001

The built-in chains hold nothing but those two jumps, so removing the capture is: delete the jumps, flush and
delete our chains. The order inside MTLSMESH_OUTPUT is the one istio-iptables converged on, and each rule exists
for a reason (comments in `_outbound_rules`). The sidecar's own sockets belong to the proxy uid/gid; that is what
keeps its connections from being captured again.

TPROXY mode replaces the inbound half with mangle-table chains: new connections hit the TPROXY target, which
hands them to a transparent socket on the inbound port with the original destination untouched (the client's real
address stays visible); packets of established connections are marked so that policy routing (`ip rule fwmark` →
a table whose only route is `local default dev lo`) delivers them locally. The outbound half stays REDIRECT.

Every rule is written in the exact form `iptables-save` prints it back (`-p tcp -m tcp --dport`, `--set-xmark`,
`--on-ip 0.0.0.0`), both for the nf_tables and the legacy backend. That makes the read-back after applying, and
`--check`, a plain comparison of lines instead of a second parser of iptables' option syntax.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mtlsmesh.addresses import IPNetwork
from mtlsmesh.conventions import (
    APP_SOURCE,
    APP_SOURCE_V6,
    INBOUND_PORT,
    NEVER_CAPTURED_INBOUND,
    OUTBOUND_PORT,
    PROXY_GID,
    PROXY_UID,
    TPROXY_MARK,
    TPROXY_TABLE,
    InterceptionMode,
)
from mtlsmesh.errors import ConfigError

_T = TypeVar("_T")

# Chain names (docs/ARCHITECTURE.md §2). Every chain we ever create is listed here: cleanup removes exactly these.
INBOUND = "MTLSMESH_INBOUND"
IN_REDIRECT = "MTLSMESH_IN_REDIRECT"
OUTPUT = "MTLSMESH_OUTPUT"
REDIRECT = "MTLSMESH_REDIRECT"
DIVERT = "MTLSMESH_DIVERT"
TPROXY = "MTLSMESH_TPROXY"
OWN_CHAINS: Mapping[str, tuple[str, ...]] = {
    "nat": (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT),
    "mangle": (INBOUND, DIVERT, TPROXY, OUTPUT),
}
TABLES = ("nat", "mangle")
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

# The inbound sidecar dials the app from this source, and OUTPUT lets it through (docs/ARCHITECTURE.md §3).
APP_SOURCE_NET_V4 = ipaddress.IPv4Network(APP_SOURCE)
APP_SOURCE_NET_V6 = ipaddress.IPv6Network(APP_SOURCE_V6)
LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.1/32")
LOOPBACK_V6 = ipaddress.IPv6Network("::1/128")


class Family(enum.Enum):
    V4 = "ipv4"
    V6 = "ipv6"

    @property
    def ip_flag(self) -> str:
        """The `ip` command's family switch."""
        return "-4" if self is Family.V4 else "-6"


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """What to capture. Build it with `parse_capture_options` from flags/env, or directly in code and tests."""

    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    inbound_ports: tuple[int, ...] | None = None  # None: every port ("*"); (): no inbound capture at all
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_cidrs: tuple[IPNetwork, ...] | None = None  # None: every destination ("*")
    exclude_outbound_cidrs: tuple[IPNetwork, ...] = ()
    mode: InterceptionMode = InterceptionMode.REDIRECT
    ipv6: bool = True
    # TPROXY only: the mark on diverted packets and the routing table that delivers them locally (Istio's
    # defaults, 1337 and 133, so a reader who knows one mesh recognises the other).
    tproxy_mark: int = TPROXY_MARK
    tproxy_table: int = TPROXY_TABLE

    @property
    def families(self) -> tuple[Family, ...]:
        return (Family.V4, Family.V6) if self.ipv6 else (Family.V4,)

    @property
    def inbound_excluded(self) -> tuple[int, ...]:
        """Ports that RETURN in MTLSMESH_INBOUND: the never-captured ones, then the user's, without repeats."""
        return _unique((*NEVER_CAPTURED_INBOUND, *self.exclude_inbound_ports))


@dataclass(frozen=True, slots=True)
class Rule:
    """One `-A` line: which table and chain, the match arguments, and the target with its options."""

    table: str
    chain: str
    match: tuple[str, ...]
    target: tuple[str, ...]

    def render(self, op: str = "-A") -> str:
        return " ".join((op, self.chain, *self.match, "-j", *self.target))


@dataclass(frozen=True, slots=True)
class PolicyRoute:
    """TPROXY's policy routing: packets carrying `mark` use `table`, whose one route delivers them locally."""

    family: Family
    mark: int
    table: int

    def rule_add(self) -> tuple[str, ...]:
        return ("ip", self.family.ip_flag, "rule", "add", "fwmark", str(self.mark), "lookup", str(self.table))

    def rule_delete(self) -> tuple[str, ...]:
        return ("ip", self.family.ip_flag, "rule", "del", "fwmark", str(self.mark), "lookup", str(self.table))

    def route_replace(self) -> tuple[str, ...]:
        # `replace` is idempotent by itself; `default` is 0.0.0.0/0 or ::/0 depending on the family switch.
        return (
            "ip",
            self.family.ip_flag,
            "route",
            "replace",
            "local",
            "default",
            "dev",
            "lo",
            "table",
            str(self.table),
        )

    def route_delete(self) -> tuple[str, ...]:
        return ("ip", self.family.ip_flag, "route", "del", *self._local_default())

    def _local_default(self) -> tuple[str, ...]:
        return ("local", "default", "dev", "lo", "table", str(self.table))

    def show_rules(self) -> tuple[str, ...]:
        return ("ip", "-j", self.family.ip_flag, "rule", "show")

    def show_routes(self) -> tuple[str, ...]:
        # `table all`, filtered below: showing one table that does not exist yet is an error, not an empty list.
        return ("ip", "-j", self.family.ip_flag, "route", "show", "table", "all")


# How our ::6 on lo is told from one that was there before us: we add it with `nodad` (meaningless on lo, where
# there is no duplicate address detection to skip, so a person adding ::6 by hand has no reason to give it), and
# cleanup removes ::6 only when it carries that flag. An address present before apply is never touched.
LO_SOURCE_FLAG = "nodad"


@dataclass(frozen=True, slots=True)
class LoSource:
    """The inbound app source's IPv6 twin (::6) on lo: the sidecar dials an IPv6 app from it."""

    address: ipaddress.IPv6Network

    def add(self) -> tuple[str, ...]:
        return ("ip", "-6", "addr", "add", str(self.address), "dev", "lo", LO_SOURCE_FLAG)

    def delete(self) -> tuple[str, ...]:
        return ("ip", "-6", "addr", "del", str(self.address), "dev", "lo")

    def show(self) -> tuple[str, ...]:
        return ("ip", "-j", "-6", "addr", "show", "dev", "lo")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything one address family needs: our chains, the rules in them, the jumps into them, ip commands."""

    family: Family
    chains: tuple[tuple[str, str], ...]  # (table, chain) in declaration order
    rules: tuple[Rule, ...]  # rules inside our chains, in order
    jumps: tuple[Rule, ...]  # rules in built-in chains (PREROUTING, OUTPUT), each present exactly once
    policy_route: PolicyRoute | None = None  # TPROXY only
    lo_source: LoSource | None = None  # IPv6 only: ::6 on lo, added when absent, removed by cleanup when ours

    def tables(self) -> tuple[str, ...]:
        used = {table for table, _ in self.chains}
        return tuple(table for table in TABLES if table in used)


# ---------------------------------------------------------------------------------------------------------------
# Parsing options (the edge: strings from flags and environment variables)

# Field name → flag, used to name the culprit in errors when the caller gives no better source.
_FLAGS: Mapping[str, str] = {
    "proxy_uid": "--proxy-uid",
    "proxy_gid": "--proxy-gid",
    "outbound_port": "--outbound-port",
    "inbound_port": "--inbound-port",
    "inbound_ports": "--inbound-ports",
    "exclude_inbound_ports": "--exclude-inbound-ports",
    "exclude_outbound_ports": "--exclude-outbound-ports",
    "include_outbound_cidrs": "--include-outbound-cidrs",
    "exclude_outbound_cidrs": "--exclude-outbound-cidrs",
    "mode": "--interception-mode",
    "ipv6": "--ipv6",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel, so it is not a real owner


def parse_capture_options(raw: Mapping[str, str], *, sources: Mapping[str, str] | None = None) -> CaptureOptions:
    """Validate option strings keyed by field name (missing keys keep their defaults).

    `sources` names where a value came from (`MTLSMESH_INBOUND_PORTS`); by default errors name the flag.
    """
    unknown = set(raw) - set(_FLAGS)
    if unknown:
        raise ValueError(f"unknown capture option(s): {', '.join(sorted(unknown))}")

    def where(key: str) -> str:
        return (sources or {}).get(key, _FLAGS[key])

    values: dict[str, Any] = {}  # checked field by field below
    for key in ("proxy_uid", "proxy_gid"):
        if key in raw:
            values[key] = _parse_owner(raw[key], where(key))
    for key in ("outbound_port", "inbound_port"):
        if key in raw:
            values[key] = _parse_port(raw[key].strip(), where(key))
    if "inbound_ports" in raw:
        text = raw["inbound_ports"].strip()
        values["inbound_ports"] = None if text == "*" else _parse_port_list(text, where("inbound_ports"))
    for key in ("exclude_inbound_ports", "exclude_outbound_ports"):
        if key in raw:
            values[key] = _parse_port_list(raw[key], where(key))
    if "include_outbound_cidrs" in raw:
        text = raw["include_outbound_cidrs"].strip()
        values["include_outbound_cidrs"] = (
            None if text == "*" else _parse_cidr_list(text, where("include_outbound_cidrs"))
        )
    if "exclude_outbound_cidrs" in raw:
        values["exclude_outbound_cidrs"] = _parse_cidr_list(
            raw["exclude_outbound_cidrs"], where("exclude_outbound_cidrs")
        )
    if "mode" in raw:
        values["mode"] = _parse_mode(raw["mode"], where("mode"))
    if "ipv6" in raw:
        values["ipv6"] = _parse_bool(raw["ipv6"], where("ipv6"))

    options = dataclasses.replace(CaptureOptions(), **values)
    _check_consistency(options, where)
    return options


def _parse_owner(text: str, where: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ConfigError(where, f"expected a numeric uid/gid, got {text!r}")
    value = int(text)
    if value == 0:
        # Exempting uid/gid 0 from capture would let every root process in the pod bypass the mesh.
        raise ConfigError(where, "0 (root) cannot be the proxy's uid/gid: it would exempt every root process")
    if value > _MAX_ID:
        raise ConfigError(where, f"{value} is out of range (at most {_MAX_ID})")
    return value


def _parse_port(text: str, where: str) -> int:
    if not text.isdigit():
        raise ConfigError(where, f"expected a port number 1-65535, got {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(where, f"port {port} is out of range 1-65535")
    return port


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_port_list(text: str, where: str) -> tuple[int, ...]:
    if text.strip() == "*":
        raise ConfigError(where, "'*' is not allowed here; list the ports")
    return _unique(_parse_port(item, where) for item in _items(text))


def _parse_cidr_list(text: str, where: str) -> tuple[IPNetwork, ...]:
    if text.strip() == "*":
        raise ConfigError(where, "'*' is not allowed here; list the CIDRs")
    networks: list[IPNetwork] = []
    for item in _items(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
            continue
        except ValueError:
            pass
        try:
            widened = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(where, f"{item!r} is not an IP address or CIDR") from None
        # A typo such as 10.1.0.0/8 usually means another network than the one it would silently become.
        raise ConfigError(where, f"{item!r} has host bits set; did you mean {widened}?")
    return _unique(networks)


def _parse_mode(text: str, where: str) -> InterceptionMode:
    try:
        return InterceptionMode(text.strip().upper())
    except ValueError:
        raise ConfigError(where, f"unknown interception mode {text!r}: expected REDIRECT or TPROXY") from None


def _parse_bool(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(where, f"expected true or false, got {text!r}")


def _check_consistency(options: CaptureOptions, where: Callable[[str], str]) -> None:
    if options.outbound_port == options.inbound_port:
        raise ConfigError(where("inbound_port"), f"inbound and outbound port are both {options.inbound_port}")
    for port in options.inbound_ports or ():
        if port in NEVER_CAPTURED_INBOUND:
            raise ConfigError(where("inbound_ports"), f"port {port} is the sidecar's own and is never captured")
        if port in (options.inbound_port, options.outbound_port):
            # Redirecting a connection to the sidecar's listener back to that listener only makes it loop.
            raise ConfigError(where("inbound_ports"), f"port {port} is the sidecar's own listener; capturing it loops")
        if port in options.exclude_inbound_ports:
            raise ConfigError(where("inbound_ports"), f"port {port} is both captured and excluded")
    for network in options.include_outbound_cidrs or ():
        if network in options.exclude_outbound_cidrs:
            raise ConfigError(where("include_outbound_cidrs"), f"{network} is both included and excluded")


def _unique(values: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------------------------
# Building the rules


_ALL = "0xffffffff"  # the mask iptables-save prints for a plain mark


def _hex(value: int) -> str:
    return f"{value:#x}"  # iptables-save prints marks in hex


def _tcp_port(port: int) -> tuple[str, ...]:
    return ("-p", "tcp", "-m", "tcp", "--dport", str(port))


def build_ruleset(options: CaptureOptions, family: Family) -> RuleSet:
    """All rules for one address family, in the order of docs/ARCHITECTURE.md §3 (which istio-iptables settled on)."""
    version = 4 if family is Family.V4 else 6
    loopback = LOOPBACK_V4 if version == 4 else LOOPBACK_V6
    tproxy = options.mode is InterceptionMode.TPROXY

    chains: list[tuple[str, str]] = []
    rules: list[Rule] = []
    jumps: list[Rule] = []

    def nat(chain: str, *match: str, target: tuple[str, ...]) -> None:
        rules.append(Rule("nat", chain, match, target))

    # -- nat: inbound (REDIRECT mode only; TPROXY takes inbound over in mangle)
    if not tproxy:
        chains.append(("nat", INBOUND))
        jumps.append(Rule("nat", "PREROUTING", ("-p", "tcp"), (INBOUND,)))
        for port in options.inbound_excluded:
            nat(INBOUND, *_tcp_port(port), target=("RETURN",))
        if options.inbound_ports is None:
            nat(INBOUND, "-p", "tcp", target=(IN_REDIRECT,))
        for port in options.inbound_ports or ():
            nat(INBOUND, *_tcp_port(port), target=(IN_REDIRECT,))
    chains.append(("nat", IN_REDIRECT))
    nat(IN_REDIRECT, "-p", "tcp", target=("REDIRECT", "--to-ports", str(options.inbound_port)))

    # -- nat: outbound
    chains.append(("nat", OUTPUT))
    jumps.append(Rule("nat", "OUTPUT", ("-p", "tcp"), (OUTPUT,)))
    _outbound_rules(options, version, loopback, nat, tproxy)
    chains.append(("nat", REDIRECT))
    nat(REDIRECT, "-p", "tcp", target=("REDIRECT", "--to-ports", str(options.outbound_port)))

    policy_route = None
    if tproxy:
        chains.extend((("mangle", INBOUND), ("mangle", DIVERT), ("mangle", TPROXY), ("mangle", OUTPUT)))
        jumps.append(Rule("mangle", "PREROUTING", ("-p", "tcp"), (INBOUND,)))
        jumps.append(Rule("mangle", "OUTPUT", ("-p", "tcp"), (OUTPUT,)))
        rules.extend(_tproxy_rules(options, loopback))
        rules.extend(_tproxy_return_rules(options))
        policy_route = PolicyRoute(family, options.tproxy_mark, options.tproxy_table)

    # The inbound sidecar dials the app from ::6 (docs/ARCHITECTURE.md §3). IPv4 has all of 127/8 on lo; IPv6 only
    # has ::1, and the sidecar (uid 1337, no NET_ADMIN) cannot add an address itself.
    lo_source = LoSource(APP_SOURCE_NET_V6) if version == 6 else None
    return RuleSet(family, tuple(chains), tuple(rules), tuple(jumps), policy_route, lo_source)


def _outbound_rules(
    options: CaptureOptions, version: int, loopback: IPNetwork, nat: Callable[..., None], tproxy: bool
) -> None:
    app_source = APP_SOURCE_NET_V4 if version == 4 else APP_SOURCE_NET_V6
    # Excluded ports first: they must bypass even the "back to ourselves" redirect below.
    for port in options.exclude_outbound_ports:
        nat(OUTPUT, *_tcp_port(port), target=("RETURN",))
    # The inbound sidecar's connection to the app (source 127.0.0.6) must not be captured again.
    nat(OUTPUT, "-s", str(app_source), "-o", "lo", target=("RETURN",))
    if tproxy:
        # Nor its transparent dial in TPROXY mode (the caller's address as source, the socket carrying the mark).
        nat(OUTPUT, "-m", "mark", "--mark", _hex(options.tproxy_mark), target=("RETURN",))
    for match in ("--uid-owner", "--gid-owner"):
        owner = str(options.proxy_uid if match == "--uid-owner" else options.proxy_gid)
        # The outbound sidecar dialing this pod's own IP (an app calling its own service) leaves through lo: send
        # it to the inbound sidecar, so the call is mTLS-terminated and authorized like any other.
        nat(OUTPUT, "!", "-d", str(loopback), "-o", "lo", "-m", "owner", match, owner, target=(IN_REDIRECT,))
        # An app calling its own pod IP directly over lo stays plaintext: both ends are inside the pod.
        nat(OUTPUT, "-o", "lo", "-m", "owner", "!", match, owner, target=("RETURN",))
        # The sidecar's own outbound connections: redirecting them would loop forever.
        nat(OUTPUT, "-m", "owner", match, owner, target=("RETURN",))
    # Localhost is the pod talking to itself (and to the sidecar's admin port): never captured.
    nat(OUTPUT, "-d", str(loopback), target=("RETURN",))
    for network in options.exclude_outbound_cidrs:
        if network.version == version:
            nat(OUTPUT, "-d", str(network), target=("RETURN",))
    if options.include_outbound_cidrs is None:
        nat(OUTPUT, target=(REDIRECT,))
    for network in options.include_outbound_cidrs or ():
        if network.version == version:
            nat(OUTPUT, "-d", str(network), target=(REDIRECT,))


def _tproxy_rules(options: CaptureOptions, loopback: IPNetwork) -> list[Rule]:
    mark = _hex(options.tproxy_mark)
    any_addr = "0.0.0.0" if loopback.version == 4 else "::"
    established = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
    rules = [
        # Packets arriving on lo were sent inside the pod; the nat OUTPUT rules already decided about them (the
        # sidecar's dial to the app from 127.0.0.6, or its redirect to itself).
        Rule("mangle", INBOUND, ("-i", "lo"), ("RETURN",)),
        *(Rule("mangle", INBOUND, _tcp_port(port), ("RETURN",)) for port in options.inbound_excluded),
    ]
    ports: Sequence[tuple[str, ...]] = (
        [("-p", "tcp")] if options.inbound_ports is None else [_tcp_port(port) for port in options.inbound_ports]
    )
    for match in ports:
        # Packets of a connection already handed to the sidecar: mark them so policy routing delivers them
        # locally, where the socket lookup finds the sidecar's transparent socket.
        rules.append(Rule("mangle", INBOUND, (*match, *established), (DIVERT,)))
        rules.append(Rule("mangle", INBOUND, match, (TPROXY,)))
    rules += [
        Rule("mangle", DIVERT, (), ("MARK", "--set-xmark", f"{mark}/{_ALL}")),
        Rule("mangle", DIVERT, (), ("ACCEPT",)),
        Rule(
            "mangle",
            TPROXY,
            ("!", "-d", str(loopback), "-p", "tcp"),
            (
                "TPROXY",
                "--on-port",
                str(options.inbound_port),
                "--on-ip",
                any_addr,
                "--tproxy-mark",
                f"{mark}/0xffffffff",
            ),
        ),
    ]
    return rules


def _tproxy_return_rules(options: CaptureOptions) -> list[Rule]:
    """The return path of the sidecar's transparent dial to the app (mangle OUTPUT). The dial's packets carry the
    mark (SO_MARK), so policy routing keeps them on lo; the first rule copies it to the connection, the second puts
    it back on every packet of that connection, the app's replies included: addressed to the caller's IP, they
    would otherwise leave the pod, and marked they are routed back to lo, where the sidecar's socket takes them
    (the kernel routes a locally sent packet again when mangle OUTPUT changed its mark)."""
    mark = _hex(options.tproxy_mark)
    return [
        Rule("mangle", OUTPUT, ("-m", "mark", "--mark", mark), ("CONNMARK", "--set-xmark", f"{mark}/{_ALL}")),
        Rule(
            "mangle",
            OUTPUT,
            ("-m", "connmark", "--mark", mark),
            ("CONNMARK", "--restore-mark", "--nfmask", _ALL, "--ctmask", _ALL),
        ),
    ]


def build_rulesets(options: CaptureOptions) -> tuple[RuleSet, ...]:
    return tuple(build_ruleset(options, family) for family in options.families)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def render_expected(ruleset: RuleSet) -> str:
    """Our part of `iptables-save` once applied: our chains, the jumps into them, the rules in them."""
    out: list[str] = []
    for table in ruleset.tables():
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for t, chain in ruleset.chains if t == table]
        out += [jump.render() for jump in ruleset.jumps if jump.table == table]
        out += [rule.render() for rule in ruleset.rules if rule.table == table]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""
