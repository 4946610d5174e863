"""Fixtures of the adversarial tier: a fresh CA per test, and the sidecar's connection log lines captured."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.pki import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture(autouse=True)
def mesh_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtlsmesh")
