"""`mtlsmesh iptables`: the pod's init step, installing (or checking, or removing) the traffic-capture rules.

Every option is a flag or an environment variable (flags win), so an init container can be configured either way.
`--dry-run` prints the exact commands and payloads and needs no root: with `--cleanup` what cleanup would run,
with `--check` the rules `--check` expects to find. Exit status: 0 done, 1 `--check` found differences, 2 error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from mtlsmesh import capture, capture_plan, installer
from mtlsmesh.cli import output
from mtlsmesh.conventions import NEVER_CAPTURED_INBOUND
from mtlsmesh.errors import ConfigError

# (field, flag, environment variable, help). Defaults live in capture.CaptureOptions; help shows them.
_DEFAULTS = capture.CaptureOptions()
_OPTIONS = (
    ("proxy_uid", "--proxy-uid", "MTLSMESH_PROXY_UID", f"uid of the sidecar, never captured ({_DEFAULTS.proxy_uid})"),
    ("proxy_gid", "--proxy-gid", "MTLSMESH_PROXY_GID", f"gid of the sidecar, never captured ({_DEFAULTS.proxy_gid})"),
    (
        "outbound_port",
        "--outbound-port",
        "MTLSMESH_OUTBOUND_PORT",
        f"port of the outbound sidecar ({_DEFAULTS.outbound_port})",
    ),
    (
        "inbound_port",
        "--inbound-port",
        "MTLSMESH_INBOUND_PORT",
        f"port of the inbound sidecar ({_DEFAULTS.inbound_port})",
    ),
    (
        "inbound_ports",
        "--inbound-ports",
        "MTLSMESH_INBOUND_PORTS",
        "comma-separated inbound ports to capture, or * (default)",
    ),
    (
        "exclude_inbound_ports",
        "--exclude-inbound-ports",
        "MTLSMESH_EXCLUDE_INBOUND_PORTS",
        f"comma-separated inbound ports never captured ({' and '.join(map(str, NEVER_CAPTURED_INBOUND))} never are)",
    ),
    (
        "exclude_outbound_ports",
        "--exclude-outbound-ports",
        "MTLSMESH_EXCLUDE_OUTBOUND_PORTS",
        "outbound ports never captured",
    ),
    (
        "include_outbound_cidrs",
        "--include-outbound-cidrs",
        "MTLSMESH_INCLUDE_OUTBOUND_CIDRS",
        "comma-separated CIDRs to capture, or * (default)",
    ),
    (
        "exclude_outbound_cidrs",
        "--exclude-outbound-cidrs",
        "MTLSMESH_EXCLUDE_OUTBOUND_CIDRS",
        "destinations never captured",
    ),
    ("mode", "--interception-mode", "MTLSMESH_INTERCEPTION_MODE", "REDIRECT (default) or TPROXY for inbound"),
)
_BACKEND_ENV = "MTLSMESH_IPTABLES_BACKEND"
_IPV6_ENV = "MTLSMESH_IPV6"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser(
        "iptables",
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", nargs="?", choices=["apply"], default="apply", help="apply the rules (default)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--cleanup", action="store_true", help="remove our chains and the jumps into them")
    what.add_argument("--check", action="store_true", help="compare the namespace's rules with these options")
    for field, flag, env, text in _OPTIONS:
        metavar = "CIDRS" if "cidrs" in field else "PORTS" if "ports" in field else field.split("_")[-1].upper()
        parser.add_argument(flag, dest=field, metavar=metavar, help=f"{text}; env {env}")
    parser.add_argument(
        "--ipv6",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also capture IPv6 with ip6tables (default on); env {_IPV6_ENV}",
    )
    parser.add_argument(
        "--iptables-backend",
        metavar="auto|nft|legacy|system",
        help=f"iptables command family (auto: the one holding rules, else the system's); env {_BACKEND_ENV}",
    )
    parser.add_argument(
        "--json", action="store_true", help="--check: the differences, else the commands run, as a JSON list"
    )
    parser.set_defaults(run=run)


def options_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> capture.CaptureOptions:
    """Flags first, then environment variables, then CaptureOptions' defaults; errors name where a value came from."""
    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    for field, flag, env, _ in _OPTIONS:
        value = getattr(args, field)
        if value is not None:
            raw[field], sources[field] = value, flag
        elif env in environ:
            raw[field], sources[field] = environ[env], env
    if args.ipv6 is not None:
        raw["ipv6"], sources["ipv6"] = str(args.ipv6), "--ipv6"
    elif _IPV6_ENV in environ:
        raw["ipv6"], sources["ipv6"] = environ[_IPV6_ENV], _IPV6_ENV
    return capture.parse_capture_options(raw, sources=sources)


def backend_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> capture_plan.Backend | None:
    """None means auto-detect."""
    source, text = ("--iptables-backend", args.iptables_backend)
    if text is None:
        source, text = _BACKEND_ENV, environ.get(_BACKEND_ENV, "auto")
    text = text.strip().lower()
    if text == "auto":
        return None
    try:
        return capture_plan.Backend(text)
    except ValueError:
        raise ConfigError(source, f"unknown iptables backend {text!r}: expected auto, nft, legacy or system") from None


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args, os.environ)
    requested = backend_from_args(args, os.environ)
    if args.dry_run:
        # Without root nothing can be detected; the system's command names are what `auto` picks in a fresh pod.
        backend = requested or capture_plan.Backend.SYSTEM
        if args.check:
            sys.stdout.write("".join(capture.render_expected(rs) for rs in capture.build_rulesets(options)))
        else:
            sys.stdout.write(capture_plan.render_dry_run(options, backend, cleanup=args.cleanup))
        return 0
    backend = installer.detect_backend(requested)
    if args.check:
        differences = installer.check(options, backend)
        if args.json:
            output.print_json([{"backend": backend.value, "difference": line} for line in differences])
            return 1 if differences else 0
        for line in differences:
            print(line)
        if differences:
            print(f"mtlsmesh: {len(differences)} difference(s) from the expected capture rules", file=sys.stderr)
            return 1
        print(f"capture rules match ({backend.value} backend)")
        return 0
    steps = installer.cleanup(options, backend) if args.cleanup else installer.apply(options, backend)
    if args.json:
        output.print_json([{"backend": backend.value, "command": step.render()} for step in steps])
        return 0
    for step in steps:
        print(step.render())
    verb = "removed" if args.cleanup else "applied and verified"
    print(f"# capture rules {verb} ({backend.value} backend, {len(steps)} command(s))", file=sys.stderr)
    return 0
