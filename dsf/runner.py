"""Shared entry-point plumbing: logging set-up and turning user errors into exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from dsf.errors import DsfError

log = logging.getLogger("dsf")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (Snakemake's `log:` captures it) with timestamps."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def run(fn: Callable[[], None]) -> int:
    """Run a stage body: a `DsfError` is logged as one clear line and exits with status 2."""
    try:
        fn()
    except DsfError as exc:
        log.error("%s", exc)
        return 2
    return 0
