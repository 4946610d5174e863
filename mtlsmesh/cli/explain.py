"""`mtlsmesh explain`: why a connection is (or is not) encrypted, in one answer.

    mtlsmesh explain --to 198.18.0.12:9080                     # an app in this pod calling out
    mtlsmesh explain --from spiffe://td/ns/x/sa/y --port 9080  # a mesh workload calling this pod
    mtlsmesh explain --from plaintext --port 9080              # a client without a sidecar
    mtlsmesh explain --listener web [--from spiffe://td/...]   # an explicit listener (by name or port)

Where: in the pod (the rules from `iptables-save` of this network namespace, root; the config from the sidecar's
admin endpoint), in a lab pod (`--pod NAME`), or anywhere against files (`--config FILE --rules DUMP`, the dump as
`iptables-save` prints it). `--no-rules` explains the sidecar's part alone. An inbound call is explained for
each address family whose rules hold anything (IPv4 from `iptables-save`, IPv6 from `ip6tables-save`; with
files, `--rules` and `--rules6`), one object each. An explicit listener involves no capture rules: `--listener`
says what it does (STRICT mTLS, the identities it expects or lets through, then the authorization rules). The
walk and the decisions are `mtlsmesh.explain`, which calls the sidecar's own decision functions. `--live` also
asks the running sidecar (admin `GET /explain`) for its decision and its last outcomes for that destination. Exit
status 0 (explained), 2 (could not: one line says why).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from typing import Any

from mtlsmesh import explain
from mtlsmesh.addresses import IPAddress, split_host_port
from mtlsmesh.capture import Family
from mtlsmesh.capture_plan import SavedTable
from mtlsmesh.cli import output, pod
from mtlsmesh.config import Config, load_config, parse_config
from mtlsmesh.errors import CaptureError, ConfigError, IdentityError
from mtlsmesh.identity import SpiffeId, parse_workload_id


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser(
        "explain", help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--to", metavar="IP:PORT", help="explain an outbound connection from this pod's app")
    what.add_argument(
        "--listener", metavar="NAME|PORT", help="explain an explicit listener (with --from: its caller, terminate)"
    )
    parser.add_argument("--from", dest="caller", metavar="SPIFFE_ID", help="explain an inbound call (or `plaintext`)")
    parser.add_argument("--port", type=int, metavar="PORT", help="with --from: the port of this pod called")
    parser.add_argument("--config", metavar="FILE", help="the sidecar's config file (default: from --admin)")
    rules = parser.add_mutually_exclusive_group()
    rules.add_argument("--rules", metavar="FILE", help="an iptables-save dump (default: this namespace's, root)")
    rules.add_argument("--no-rules", action="store_true", help="leave out the capture rules")
    parser.add_argument("--rules6", metavar="FILE", help="an ip6tables-save dump: also explain an inbound call on IPv6")
    parser.add_argument("--live", action="store_true", help="also ask the running sidecar (admin GET /explain)")
    pod.add_pod_flags(parser)
    output.add_json_flag(parser)
    parser.set_defaults(run=run)


def _destination(text: str) -> tuple[IPAddress, int]:
    split = split_host_port(text)
    if split is None:
        raise ConfigError("--to", f"expected IP:PORT, e.g. 198.18.0.12:9080 or [2001:db8::1]:443 (got {text!r})")
    host, port, _ = split
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError("--to", f"{host!r} is not an IP address (explain takes the address the app dials)") from None
    if not 0 < port < 65536:
        raise ConfigError("--to", f"port {port} is out of range 1-65535")
    return ip, port


def _caller(text: str) -> SpiffeId | None:
    if text == "plaintext":
        return None
    try:
        return parse_workload_id(text)
    except IdentityError as exc:
        raise ConfigError("--from", f"{exc} (or `plaintext` for a client without a sidecar)") from None


def load_cfg(args: argparse.Namespace) -> Config:
    if args.config:
        return load_config(args.config)
    address = pod.admin_address(args.admin)
    try:
        return parse_config(pod.admin_json(address, "/config_dump"), f"{address}/config_dump")
    except pod.AdminError as exc:
        raise pod.AdminError(f"{exc}; give --config FILE to explain without a running sidecar") from None


def load_tables(args: argparse.Namespace, family: Family) -> dict[str, SavedTable] | None:
    if args.no_rules:
        return None
    if args.rules:
        return pod.read_rules_file(args.rules)
    try:
        return pod.read_rules(family)
    except CaptureError as exc:
        raise ConfigError("rules", f"{exc}; give --rules DUMP (iptables-save output) or --no-rules") from None


def is_local(ip: IPAddress) -> bool:
    """Whether `ip` is an address of this network namespace (binding to it succeeds only then)."""
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


# The address an inbound call is sent to, per family, when no rule looks at it: any address not loopback.
INBOUND_DST = {Family.V4: ipaddress.ip_address("198.18.255.254"), Family.V6: ipaddress.ip_address("2001:db8::fffe")}


def _check_args(args: argparse.Namespace) -> None:
    if args.to is None and args.listener is None and args.caller is None:
        raise ConfigError("--to", "say what to explain: --to IP:PORT, --from ID --port PORT, or --listener NAME")
    if args.to is not None and args.caller is not None:
        raise ConfigError("--from", "--from explains an inbound call; --to an outbound one: give one of them")
    if args.listener is not None:
        for flag, given in (("--port", args.port is not None), ("--live", args.live), ("--rules6", args.rules6)):
            if given:
                raise ConfigError(flag, f"{flag} does not go with --listener (no capture rule is involved)")
        return
    if args.caller is not None and args.port is None:
        raise ConfigError("--port", "--from needs --port: the port of this pod that is called")
    if args.to is not None and args.port is not None:
        raise ConfigError("--port", "--port goes with --from; --to names its port itself (IP:PORT)")
    if args.port is not None and not 0 < args.port < 65536:
        raise ConfigError("--port", f"port {args.port} is out of range 1-65535")


def inbound_tables(args: argparse.Namespace) -> list[tuple[Family, dict[str, SavedTable] | None]]:
    """The rule sets an inbound call is walked through: IPv4's, and IPv6's when given (`--rules6`) or, read in the
    namespace, when ip6tables has any rule at all (an IPv4-only pod has none, and is explained for IPv4 alone)."""
    found: list[tuple[Family, dict[str, SavedTable] | None]] = [(Family.V4, load_tables(args, Family.V4))]
    if args.rules6:
        found.append((Family.V6, pod.read_rules_file(args.rules6)))
    elif not args.no_rules and not args.rules:
        try:
            v6 = pod.read_rules(Family.V6)
        except CaptureError:
            v6 = {}  # no ip6tables here: no IPv6 capture either
        if any(table.rules for table in v6.values()):
            found.append((Family.V6, v6))
    return found


def run(args: argparse.Namespace) -> int:
    if args.pod:
        return pod.run_in_pod(args.pod, args.argv)
    _check_args(args)
    cfg = load_cfg(args)
    answers: list[dict[str, Any]] = []
    query = ""
    if args.listener is not None:
        listener = explain.find_listener(cfg, args.listener)
        caller = _caller(args.caller) if args.caller is not None else None
        answers.append(explain.explain_listener(cfg, listener, caller).to_dict())
    elif args.to is not None:
        ip, port = _destination(args.to)
        family = Family.V6 if ip.version == 6 else Family.V4
        tables = load_tables(args, family)
        # Only in the namespace itself can we tell the pod's own addresses (they leave through lo).
        local = is_local(ip) if tables is not None and not args.rules else ip.is_loopback
        answers.append({**explain.explain_outbound(cfg, tables, ip, port, local=local).to_dict(), "family": family})
        query = f"/explain?to={args.to}"
    else:
        caller = _caller(args.caller)
        for family, tables in inbound_tables(args):
            answer = explain.explain_inbound(cfg, tables, args.port, caller, dst=INBOUND_DST[family])
            answers.append({**answer.to_dict(), "family": family})
        query = f"/explain?port={args.port}" + (f"&from={caller}" if caller is not None else "")
    for found in answers:
        if "family" in found:
            found["family"] = "ipv6" if found["family"] is Family.V6 else "ipv4"
        if args.live:
            found["live"] = _live(args, query, found)
    if args.json:
        output.print_json(answers)
    else:
        print("\n\n".join(render_text(found) for found in answers))
    return 0


def _live(args: argparse.Namespace, query: str, offline: dict[str, Any]) -> dict[str, Any]:
    from urllib.parse import quote

    path, _, params = query.partition("?")
    encoded = "&".join(f"{k}={quote(v, safe='')}" for k, _, v in (p.partition("=") for p in params.split("&")))
    [live] = pod.admin_json(pod.admin_address(args.admin), f"{path}?{encoded}")
    live["agrees"] = live.get("decision") == offline["decision"] or not offline["captured"]
    return dict(live)


def render_text(found: dict[str, Any]) -> str:
    family = " (IPv6)" if found.get("family") == "ipv6" else ""
    lines = [f"{found['direction']} {found['target']}{family}"]
    capture = found["capture"]
    if capture is None:
        lines.append("  capture:        not looked at (no rules)")
    else:
        to_port = f" to port {capture['port']}" if capture["port"] else ""
        shown = {"let_by": "not captured", "unknown": "cannot tell"}.get(capture["outcome"], capture["outcome"])
        lines.append(f"  capture:        {shown}{to_port}")
        for step in capture["matched"]:
            lines.append(f"    {step}")
        lines.append(f"    deciding:     {capture['deciding_rule']}")
    if found["mode"] is not None:
        sniffed = "sniffed" if found["sniffed"] else "not sniffed"
        lines.append(f"  inbound mode:   {found['mode']} ({sniffed})")
    lines.append(f"  decision:       {found['decision']}: {found['reason']}")
    if (found["direction"] == "outbound" and found["decision"] == "mtls") or found.get("listener"):
        lines.append(f"  identities:     {', '.join(found['identities']) or 'any workload of the trust domain'}")
    if found["authorization"] is not None:
        authz = found["authorization"]
        lines.append(f"  authorization:  {'allowed' if authz['allowed'] else 'denied'}: {authz['reason']}")
    for note in found["notes"]:
        lines.append(f"  note:           {note}")
    if "live" in found:
        live = found["live"]
        agrees = "agrees" if live["agrees"] else "DISAGREES (is the config file the one it runs with?)"
        lines.append(f"  live sidecar:   {live['decision']}: {live['reason']} ({agrees})")
        for entry in live["recent"] or []:
            peer = entry["peer_id"] or "-"
            detail = f" ({entry['detail']})" if entry["detail"] else ""
            lines.append(
                f"    {entry['time']} {entry['client']} peer={peer} {entry['decision']} {entry['reason']}{detail}"
            )
        if not live["recent"]:
            lines.append("    no recent connections there")
    lines.append(f"verdict: {found['verdict']}")
    return "\n".join(lines)
