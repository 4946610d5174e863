"""The pure core stays pure: importing it loads no I/O machinery (docs/ARCHITECTURE.md §10)."""

from __future__ import annotations

import subprocess
import sys

import pytest

IO_MODULES = ("trio", "socket", "ssl", "OpenSSL", "subprocess", "asyncio")


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
    ],
)
def test_importing_loads_no_io_module(module: str) -> None:
    # A fresh interpreter, since this one has long since imported all of them.
    probe = f"import sys, {module}; print(','.join(m for m in {IO_MODULES!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""
