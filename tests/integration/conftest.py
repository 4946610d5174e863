"""Fixtures the sidecar integration tests share: a fresh CA per test, and the connection log lines captured."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.pki import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def mesh_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The sidecars' INFO lines (one per connection) in `caplog`; modules that read them use it for every test."""
    caplog.set_level(logging.INFO, logger="mtlsmesh")
