"""`mtlsmesh completion SHELL`: a shell completion script, generated from the argument parser itself.

shtab walks the same `argparse` tree that `mtlsmesh` parses with (every subcommand loaded), so the completion can
never offer a flag the command does not have. File arguments (a metavar naming a FILE, a `.pem`, a DIR) complete
as paths. Install with e.g. `mtlsmesh completion bash > /etc/bash_completion.d/mtlsmesh`, or
`eval "$(mtlsmesh completion bash)"` in a shell's rc file.
"""

from __future__ import annotations

import argparse

import shtab

SHELLS = tuple(shtab.SUPPORTED_SHELLS)
_FILE_WORDS = ("FILE", ".pem", "ROOT")
_DIR_WORDS = ("DIR",)


def _mark_paths(parser: argparse.ArgumentParser) -> None:
    """Set shtab's `complete` on arguments that take a path, judged by their metavar or name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_paths(sub)
            continue
        shown = str(action.metavar or action.dest)
        if any(word in shown for word in _DIR_WORDS) or action.dest in ("dir", "ca_dir", "out"):
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        elif any(word in shown for word in _FILE_WORDS) or action.dest in ("file", "cert", "key", "bundle", "config"):
            action.complete = shtab.FILE  # type: ignore[attr-defined]


def script(shell: str) -> str:
    from mtlsmesh.cli import build_parser

    parser = build_parser(None)
    _mark_paths(parser)
    return shtab.complete(parser, shell=shell)


def run(args: argparse.Namespace) -> int:
    print(script(args.shell))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser(
        "completion",
        help=help_text,
        description="Print a completion script for SHELL, generated from mtlsmesh's own argument parser. "
        'bash: eval "$(mtlsmesh completion bash)"; zsh: mtlsmesh completion zsh > "${fpath[1]}/_mtlsmesh"; '
        "tcsh: eval `mtlsmesh completion tcsh`.",
    )
    parser.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    parser.set_defaults(run=run)
