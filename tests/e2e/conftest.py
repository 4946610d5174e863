"""Fixtures shared by the end-to-end tests that run a sidecar by hand (the lab's tests use harness.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def proxy_dir() -> Iterator[Path]:
    """A directory the proxy uid can read (pytest's tmp_path is private to root), removed after the test."""
    directory = Path(tempfile.mkdtemp(prefix="mtlsmesh-e2e-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
