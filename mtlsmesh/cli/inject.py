"""`mtlsmesh inject`: add the capture init container and the sidecar to every pod template of a manifest.

    mtlsmesh inject -f app.yaml [-o app-injected.yaml] [--image IMAGE] [--identity ca|secret]
    kubectl get deploy reviews -o yaml | mtlsmesh inject -f - | kubectl apply -f -

Reads the file (`-` is stdin), writes to stdout unless `-o` names a file; the output file is replaced only after
the whole input injected cleanly, so a bad input loses nothing (even with `-o` naming the input). Warnings (a
hostNetwork pod skipped, a probe strict mode would refuse) go to stderr. `--identity` is where a pod without the
`mtlsmesh.io/identity` annotation gets its SVID: `ca` (the default, the CA service with a projected token) or
`secret` (the Secret `mtlsmesh ca issue --k8s-secret` writes, offline). The work itself is `mtlsmesh.inject`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from mtlsmesh.annotations import IDENTITY, IDENTITY_SOURCES
from mtlsmesh.errors import ConfigError
from mtlsmesh.inject import InjectOptions, inject_text


def add_parser(subparsers: argparse._SubParsersAction[Any], help_text: str) -> None:
    parser = subparsers.add_parser(
        "inject",
        help=help_text,
        description="Add the mtlsmesh capture init container and native sidecar to every pod template.",
    )
    add_file_arguments(parser)
    parser.add_argument("--image", default=InjectOptions().image, help="mtlsmesh image (default: %(default)s)")
    parser.add_argument(
        "--identity",
        choices=IDENTITY_SOURCES,
        default=InjectOptions().identity,
        help=f"SVID source of pods without the {IDENTITY} annotation: the CA service or the SVID Secret "
        "(default: %(default)s)",
    )
    parser.set_defaults(run=run)


def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    """-f FILE and -o FILE, as `inject` and `uninject` both take them."""
    parser.add_argument("-f", "--filename", required=True, metavar="FILE", help="manifest to read, - for stdin")
    parser.add_argument("-o", "--output", metavar="FILE", default="-", help="where to write (default: stdout)")


def source_name(args: argparse.Namespace) -> str:
    return "<stdin>" if args.filename == "-" else str(args.filename)


def write_output(args: argparse.Namespace, text: str) -> None:
    """The manifest out: to stdout, or written atomically to -o FILE."""
    if args.output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomically(args.output, text)


def run(args: argparse.Namespace) -> int:
    source = source_name(args)
    text = read_manifest(args.filename, source)
    if not args.image.strip():
        raise ConfigError("--image", "must not be empty")
    result = inject_text(text, source=source, options=InjectOptions(image=args.image, identity=args.identity))
    for warning in result.warnings:
        print(f"mtlsmesh: warning: {warning}", file=sys.stderr)
    write_output(args, result.text)
    return 0


def read_manifest(filename: str, source: str) -> str:
    """The manifest's text (`-`: stdin); `ConfigError` naming `source` when it cannot be read or is not UTF-8."""
    try:
        # Bytes, decoded strictly: stdin's text layer may smuggle bad bytes in as surrogates.
        if filename == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(filename, "rb") as handle:
                data = handle.read()
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is allowed, as kubectl allows it
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not UTF-8 text (byte {exc.start})") from exc


def write_atomically(path: str, text: str) -> None:
    """Replace `path` with `text` in one rename, so a reader never sees half a manifest."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp_path = tempfile.mkstemp(prefix=".mtlsmesh-inject-", dir=directory)
    except OSError as exc:
        raise ConfigError(path, f"cannot write: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except OSError as exc:
        os.unlink(tmp_path)
        raise ConfigError(path, f"cannot write: {exc.strerror or exc}") from exc
