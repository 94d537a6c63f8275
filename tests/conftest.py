"""Shared fixtures: the real slides beside the repository and tiny synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("DSF_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real scanner files (../shared/data/real); CI lays it beside the clone."""
    assert REAL.is_dir(), f"real slides not found at {REAL}; set DSF_REAL_DATA"
    return REAL
