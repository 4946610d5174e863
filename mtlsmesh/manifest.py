"""Kubernetes manifests as text: multi-document YAML in, the same documents out, key order kept.

Parsing is `yaml.safe_load_all` (no Python tags), and a syntax error names the file and line. Rendering keeps each
mapping's key order, indents lists under their key, writes multi-line strings as literal blocks and never uses
anchors, so the output reads like a hand-written manifest and renders again to the same bytes. YAML comments are
lost (PyYAML does not keep them) and empty documents are dropped. No files here: text in, text out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from mtlsmesh.errors import ConfigError


class _Dumper(yaml.SafeDumper):
    """Safe dumping with block lists indented under their key and multi-line strings as literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True  # kubectl reads anchors, but people reading the output should not have to


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None  # the emitter falls back to quoting when a block cannot hold the text
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def parse_manifests(text: str, source: str) -> list[object]:
    """Every YAML document of `text`; a syntax error names `source` and the line."""
    try:
        return list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = exc.problem or exc.context or "malformed YAML"
        raise ConfigError(where, f"malformed YAML: {_one_line(problem)}") from exc
    except yaml.reader.ReaderError as exc:
        # Raised before any line is known: name the offending character and where it sits in the text.
        character = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        raise ConfigError(
            source, f"malformed YAML: character {character!r} at offset {exc.position} is not allowed"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"malformed YAML: {_one_line(str(exc))}") from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())  # the CLI promises one line per error


def render_manifests(documents: Sequence[object]) -> str:
    """The documents as multi-document YAML, keys in their original order; empty documents are dropped."""
    kept = [doc for doc in documents if doc is not None]
    return yaml.dump_all(kept, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
