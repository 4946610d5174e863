"""`mtlsmesh log-level [LEVEL]`: show or change the log level of the pod's running sidecar, over its admin port.

Without LEVEL it prints the level in force (from `GET /config_dump`: what `POST /logging` last set, else the
config's). With LEVEL (debug, info, warning, error) it sends `POST /logging?level=LEVEL` with the per-process admin
token from `--token-file` (only uid 1337 and root can read it); the sidecar logs `event=log_level` at warning, so
the change is seen at every level. The level lasts until the sidecar restarts. `--json` prints a list of one
object.
"""

from __future__ import annotations

import argparse
from typing import Any

from mtlsmesh.cli import output, pod
from mtlsmesh.cli.pod import AdminError
from mtlsmesh.conventions import LOG_LEVELS


def level_in_force(args: argparse.Namespace) -> str:
    dump = pod.admin_json(pod.admin_address(args.admin), "/config_dump")
    level = dump.get("log", {}).get("level") if isinstance(dump, dict) else None
    if not isinstance(level, str):
        raise AdminError(f"GET /config_dump on {args.admin}: no log.level in it")
    return level


def run(args: argparse.Namespace) -> int:
    if args.pod:
        return pod.run_in_pod(args.pod, args.argv)
    if args.level is not None:
        token_file = pod.token_path(args.token_file)
        token = pod.read_token(token_file)
        pod.admin_post(pod.admin_address(args.admin), f"/logging?level={args.level}", token, token_file)
    row: dict[str, Any] = {"admin": args.admin, "log_level": level_in_force(args), "changed": args.level is not None}
    if args.json:
        output.print_json([row])
    else:
        print(f"sidecar at {row['admin']}: log level {row['log_level']}{' (changed)' if row['changed'] else ''}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser("log-level", help=help_text, description=__doc__)
    parser.add_argument(
        "level", nargs="?", choices=LOG_LEVELS, metavar="LEVEL", help=f"{' | '.join(LOG_LEVELS)} (omit to show)"
    )
    pod.add_pod_flags(parser)
    pod.add_token_flag(parser)
    output.add_json_flag(parser)
    parser.set_defaults(run=run)
