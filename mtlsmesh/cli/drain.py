"""`mtlsmesh drain`: tell the pod's sidecar to drain, over its admin endpoint's `POST /drain`.

The sidecar stops accepting (its listeners close), `/healthz/ready` turns 503 so the pod leaves its Services'
endpoints, and open connections run to their end; the process stays up until SIGTERM. With `--wait` this command
then waits until no connection is open (or `--timeout` passes: exit 1). It prints the sidecar's state afterwards:
draining, ready, the connections still open; `--json` as a list of one object.

The POST carries the per-process admin token from `--token-file` (only uid 1337 and root can read it): in
Kubernetes `kubectl exec POD -c mtlsmesh-proxy -- mtlsmesh drain`, in a lab pod `--pod NAME --token-file FILE`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mtlsmesh import durations
from mtlsmesh.cli import output, pod
from mtlsmesh.cli.status import fetch_status

POLL = 0.2  # seconds between two looks at the open connections while waiting
SETTLE = 5.0  # seconds for the sidecar to report draining after it accepted the POST (it takes a moment)


def state(args: argparse.Namespace) -> dict[str, Any]:
    found = fetch_status(args)
    active = found.get("active", {})
    return {
        "admin": args.admin,
        "draining": bool(found["draining"]),
        "ready": bool(found["ready"]),
        "open_inbound": int(active.get("inbound", 0)),
        "open_outbound": int(active.get("outbound", 0)),
    }


def render_text(row: dict[str, Any]) -> str:
    what = "draining" if row["draining"] else "NOT draining"
    return (
        f"sidecar at {row['admin']}: {what}, health {'ready' if row['ready'] else 'not ready (503)'}, "
        f"{row['open_inbound']} inbound and {row['open_outbound']} outbound connections open"
    )


def run(args: argparse.Namespace) -> int:
    if args.pod:
        return pod.run_in_pod(args.pod, args.argv)
    timeout = durations.parse_flag(args.timeout, "--timeout")
    token_file = pod.token_path(args.token_file)
    token = pod.read_token(token_file)
    pod.admin_post(pod.admin_address(args.admin), "/drain", token, token_file)
    # The sidecar answers the POST at once and closes its listeners right after: give it that moment.
    row = state(args)
    settle = time.monotonic() + SETTLE
    while not row["draining"] and time.monotonic() < settle:
        time.sleep(POLL / 4)
        row = state(args)
    status = 0
    if args.wait:
        deadline = time.monotonic() + timeout
        while row["open_inbound"] + row["open_outbound"] > 0 and time.monotonic() < deadline:
            time.sleep(POLL)
            row = state(args)
        status = 1 if row["open_inbound"] + row["open_outbound"] > 0 else 0
    if args.json:
        output.print_json([row])
    else:
        print(render_text(row))
    return status


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser("drain", help=help_text, description=__doc__)
    pod.add_pod_flags(parser)
    pod.add_token_flag(parser)
    parser.add_argument(
        "--wait", action="store_true", help="then wait until no connection is open (exit 1 if some still are)"
    )
    parser.add_argument("--timeout", metavar="DURATION", default="60s", help="how long --wait waits (%(default)s)")
    output.add_json_flag(parser)
    parser.set_defaults(run=run)
