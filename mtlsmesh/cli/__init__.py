"""The `mtlsmesh` command line: one subcommand per module in this package.

`COMMANDS` names each subcommand and its one-line help. Only the module of the subcommand being run is imported:
`mtlsmesh sidecar` loads the sidecar and nothing of the CA's CLI or the pod lab. Each module `mtlsmesh/cli/<name>.py`
(a `-` in the name is `_` there) defines `add_parser(subparsers, help_text)`, which registers its subcommand and
sets `run=<callable(args) -> int>` as its default. For `mtlsmesh --help` (no subcommand given) the others are
listed by name and help alone. This module turns a `MeshError` into one line on stderr and exit status 2; a line
citing SPIFFE rule ids says where they are explained (`errors.with_rules_doc`). A traceback from here is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from mtlsmesh.errors import MeshError, with_rules_doc

if TYPE_CHECKING:  # trio is imported only by the commands that run an event loop
    import trio

EXIT_ERROR = 2

COMMANDS = {
    "ca": "the built-in SPIFFE CA",
    "check": "check this pod's mesh: capture rules, listeners, health, SVID, bundle, CA, clock (one line each)",
    "completion": "print a shell completion script (bash, zsh, tcsh, ...) generated from these commands' flags",
    "demo": "build the bookinfo mesh in network namespaces and show mTLS at work (root)",
    "drain": "drain the pod's sidecar: stop accepting, health 503, open connections finish (POST, admin token)",
    "explain": "say why a connection is (not) encrypted: capture rule, sidecar decision, policy, verdict",
    "inject": "add the mesh's init container and sidecar to Kubernetes manifests",
    "iptables": "install the pod's traffic-capture rules (the init step)",
    "log-level": "show or change the running sidecar's log level (changing it is a POST with the admin token)",
    "proxy-config": "show one part of the pod's sidecar in full: listeners, config, certs, connections, recent",
    "sidecar": "run the pod's mTLS sidecar",
    "status": "show the pod's sidecar in a few lines: ready, SVID and time left, listeners, connections",
    "uninject": "remove what inject added from Kubernetes manifests (its exact inverse)",
    "version": "print the versions of mtlsmesh, Python, OpenSSL, cryptography and pyOpenSSL",
    "webhook": "serve the Kubernetes admission webhook that injects pods as they are created",
}


class _VersionAction(argparse.Action):
    """`--version`: what `mtlsmesh version` prints; its module (which imports cryptography) loads only then."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(importlib.import_module(f"{__name__}.version").text())
        parser.exit()


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` asks for: its first word that is not an option (the top level takes no values)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full arguments of the subcommand `argv` names (every one when `argv` is None)."""
    parser = argparse.ArgumentParser(prog="mtlsmesh", description="Zero-code mutual TLS between pods.")
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else _command_in(argv)
    for name, help_text in COMMANDS.items():
        if argv is None or name == wanted:
            module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
            module.add_parser(subparsers, help_text)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(words)
    args = parser.parse_args(words)
    args.argv = words  # what `--pod NAME` runs again inside the pod
    try:
        status = args.run(args)
    except MeshError as exc:
        print(f"mtlsmesh: error: {with_rules_doc(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return int(status or 0)


@contextlib.contextmanager
def unwrap_mesh_errors() -> Iterator[None]:
    """trio's nurseries wrap errors in groups; a bind failure (ConfigError) is still one line for the user."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if leaves and all(isinstance(leaf, MeshError) for leaf in leaves):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def stop_on_signals(stop: trio.Event, logger: str, *, task_status: trio.TaskStatus[None]) -> None:
    """Set `stop` at the first SIGTERM or SIGINT, with one log line: how the long-running commands (sidecar, CA
    service, webhook) end. Started with `nursery.start`, so the signals are caught from then on."""
    import signal

    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            logging.getLogger(logger).info("event=signal signal=%s", signal.Signals(signum).name)
            stop.set()
            return
