"""`mtlsmesh uninject`: take the init container and the sidecar that `mtlsmesh inject` added out of a manifest again.

    mtlsmesh uninject -f app-injected.yaml [-o app.yaml]
    kubectl get deploy reviews -o yaml | mtlsmesh uninject -f - | kubectl apply -f -

The exact inverse of `mtlsmesh inject`: uninjecting what it wrote gives back what it read. A manifest with nothing
injected in it comes out as it went in (re-rendered, as inject renders it) with a note on stderr, so a mixed
manifest, or one uninjected twice, needs no special care. Reading and writing are `inject`'s (stdin as `-`, the
output replaced only once the whole input was handled); the work itself is `mtlsmesh.inject.uninject_text`.

What it does not: touch a cluster, or remove the SVID Secrets and the ConfigMap the injected pods mounted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mtlsmesh.cli.inject import add_file_arguments, read_manifest, source_name, write_output
from mtlsmesh.inject import uninject_text


def add_parser(subparsers: argparse._SubParsersAction[Any], help_text: str) -> None:
    parser = subparsers.add_parser(
        "uninject",
        help=help_text,
        description="Remove what `mtlsmesh inject` added to every pod template: the exact inverse.",
    )
    add_file_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = source_name(args)
    result = uninject_text(read_manifest(args.filename, source), source=source)
    if not result.uninjected:
        print(
            f"mtlsmesh: note: {source}: no pod template carries mtlsmesh.io/status: nothing to uninject",
            file=sys.stderr,
        )
    write_output(args, result.text)
    return 0
