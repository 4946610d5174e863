"""`python -m mtlsmesh`: the same entry point as the `mtlsmesh` console script, and nothing else."""

from __future__ import annotations

import sys

from mtlsmesh.cli import main

sys.exit(main())
