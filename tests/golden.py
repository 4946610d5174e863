"""Golden files: rendered text compared with a file kept in the tree, one switch to rewrite them all.

After a deliberate change to what is rendered, run the golden tests with `MTLSMESH_UPDATE_GOLDEN=1`: each file is
rewritten with the current output (and the test then passes); read the diff before committing it. Without the
switch a test fails on any difference and names the file.

What this module does not do: decide what a golden file holds (each test renders its own text).
"""

from __future__ import annotations

import os
from pathlib import Path

UPDATE_SWITCH = "MTLSMESH_UPDATE_GOLDEN"


def updating() -> bool:
    return os.environ.get(UPDATE_SWITCH) == "1"


def assert_golden(path: Path, text: str) -> None:
    """`text` equals the file at `path`; with the switch on, the file is written first."""
    if updating():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path.name} is missing: run with {UPDATE_SWITCH}=1 to create it"
    assert text == path.read_text(), f"{path.name} differs: run with {UPDATE_SWITCH}=1 and read the diff"
