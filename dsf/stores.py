"""Opening the Zarr patch and labels stores (DESIGN section 3) without torch: a store that is
missing, partial or damaged raises a ConfigError naming it and the fix, never a Zarr or codec
error, and a missing shard (which Zarr would read as black tiles) is found when it is opened.
`dsf.tiles` builds the torch datasets on top.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dsf.errors import ConfigError

#: The fix for a damaged or incomplete patch store, in every message that reports one.
REBUILD_STORE = (
    "delete it and rerun the patches stage (`dsf patches`; the workflow rebuilds a deleted "
    "store, `snakemake --forcerun patches` all of them)"
)
#: Errors of a read that are not the store's fault: the machine's memory or permissions (the
#: CLI reports the latter itself).
_NOT_DAMAGE = (MemoryError, PermissionError)


def damaged_store(path: str | Path, what: str, exc: BaseException | None = None) -> ConfigError:
    """The error for a patch store that cannot be read: names it, what failed, and the fix."""
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return ConfigError(
        f"patch store {path}: {what}{cause}; it is damaged or incomplete: {REBUILD_STORE}"
    )


def open_store(path: str | Path, check_shards: bool = True) -> Any:
    """Open a finished patch store read-only; a missing, partial or damaged one (its group or
    an array's metadata gone or unreadable, with `check_shards` a shard file missing) raises a
    ConfigError naming it and the fix."""
    import warnings

    import zarr

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"patch store {path} not found; run the patches stage first")
    if not path.is_dir():
        raise ConfigError(
            f"patch store {path} is a file, not a patch store folder (the Zarr group "
            f"`dsf patches` writes): give the store folder, or {REBUILD_STORE}"
        )
    try:
        with warnings.catch_warnings():  # Snakemake's .snakemake_timestamp inside directories
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            group = zarr.open_group(str(path), mode="r")
        complete = "n_tiles" in group.attrs
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_store(path, "cannot open its Zarr group", exc) from exc
    if not complete:
        raise damaged_store(path, "no n_tiles (its writing did not finish)")
    # an array folder without its metadata would read as absent (`"labels" in group` False)
    meta = ("zarr.json", ".zarray", ".zgroup")
    for child in sorted(path.iterdir()):
        hidden = child.name.startswith(".")
        if child.is_dir() and not hidden and not any((child / m).is_file() for m in meta):
            raise damaged_store(path, f"array {child.name!r} has no metadata (zarr.json)")
    # every shard of these is written (write_empty_chunks), so a missing one is a lost file;
    # labels too since stores have a store_id (older ones may skip an all-unlabelled shard)
    for name in ("tiles", "context", *(("labels",) if "store_id" in group.attrs else ())):
        if check_shards:
            _check_shards(path, name)
    return group


#: Arrays whose shards were found complete, with their metadata's mtime: a store is listed
#: once per process (and not again in the tile loader's forked workers).
_COMPLETE: set[tuple[str, int]] = set()


def _check_shards(path: Path, name: str) -> None:
    """Raise naming the store, the shard and its tiles when a shard file of array `name` is
    missing (a partial copy, a deleted file): Zarr reads a missing shard as zeros, so training
    would go on with black tiles and never say."""
    folder = path / name
    meta_file = folder / "zarr.json"
    if not meta_file.is_file():
        return  # an array the store does not have
    key = (str(folder.resolve()), meta_file.stat().st_mtime_ns)  # a rebuilt store: new
    if key in _COMPLETE:
        return
    try:
        meta = json.loads(meta_file.read_text())
        shape = [int(n) for n in meta["shape"]]
        grid = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        encoding = meta["chunk_key_encoding"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_store(path, f"cannot open array {name!r}", exc) from exc
    if (
        encoding.get("name") != "default"
        or encoding.get("configuration", {}).get("separator", "/") != "/"
    ):
        return  # not a layout `dsf patches` writes
    counts = [-(-n // g) for n, g in zip(shape, grid, strict=True)]
    # one stat per shard (a store holds about one per 7 tiles of 1024 px), no tree walk
    for index in np.ndindex(*counts):
        shard = "c/" + "/".join(str(i) for i in index)
        if not os.path.isfile(folder / shard):
            first = index[0] * grid[0]
            last = min(shape[0], first + grid[0]) - 1
            raise damaged_store(
                path,
                f"array {name!r} lacks its shard {shard} (tiles {first} to {last}), which Zarr "
                "would read as black tiles",
            )
    _COMPLETE.add(key)


def _array(group: Any, name: str, path: str | Path) -> Any:
    """The Zarr array `name` of an open store; a missing or unreadable one raises naming it."""
    try:
        return group[name]
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_store(path, f"cannot open array {name!r}", exc) from exc


class StoreArray:
    """An array of a patch store whose reads raise a ConfigError naming the store, the tiles
    and the fix when its chunks are damaged (`store_array`)."""

    def __init__(self, array: Any, path: str | Path) -> None:
        self.array, self.path = array, Path(path)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except _NOT_DAMAGE:
            raise
        except Exception as exc:
            raise damaged_store(self.path, f"{_tiles(key)} could not be read", exc) from exc


def store_array(group: Any, name: str, path: str | Path) -> StoreArray:
    """Array `name` ('tiles', 'context', 'labels', ...) of a store `open_store(path)` gave,
    for modules that read a store's arrays themselves: opening it or reading it raises a
    ConfigError naming the store (and the tiles) and the fix, never a Zarr or codec error."""
    return StoreArray(_array(group, name, path), path)


def _tiles(key: Any) -> str:
    """The tiles a selection reads, for a message: 'tile 5', 'tiles 0 to 63'."""
    first = key[0] if isinstance(key, tuple) and key else key
    if isinstance(first, (int, np.integer)):
        return f"tile {int(first)}"
    if isinstance(first, slice) and first.step in (None, 1):
        stop = "the last" if first.stop is None else int(first.stop) - 1
        return f"tiles {first.start or 0} to {stop}"
    return "tiles"


def store_ids(stores: list[str | Path]) -> dict[str, str | None]:
    """Slide id -> `store_id` of each patch store: a fresh id `dsf patches` gives every store
    it writes, so a training checkpoint can tell whether its stores were rebuilt since
    (`dsf.checkpoints.check_stores`); None for a store written before stores had ids."""
    out: dict[str, str | None] = {}
    for path in stores:
        attrs = open_store(path).attrs
        out[str(attrs["slide_id"])] = attrs.get("store_id")
    return out


def read_rows(array: StoreArray, rows: np.ndarray, *rest: Any) -> np.ndarray:
    """`array[rows, *rest]` for sorted row numbers, read as one slice per run of consecutive
    rows (a labels store's tile numbers are mostly runs): Zarr's integer-array selection reads
    tile by tile, and one call per tile costs its own overhead."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        raise ValueError("read_rows needs at least one row")
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = np.split(rows, breaks)
    parts = [array[(slice(int(r[0]), int(r[-1]) + 1), *rest)] for r in runs]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
