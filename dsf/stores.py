"""Opening the Zarr patch and labels stores (DESIGN section 3) without torch: a store that is
missing, partial or damaged raises a ConfigError naming it and the fix, never a Zarr or codec
error, and a missing shard (which Zarr would read as black tiles) is found when it is opened.
`dsf.tiles` builds the torch datasets on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dsf.errors import ConfigError

#: The fix for a damaged or incomplete patch store, in every message that reports one.
REBUILD_STORE = (
    "delete it and rerun the patches stage (`dsf patches`; the workflow rebuilds a deleted "
    "store, `snakemake --forcerun patches` all of them)"
)
#: The fix for a labels store that is damaged or does not belong to its patch store.
REBUILD_LABELS = (
    "delete it and rerun the tile_labels stage for it (`dsf tile-labels`; the workflow "
    "rebuilds a deleted labels store from its patch store by itself)"
)
#: How `dsf tile-labels` names the labels store beside a patch store `x.zarr`.
LABELS_SUFFIX = ".labels.zarr"
#: Errors of a read that are not the store's fault: the machine's memory or permissions (the
#: CLI reports the latter itself).
_NOT_DAMAGE = (MemoryError, PermissionError)


def once_per_slide(
    seen: dict[str, Path], slide: str, path: str | Path, labels: bool = False
) -> None:
    """Record `path` as slide `slide`'s store in `seen`; a second store of one slide raises
    naming both (its tiles would count twice, and nothing downstream would show it)."""
    if slide in seen:
        kind, one = ("labels stores", "labels store") if labels else ("patch stores", "store")
        raise ConfigError(
            f"{kind} {seen[slide]} and {path} are both slide {slide!r}: give each slide's "
            f"{one} once"
        )
    seen[slide] = Path(path)


def store_geometry(attrs: dict[str, Any]) -> tuple[int, int, float]:
    """(scale, block, target mpp) a patch store was cut with: the mpp as configured
    (patches.target_mpp, `requested_target_mpp`), else the one its level delivered."""
    mpp = float(attrs.get("requested_target_mpp", attrs["target_mpp"]))
    return int(attrs["scale"]), int(attrs["block"]), mpp


class SameGeometry:
    """Checks that the patch stores one run trains on were cut with one geometry: a store of
    another scale, block or target mpp would be cropped and magnified as the first one's, with
    nothing downstream to show it (a run by hand; the workflow cuts every store alike)."""

    def __init__(self) -> None:
        self.first: tuple[Path, tuple[int, int, float], float] | None = None

    def add(self, path: str | Path, attrs: dict[str, Any]) -> tuple[int, int, float]:
        """The run's (scale, block, target mpp), the first store's; a store with others is
        refused (the mpp within either store's patches.mpp_tolerance, as a slide level
        serves)."""
        from dsf.slide import tolerance

        try:
            got = store_geometry(attrs)
        except (KeyError, TypeError, ValueError) as exc:
            what = "its geometry (scale, block, target mpp) is unreadable"
            raise damaged_store(path, what, exc) from exc
        tol = tolerance((attrs.get("settings") or {}).get("mpp_tolerance"))
        if self.first is None:
            self.first = (Path(path), got, tol)
            return got
        one, want, tol_one = self.first
        same_mpp = abs(got[2] / want[2] - 1.0) <= max(tol, tol_one)
        if got[:2] != want[:2] or not same_mpp:
            raise ConfigError(
                f"patch stores {one} and {path} were cut with other geometries (scale, block, "
                f"target mpp {want} and {got}): one run trains on stores cut by the same "
                "patches settings; rebuild the odd ones with the same patches.scale, "
                "patches.block and patches.target_mpp"
            )
        return want

    @property
    def geometry(self) -> tuple[int, int, float]:
        """The (scale, block, target mpp) of the stores added (the first one's)."""
        if self.first is None:
            raise ValueError("no store added: no geometry yet")
        return self.first[1]


def _kind(path: str | Path, labels: bool | None = None) -> tuple[str, str]:
    """("patch store" or "labels store", its fix): by `labels`, else by the name."""
    if labels is None:
        labels = Path(path).name.endswith(LABELS_SUFFIX)
    return ("labels store", REBUILD_LABELS) if labels else ("patch store", REBUILD_STORE)


def damaged_store(
    path: str | Path, what: str, exc: BaseException | None = None, labels: bool | None = None
) -> ConfigError:
    """The error for a patch (or, `labels`, labels) store that cannot be read: names it, what
    failed, and the fix (which stage rebuilds it)."""
    kind, fix = _kind(path, labels)
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return ConfigError(f"{kind} {path}: {what}{cause}; it is damaged or incomplete: {fix}")


def open_store(path: str | Path, check_shards: bool = True, kind: str | None = "patch") -> Any:
    """Open a finished store read-only: a patch store (`kind` "patch"), the labels store of
    one ("labels", `dsf.tile_labels`) or either (None). A missing, partial or damaged one (its
    group or an array's metadata gone or unreadable; with `check_shards` a shard file missing,
    or a labels store's tile index broken) or one of the other kind raises a ConfigError naming
    it and the fix."""
    import warnings

    import zarr

    path = Path(path)
    hint = True if kind == "labels" else None  # else by the name, until the attrs tell
    named, fix = _kind(path, hint)
    if not path.exists():
        stage = "tile_labels" if named == "labels store" else "patches"
        raise ConfigError(f"{named} {path} not found; run the {stage} stage first")
    if not path.is_dir():
        raise ConfigError(
            f"{named} {path} is a file, not a {named} folder (the Zarr group dsf writes): "
            f"give the store folder, or {fix}"
        )
    try:
        with warnings.catch_warnings():  # Snakemake's .snakemake_timestamp inside directories
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            group = zarr.open_group(str(path), mode="r")
        complete = "n_tiles" in group.attrs
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_store(path, "cannot open its Zarr group", exc, hint) from exc
    labels = "tiles_store_id" in group.attrs
    if kind == "patch" and labels:
        raise ConfigError(
            f"{path} is a labels store (`dsf tile-labels`), not a patch store: give the "
            f"slide's patch store `<slide>.zarr` (a glob of *.zarr also takes the "
            f"*{LABELS_SUFFIX} beside the stores: leave those out)"
        )
    if kind == "labels" and complete and not labels:
        raise ConfigError(
            f"{path} is not a labels store (no tiles_store_id): give the "
            f"`<slide>{LABELS_SUFFIX}` that `dsf tile-labels` wrote"
        )
    if not complete:
        raise damaged_store(path, "no n_tiles (its writing did not finish)", labels=labels)
    # an array folder without its metadata would read as absent (`"labels" in group` False)
    meta = ("zarr.json", ".zarray", ".zgroup")
    for child in sorted(path.iterdir()):
        hidden = child.name.startswith(".")
        if child.is_dir() and not hidden and not any((child / m).is_file() for m in meta):
            raise damaged_store(
                path, f"array {child.name!r} has no metadata (zarr.json)", labels=labels
            )
    if not check_shards:
        return group
    # every shard of these is written (write_empty_chunks), so a missing one is a lost file;
    # labels too since stores have a store_id (older ones may skip an all-unlabelled shard);
    # a labels store's class fractions are never all 0 (the fill), so each chunk is written
    names = ("labels", "label_frac") if labels else ("tiles", "context")
    names += ("labels",) if "store_id" in group.attrs and not labels else ()
    # and the small arrays (coords, tissue, target_frac) of stores that write all their chunks:
    # a lost coords chunk read as zeros had put every tile's labels at one place
    names += tuple(str(a) for a in group.attrs.get("every_chunk", ()))
    for name in names:
        _check_shards(path, name, labels)
    if labels:
        _check_index(group, path)
    return group


#: Arrays whose shards were found complete, with their metadata's mtime: a store is listed
#: once per process (and not again in the tile loader's forked workers).
_COMPLETE: set[tuple[str, int]] = set()


def _check_index(group: Any, path: Path) -> None:
    """A labels store's `index` must name its n_tiles tiles of the patch store, ascending: a
    lost chunk reads as its fill value (0, or -1 since stores fill with -1), which would pair
    every labelled tile with the pixels of one tile and never say."""
    folder = path / "index"
    meta_file = folder / "zarr.json"
    key = (str(folder.resolve()), meta_file.stat().st_mtime_ns if meta_file.is_file() else 0)
    if key in _COMPLETE:
        return
    index = _array(group, "index", path, labels=True)
    try:
        rows = np.asarray(index[:])
    except _NOT_DAMAGE:
        raise
    except Exception as exc:
        raise damaged_store(path, "its tile index could not be read", exc, labels=True) from exc
    n, total = int(group.attrs["n_tiles"]), group.attrs.get("n_tissue_tiles")
    ok = rows.shape == (n,) and (
        n == 0
        or (rows[0] >= 0 and np.all(np.diff(rows) > 0) and (total is None or rows[-1] < total))
    )
    if not ok:
        raise damaged_store(
            path,
            f"its tile index is not {n} ascending tile numbers of the patch store (a lost "
            "chunk reads as zeros)",
            labels=True,
        )
    _COMPLETE.add(key)


def _check_shards(path: Path, name: str, labels: bool = False) -> None:
    """Raise naming the store, the shard and its tiles when a shard (or chunk) file of array
    `name` is missing (a partial copy, a deleted file): Zarr reads it as zeros, so training
    would go on with black tiles, unlabelled ones, or tiles at the slide's origin (coords),
    and never say."""
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
        raise damaged_store(path, f"cannot open array {name!r}", exc, labels) from exc
    if (
        encoding.get("name") != "default"
        or encoding.get("configuration", {}).get("separator", "/") != "/"
    ):
        return  # not a layout `dsf patches` writes
    sharded = any(c.get("name") == "sharding_indexed" for c in meta.get("codecs", ()))
    unit = "shard" if sharded else "chunk"
    counts = [-(-n // g) for n, g in zip(shape, grid, strict=True)]
    # one stat per shard (a store holds about one per 7 tiles of 1024 px), no tree walk
    for index in np.ndindex(*counts):
        shard = "c/" + "/".join(str(i) for i in index)
        if not (folder / shard).is_file():
            first = index[0] * grid[0]
            last = min(shape[0], first + grid[0]) - 1
            zeros = {"tiles": "black tiles", "context": "black tiles", "labels": "unlabelled tiles"}
            raise damaged_store(
                path,
                f"array {name!r} lacks its {unit} {shard} (tiles {first} to {last}), which Zarr "
                f"would read as {zeros.get(name, 'zeros')}",
                labels=labels,
            )
    _COMPLETE.add(key)


def _array(group: Any, name: str, path: str | Path, labels: bool | None = None) -> Any:
    """The Zarr array `name` of an open store; a missing or unreadable one raises naming it."""
    try:
        return group[name]
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_store(path, f"cannot open array {name!r}", exc, labels) from exc


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
    """Slide id -> `store_id` of each patch (or labels) store: a fresh id dsf gives every
    store it writes, so a training checkpoint can tell whether its stores were rebuilt since
    (`dsf.checkpoints.check_stores`); None for a store written before stores had ids."""
    out: dict[str, str | None] = {}
    for path in stores:
        attrs = open_store(path, kind=None).attrs
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
