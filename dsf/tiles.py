"""Tiles of the Zarr patch stores as a torch Dataset (DESIGN section 3, `patches/{slide}.zarr`).

Stores are opened lazily and per process, so DataLoader workers never share a handle across a
fork. A batch is fetched in one call (`__getitems__`), its tiles read in store order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dsf.errors import ConfigError


def loader_worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: each worker decodes on one thread (Zarr's thread pool and
    Blosc at one), so N workers keep N cores busy instead of N x cores threads contending for
    them. In-process reads measured 20% faster this way even on 2 cores.

    A worker also ends without the interpreter's finalization (`os._exit`, the first of its
    exit handlers to run): when the loader stops its workers while they still prefetch, a
    worker's queue feeder thread can be inside torch's C++ (moving a batch to shared memory);
    finalization then unwinds that thread, which aborts the worker ("terminate called without
    an active exception") and with it the training run that asked the loader to stop. By the
    time exit handlers run, multiprocessing has joined what it needs; the half-sent batch is
    one the stopping loader discards anyway.
    """
    import atexit

    from torch.utils.data import get_worker_info

    if get_worker_info() is None:  # in the main process it would end the run with status 0
        raise RuntimeError("loader_worker_init is a DataLoader worker_init_fn, for workers only")
    decode_on_one_thread()
    atexit.register(_exit_without_finalizing)


def decode_on_one_thread() -> None:
    """Zarr's thread pool and Blosc at one thread, in a loader worker process: N workers keep
    N cores busy instead of N x cores threads contending for them."""
    import numcodecs.blosc
    import zarr

    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})


def _exit_without_finalizing() -> None:
    """A loader worker's exit: registered after every other exit handler, so it runs first and
    ends the process at once."""
    os._exit(0)


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


class TileDataset(Dataset):
    """uint8 tiles (T, T, 3) of several patch stores, indexed globally."""

    def __init__(self, stores: list[str | Path], array: str = "tiles") -> None:
        self.stores = [Path(s) for s in stores]
        if not self.stores:
            raise ConfigError("no patch stores to train on")
        self.array = array
        self.slides: list[str] = []
        counts = []
        tile = None
        for s in self.stores:
            g = open_store(s)
            counts.append(int(g.attrs["n_tiles"]))
            self.slides.append(str(g.attrs["slide_id"]))
            t = _array(g, array, s).shape[1:]
            if tile is not None and t != tile:
                raise ConfigError(f"patch store {s} has tiles {t}, others {tile}: mixed geometry")
            tile = t
        self.tile_shape = tuple(tile)  # type: ignore[arg-type]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: list[Any] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, -1
        return state

    def _open(self) -> list[Any]:
        if self._arrays is None or self._pid != os.getpid():
            # reads that fail name the store, the tile and the fix (StoreArray); the shards
            # were checked when the dataset was made, not again by every loader worker (a
            # listing of every shard of every store each, slow on a network filesystem)
            self._arrays = [
                store_array(open_store(s, check_shards=False), self.array, s) for s in self.stores
            ]
            self._pid = os.getpid()
        return self._arrays

    def locate(self, index: int) -> tuple[int, int]:
        """(store number, tile number in that store) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        store = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return store, int(index - self.offsets[store])

    def __getitem__(self, index: int) -> torch.Tensor:
        store, local = self.locate(int(index))
        return torch.from_numpy(self._open()[store][local])

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """A whole batch (B, T, T, 3) (`read`), for a DataLoader that asks for batches."""
        return self.read(indices)

    def read(self, indices: list[int]) -> torch.Tensor:
        """The tiles `indices` as one new uint8 tensor (B, T, T, 3)."""
        out = np.empty((len(indices), *self.tile_shape), np.uint8)
        self.read_into(out, indices)
        return torch.from_numpy(out)

    def read_into(self, out: np.ndarray, indices: list[int]) -> None:
        """Write the tiles `indices` into `out` (B, T, T, 3), tile by tile in store order (each
        tile is one Zarr chunk; zarr's orthogonal selection over a shard measured 20x slower).
        A tile that cannot be read raises a ConfigError naming its store, the tile and the fix."""
        arrays = self._open()
        where = sorted((self.locate(int(i)), k) for k, i in enumerate(indices))
        for (store, local), k in where:
            out[k] = arrays[store][local]


def collate_batch(batch: Any) -> torch.Tensor:
    """DataLoader collate for `__getitems__` batches (already one tensor)."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))
