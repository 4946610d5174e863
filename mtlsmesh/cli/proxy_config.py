"""`mtlsmesh proxy-config WHAT`: one part of the pod's sidecar in full, from its admin endpoint (GET only).

    listeners     every listener as bound (the real port, also for a configured port 0)
    config        the config the sidecar runs with (`/config_dump`), as YAML (or JSON with --json)
    certs         the SVID it serves: SPIFFE ID, serial, validity, SHA-256, the roots it trusts
    connections   the connections open now: direction, client, original destination, peer, decision, age
    recent        the last outcomes per destination (what `explain --live` shows for one)

A table by default, `--json` a list of objects. In a lab pod with `--pod NAME`.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from mtlsmesh.cli import output, pod
from mtlsmesh.cli.status import fetch_status, seconds_left

PARTS = ("listeners", "config", "certs", "connections", "recent")


def rows(part: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    if part == "config":
        return [pod.admin_json(pod.admin_address(args.admin), "/config_dump")]
    found = fetch_status(args)
    if part == "listeners":
        return list(found["listeners"])
    if part == "certs":
        cert = dict(found["certificate"])
        cert["seconds_left"] = seconds_left(cert["not_after"])
        return [cert]
    if part == "connections":
        return list(found["open"])
    return list(found["recent"])


COLUMNS = {
    "listeners": ("name", "address"),
    "certs": ("spiffe_id", "serial", "not_before", "not_after", "seconds_left", "sha256", "roots"),
    "connections": ("direction", "listener", "client", "orig_dst", "peer_id", "decision", "age_seconds"),
    "recent": ("time", "direction", "orig_dst", "client", "peer_id", "decision", "reason", "detail"),
}


def run(args: argparse.Namespace) -> int:
    if args.pod:
        return pod.run_in_pod(args.pod, args.argv)
    found = rows(args.part, args)
    if args.json:
        output.print_json(found)
    elif args.part == "config":
        print(yaml.safe_dump(found[0], sort_keys=False).rstrip())
    elif args.part == "certs":
        for key in COLUMNS["certs"]:
            print(f"{key:<13} {output.cell(found[0].get(key))}")
    elif not found:
        print(f"no {args.part}")
    else:
        print(output.table(found, COLUMNS[args.part]))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser(
        "proxy-config", help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=PARTS, metavar="WHAT", help=" | ".join(PARTS))
    pod.add_pod_flags(parser)
    output.add_json_flag(parser)
    parser.set_defaults(run=run)
