"""`mtlsmesh version` (and `mtlsmesh --version`): this package's version and those of what its TLS stands on.

The OpenSSL shown is the one the mesh's TLS runs on: cryptography's own build, which pyOpenSSL binds through, not
necessarily the one Python's `ssl` module links (shown apart, since nothing of the mesh's data path uses it).
"""

from __future__ import annotations

import argparse
import platform
import ssl
from importlib import metadata

from mtlsmesh import __version__
from mtlsmesh.cli import output


def components() -> list[dict[str, str]]:
    """One object per component: its name, version and what it is for."""
    from cryptography.hazmat.backends.openssl.backend import backend

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [
        {"component": "mtlsmesh", "version": __version__, "role": "this package"},
        {"component": "python", "version": platform.python_version(), "role": platform.python_implementation()},
        {"component": "openssl", "version": backend.openssl_version_text(), "role": "the mesh's TLS (cryptography's)"},
        {"component": "cryptography", "version": dist("cryptography"), "role": "X.509, keys, OpenSSL binding"},
        {"component": "pyOpenSSL", "version": dist("pyOpenSSL"), "role": "TLS contexts and handshakes"},
        {"component": "trio", "version": dist("trio"), "role": "async I/O"},
        {"component": "python-ssl", "version": ssl.OPENSSL_VERSION, "role": "Python's ssl module (not the mesh's)"},
    ]


def text() -> str:
    rows = components()
    head, rest = rows[0], rows[1:]
    return f"mtlsmesh {head['version']}\n" + output.table(rest, ("component", "version", "role"))


def run(args: argparse.Namespace) -> int:
    if args.json:
        output.print_json(components())
    else:
        print(text())
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser(
        "version",
        help=help_text,
        description="Print mtlsmesh's version and those of Python, OpenSSL, cryptography, pyOpenSSL and trio.",
    )
    output.add_json_flag(parser)
    parser.set_defaults(run=run)
