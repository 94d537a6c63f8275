"""Shared fixtures: the real slides beside the repository and tiny synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("DSF_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


def pytest_configure(config: pytest.Config) -> None:
    """Fail at once, not by skipping, when the real scanner files are not where CI lays them."""
    if not (REAL / "CMU-1-Small-Region.svs").is_file():
        raise pytest.UsageError(
            f"real slides not found at {REAL}: the tests read ../shared/data/real beside the "
            "repository; set DSF_REAL_DATA to its location"
        )


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real scanner files (../shared/data/real); CI lays it beside the clone."""
    return REAL
