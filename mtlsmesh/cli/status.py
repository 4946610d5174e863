"""`mtlsmesh status`: the pod's sidecar in a few lines, from its admin endpoint's `GET /status`.

Readiness, the SVID it serves and its time left, its listeners as bound, and its connections (open now, per
direction; the last outcomes kept). `mtlsmesh proxy-config` shows each part in full. Read-only; in a lab pod
with `--pod NAME`. `--json` prints a list of one object.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from mtlsmesh import durations
from mtlsmesh.cli import output, pod


def fetch_status(args: argparse.Namespace) -> dict[str, Any]:
    found = pod.admin_json(pod.admin_address(args.admin), "/status")
    if not isinstance(found, dict):
        raise pod.AdminError(f"GET /status on {args.admin}: not a JSON object")
    return found


def seconds_left(not_after: str) -> int:
    return int((datetime.fromisoformat(not_after.replace("Z", "+00:00")) - datetime.now(UTC)).total_seconds())


def summary(found: dict[str, Any]) -> dict[str, Any]:
    cert = found["certificate"]
    active = found.get("active", {})
    return {
        "ready": found["ready"],
        "draining": found["draining"],
        "spiffe_id": cert["spiffe_id"],
        "not_after": cert["not_after"],
        "seconds_left": seconds_left(cert["not_after"]),
        "listeners": [f"{row['name']}={row['address']}" for row in found["listeners"]],
        "open_outbound": int(active.get("outbound", 0)),
        "open_inbound": int(active.get("inbound", 0)),
        "recent_outcomes": len(found.get("recent", [])),
    }


def render_text(row: dict[str, Any]) -> str:
    state = "draining" if row["draining"] else "ready" if row["ready"] else "not ready"
    left = row["seconds_left"]
    time_left = f"{durations.format_duration(left)} left" if left > 0 else "EXPIRED"
    lines = [
        f"sidecar      {state}",
        f"identity     {row['spiffe_id']}",
        f"certificate  valid until {row['not_after']} ({time_left})",
        f"listeners    {', '.join(row['listeners'])}",
        f"connections  {row['open_outbound']} outbound and {row['open_inbound']} inbound open; "
        f"{row['recent_outcomes']} recent outcomes kept (mtlsmesh proxy-config recent)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.pod:
        return pod.run_in_pod(args.pod, args.argv)
    row = summary(fetch_status(args))
    if args.json:
        output.print_json([row])
    else:
        print(render_text(row))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser("status", help=help_text, description=__doc__)
    pod.add_pod_flags(parser)
    output.add_json_flag(parser)
    parser.set_defaults(run=run)
