"""The one seam to OpenSSL: what it needs of pyOpenSSL is checked at import, and named when it is missing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mtlsmesh import handshake

ROOT = Path(__file__).resolve().parents[2]


def test_this_pyopenssl_has_everything_the_seam_needs() -> None:
    assert handshake.missing_bindings() == []


def test_a_missing_binding_is_named_with_the_package_that_should_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        handshake,
        "REQUIRED",
        (*handshake.REQUIRED, ("OpenSSL._util.lib", "SSL_no_such_call"), ("OpenSSL.SSL.Context", "no_such_method")),
    )
    missing = handshake.missing_bindings()
    assert len(missing) == 2
    assert missing[0].startswith("OpenSSL._util.lib.SSL_no_such_call (not in cryptography ")
    assert missing[1].startswith("OpenSSL.SSL.Context.no_such_method (not in pyOpenSSL ")


def _private_uses(path: Path) -> list[str]:
    """`OpenSSL._util` imports and `._<name>` attribute reads on pyOpenSSL objects, as far as the source shows."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("OpenSSL._"):
            found.append(f"{path.name}:{node.lineno}: from {node.module}")
        if isinstance(node, ast.Attribute) and node.attr in {"_context", "_ssl", "_into_ssl", "_from_ssl"}:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return found


def test_no_module_but_the_seam_touches_pyopenssl_privates() -> None:
    offenders = [
        use
        for path in sorted([*(ROOT / "mtlsmesh").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
        if path != ROOT / "mtlsmesh" / "handshake.py"
        for use in _private_uses(path)
    ]
    assert offenders == []
    assert _private_uses(ROOT / "mtlsmesh" / "handshake.py")  # the check sees the seam's own uses
