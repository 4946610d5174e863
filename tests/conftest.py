"""Shared test configuration: root-only tests are skipped (with a reason) when not root or tools are missing."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [tool for tool in ("ip", "iptables", "iptables-restore") if shutil.which(tool) is None]
    if os.geteuid() == 0 and not missing:
        return
    reason = "needs root" if os.geteuid() != 0 else f"needs {', '.join(missing)}"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
