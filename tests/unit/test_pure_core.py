"""The pure core stays pure: importing it loads no I/O machinery (docs/ARCHITECTURE.md §10)."""

from __future__ import annotations

import subprocess
import sys

import pytest

IO_MODULES = ("trio", "socket", "ssl", "OpenSSL", "subprocess", "asyncio")


def _io_loaded(setup: str, module: str) -> str:
    """The I/O modules importing `module` loads in a fresh interpreter (this one has long since imported all of
    them), beyond those `setup` already loaded."""
    probe = (
        f"import sys; {setup}; before = set(sys.modules); import {module}; "
        f"print(','.join(m for m in {IO_MODULES!r} if m in sys.modules and m not in before))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


@pytest.mark.parametrize(
    "module",
    [
        "mtlsmesh.sniff",
        "mtlsmesh.policy",
        "mtlsmesh.config",
        "mtlsmesh.schema",
        "mtlsmesh.records",
        "mtlsmesh.conventions",
        "mtlsmesh.addresses",
        "mtlsmesh.outcome",
        "mtlsmesh.tokens",
        "mtlsmesh.admission",
    ],
)
def test_importing_loads_no_io_module(module: str) -> None:
    assert _io_loaded("pass", module) == ""


@pytest.mark.parametrize("module", ["mtlsmesh.caproto"])
def test_certificate_modules_load_nothing_beyond_what_x509_does(module: str) -> None:
    # cryptography.x509 imports the email package, which imports socket for its address helpers; a module that
    # reads certificates cannot avoid that one, and must load nothing else.
    assert _io_loaded("import cryptography.x509", module) == ""
