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


# pyOpenSSL's private handles and helpers that code outside the seam could reach for.
PRIVATE_NAMES = {"_context", "_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error", "_reverse_mapping", "_lib", "_ffi"}


def _private_module(module: str | None, names: list[str]) -> bool:
    return module is not None and (
        module.startswith("OpenSSL._") or (module == "OpenSSL" and any(name.startswith("_") for name in names))
    )


def _private_uses(path: Path) -> list[str]:
    """Imports of pyOpenSSL's private modules in any form, and reads of its private handles (as attributes or by
    `getattr` with a literal name), as far as the source shows."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _private_module(node.module, [alias.name for alias in node.names]):
            found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
        if isinstance(node, ast.Import) and any(alias.name.startswith("OpenSSL._") for alias in node.names):
            found.append(f"{path.name}:{node.lineno}: import OpenSSL._...")
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in PRIVATE_NAMES
        ):
            found.append(f"{path.name}:{node.lineno}: getattr(..., {node.args[1].value!r})")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "from OpenSSL import _util",
        "import OpenSSL._util",
        "from OpenSSL._util import lib",
        "x = conn._into_ssl",
        "x = getattr(ctx, '_context')",
    ],
)
def test_the_private_use_check_sees_each_form(tmp_path: Path, source: str) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(source + "\n")
    assert _private_uses(probe)


def test_no_module_but_the_seam_touches_pyopenssl_privates() -> None:
    offenders = [
        use
        for path in sorted([*(ROOT / "mtlsmesh").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
        if path != ROOT / "mtlsmesh" / "handshake.py"
        for use in _private_uses(path)
    ]
    assert offenders == []
    assert _private_uses(ROOT / "mtlsmesh" / "handshake.py")  # the check sees the seam's own uses
