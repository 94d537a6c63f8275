"""Write-then-rename: a killed job never leaves an output that looks complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield `<path>.partial` to write to; on success rename it to `path`, on error delete it.

    Works for files and folders (a Zarr store). Parent folders are created.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    remove(partial)  # left over from a killed run
    try:
        yield partial
    except BaseException:
        remove(partial)
        raise
    if not partial.exists():
        raise FileNotFoundError(f"{partial} was not written")
    remove(final)
    os.replace(partial, final)
