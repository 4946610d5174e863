"""`mtlsmesh demo`: the bookinfo mesh in a pod lab, with the evidence (the lab itself is `mtlsmesh.lab`).

Only the flags live here; the lab is imported when the demo runs, so that a sidecar never loads it and an image
built without it still answers `mtlsmesh demo` with one line saying why it cannot.
"""

from __future__ import annotations

import argparse

from mtlsmesh.errors import LabError


def run(args: argparse.Namespace) -> int:
    try:
        from mtlsmesh.lab import demo
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("mtlsmesh.lab"):
            raise
        why = "the pod lab is not installed here (the image leaves it out): run the demo from a checkout"
        raise LabError(why) from None
    return demo.run(args)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=help_text,
        description="Build productpage -> details, reviews -> ratings as pods with sidecars, send requests through "
        "the mesh, and show the capture rules, the identities each sidecar saw and the encrypted wire.",
    )
    parser.add_argument("--keep", action="store_true", help="leave the lab running until Ctrl-C")
    parser.add_argument(
        "--files",
        action="store_true",
        help="give the sidecars SVID files from the lab's CA (the offline mode) instead of the CA service",
    )
    parser.add_argument(
        "--report",
        metavar="FILE.html",
        help="also write one self-contained HTML page: a picture of the mesh, the tables and the raw evidence",
    )
    parser.add_argument("--requests", type=int, default=3, help="requests to send through the mesh (default 3)")
    parser.add_argument(
        "--cleanup-stale", action="store_true", help="remove namespaces left by a killed demo or test run, and exit"
    )
    parser.set_defaults(run=run)
