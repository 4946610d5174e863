"""The `mtlsmesh` command line: one subcommand per module in this package.

Each module `mtlsmesh/cli/<name>.py` defines `add_parser(subparsers)`, which registers the subcommand and sets
`run=<callable(args) -> int>` as its default. This module finds them, parses the arguments, and turns a
`MeshError` into one line on stderr and exit status 2. A traceback from here is a bug. It names no subcommand
itself: adding a module is all it takes to add one.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from mtlsmesh import __version__
from mtlsmesh.errors import MeshError

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlsmesh", description="Zero-code mutual TLS between pods.")
    parser.add_argument("--version", action="version", version=f"mtlsmesh {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    package_path = sys.modules[__name__].__path__
    for module_info in sorted(pkgutil.iter_modules(package_path), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except MeshError as exc:
        print(f"mtlsmesh: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return int(status or 0)
