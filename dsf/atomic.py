"""Write-then-rename: a killed job never leaves an output that looks complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsf.errors import ConfigError

#: Files at the top of a Zarr store (v3, v2): dsf's folder outputs are all Zarr stores.
_STORE_MARKS = ("zarr.json", ".zgroup", ".zarray")


def is_store(path: Path) -> bool:
    """Whether `path` is a Zarr store's folder."""
    return path.is_dir() and any((path / mark).is_file() for mark in _STORE_MARKS)


def _foreign_folder(path: Path) -> ConfigError:
    """The refusal of an output that names an existing folder dsf did not write."""
    return ConfigError(
        f"output {path} is an existing folder that dsf did not write: it is left alone; give "
        "the output a path that is not an existing folder"
    )


def remove(path: Path) -> None:
    """Delete an earlier output if it exists: a file, or a Zarr store (dsf's folder outputs).

    Any other folder is refused, never deleted: a folder given for an output by mistake (the
    slide folder, `.`) holds the user's files."""
    if path.is_dir() and not path.is_symlink() and not is_store(path):
        raise _foreign_folder(path)
    remove_scratch(path)


def remove_scratch(path: Path) -> None:
    """Delete dsf's own work file or folder (a `.partial`, a `.work` folder) if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_outputs(outputs: Iterable[Path | None], inputs: Iterable[Path | None]) -> None:
    """Refuse, before anything is deleted or read, an output that is one of the inputs (a slide
    given for its own mask would be overwritten) or another output, or that names an existing
    folder which is not a Zarr store."""
    given = {Path(p).resolve(): Path(p) for p in inputs if p is not None}
    written: dict[Path, Path] = {}
    for out in (Path(p) for p in outputs if p is not None):
        if out.resolve() in written:
            raise ConfigError(
                f"outputs {written[out.resolve()]} and {out} are one file: one would overwrite "
                "the other; give each output its own path"
            )
        written[out.resolve()] = out
        if out.resolve() in given:
            raise ConfigError(
                f"output {out} is the input {given[out.resolve()]}: it would be overwritten; "
                "give the output another path"
            )
        if out.is_dir() and not out.is_symlink() and not is_store(out):
            raise _foreign_folder(out)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield `<path>.partial` to write to; on success rename it to `path`, on error delete it.

    Works for files and folders (a Zarr store). Parent folders are created.
    """
    final = Path(path)
    check_outputs([final], [])
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    remove_scratch(partial)  # left over from a killed run
    try:
        yield partial
    except BaseException:
        remove_scratch(partial)
        raise
    if not partial.exists():
        raise FileNotFoundError(f"{partial} was not written")
    if partial.is_file() and not final.is_dir():
        # a file replaces the earlier one in one step: a kill between a removal and the rename
        # had left only the .partial (a checkpoint's progress lost), and its bytes reach the
        # disk first, so a node's crash cannot leave an empty file under the final name
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, final)
        _sync_folder(final.parent)
        return
    remove(final)  # a folder (a Zarr store) cannot be replaced in one step
    os.replace(partial, final)


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (fsync of the folder), where the file system allows
    it: some (network ones, Windows) refuse to open or sync a folder, and lose nothing by it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_epochs(rows: list[dict[str, Any]], columns: list[str], path: Path, final: bool) -> None:
    """A training run's table of epochs as TSV (atomically): at `path` once the run's result
    is written, else at `<name>.running.tsv` beside it, so an interrupted run leaves no table
    that looks finished (the final one removes the running one)."""
    import pandas as pd

    running = path.with_name(f"{path.stem}.running{path.suffix}")
    with atomic_path(path if final else running) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, sep="\t", index=False)
    if final:
        running.unlink(missing_ok=True)
