"""A whole-slide class map of `dsf infer` as later stages read it (DESIGN section 3, infer):
the pyramidal uint8 TIFF and its JSON description, checked against each other. Map pixel
(j, i) covers level-0 pixels from (j, i) * mpp / slide mpp (the map starts at the slide's
origin)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsf.class_tiff import description_codes
from dsf.errors import ConfigError
from dsf.tiff_backend import tiff_tag_mpp

log = logging.getLogger(__name__)

#: Keys a map's JSON description must hold.
MAP_KEYS = ("slide", "init", "fraction", "mpp", "width", "height", "classes", "folds", "routing")
#: The fix for a damaged or incomplete class map, in every message that reports one.
REBUILD_MAP = "delete it (and its .json) and rerun infer"
#: Errors of a read that are not the map's fault: the machine's memory or permissions (the
#: CLI reports the latter itself).
_NOT_DAMAGE = (MemoryError, PermissionError)


def damaged_map(path: Path, what: str, exc: BaseException | None = None) -> ConfigError:
    """The error for a class map that cannot be read: names it, what failed, and the fix."""
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return ConfigError(
        f"class map {path}: {what}{cause}; it is damaged or incomplete: {REBUILD_MAP}"
    )


def class_counts(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixels of each class index 0..n_classes-1 in a uint8 class raster (int64); index 0
    takes every pixel that is no other class. A pass per class: `np.bincount` first converts
    every pixel to int64, about 8x slower on a map's bands."""
    fg = [np.count_nonzero(classes == k) for k in range(1, n_classes)]
    return np.asarray([classes.size - sum(fg), *fg], np.int64)


@dataclass
class ClassMap:
    """A whole-slide class map of `dsf infer`: the pyramidal TIFF and its JSON description."""

    path: Path
    meta: dict[str, Any]
    levels: list[tuple[int, int]]  # (height, width) of each page, level 0 first

    @property
    def mpp(self) -> float:
        return float(self.meta["mpp"])

    @property
    def height(self) -> int:
        return self.levels[0][0]

    @property
    def width(self) -> int:
        return self.levels[0][1]

    def level_mpp(self, level: int) -> float:
        """um/px of a level: each halves the last (rounding its size up), so exactly
        2**level times level 0's; a width ratio would be off for odd widths."""
        return self.mpp * 2**level

    def _array(self, level: int) -> tuple[Any, Any]:
        import tifffile
        import zarr

        try:
            store = tifffile.imread(str(self.path), key=level, aszarr=True)
            return store, zarr.open(store, mode="r")
        except _NOT_DAMAGE:
            raise
        except Exception as exc:
            raise damaged_map(self.path, f"level {level} cannot be opened", exc) from exc

    def _read(self, z: Any, level: int, key: Any, orthogonal: bool = False) -> np.ndarray:
        """`z[key]` of a level; a tile that does not decode raises naming the map."""
        try:
            return np.asarray(z.get_orthogonal_selection(key) if orthogonal else z[key])
        except _NOT_DAMAGE:
            raise
        except Exception as exc:
            raise damaged_map(self.path, f"level {level} could not be read", exc) from exc

    def read_level(self, level: int) -> np.ndarray:
        """A whole level, uint8 (h, w) (callers pick one small enough)."""
        store, z = self._array(level)
        try:
            return self._read(z, level, slice(None))
        finally:
            store.close()

    def bands(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, uint8 (h, W)) bands of level 0, `rows` at a time."""
        store, z = self._array(0)
        try:
            for r0 in range(0, self.height, rows):
                yield r0, self._read(z, 0, slice(r0, min(self.height, r0 + rows)))
        finally:
            store.close()

    def sample(self, level: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Nearest samples (len(rows), len(cols)) of a level; indices outside it give 0."""
        h, w = self.levels[level]
        out = np.zeros((len(rows), len(cols)), np.uint8)
        vr, vc = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
        if not vr.any() or not vc.any():
            return out
        store, z = self._array(level)
        try:
            part = self._read(z, level, (rows[vr], cols[vc]), orthogonal=True)
        finally:
            store.close()
        out[np.ix_(vr, vc)] = part
        return out


def add_map_arguments(parser: argparse.ArgumentParser) -> None:
    """`--map` and `--map-json`: a class map of `dsf infer` for a stage that reads one."""
    parser.add_argument("--map", required=True, type=Path, help="class map TIFF of dsf infer")
    parser.add_argument("--map-json", type=Path, help="its JSON description (default: beside it)")


def _truncation(tf: Any, pages: list[Any]) -> str | None:
    """What shows a TIFF cut short (a partial copy, a write that did not finish), or None:
    a page without tiles, a tile past the end of the file, or a last page that points to one
    after it that is not there (tifffile only logs that and stops)."""
    size = tf.filehandle.size
    for i, page in enumerate(pages):
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        if offsets.size == 0 or offsets.size != counts.size:
            return f"page {i} lists no tiles"
        end = int((offsets + counts).max())
        if end > size:
            return f"page {i} has tiles up to byte {end}, past the file's end at {size}"
    fmt, fh, last = tf.tiff, tf.filehandle, pages[-1]
    fh.seek(last.offset)
    (tags,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
    fh.seek(last.offset + fmt.tagnosize + tags * fmt.tagsize)
    (following,) = struct.unpack(fmt.offsetformat, fh.read(fmt.offsetsize))
    if following:
        return f"page {len(pages) - 1} is followed by a page at byte {following} that is missing"
    return None


def open_map(tiff: Path, meta_json: Path | None = None) -> ClassMap:
    """Open a class map and check it against its JSON (the `dsf infer` contract; by default
    the `.json` beside the TIFF)."""
    import tifffile

    tiff = Path(tiff)
    meta_json = tiff.with_suffix(".json") if meta_json is None else meta_json

    if not tiff.is_file():
        what = "is a folder, not a class map TIFF" if tiff.is_dir() else "not found"
        raise ConfigError(f"class map {tiff} {what}; run infer for its slide first")
    try:
        meta = json.loads(Path(meta_json).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read map description {meta_json}: {exc}; rerun infer") from exc
    missing = [k for k in MAP_KEYS if k not in meta]
    if missing:
        raise ConfigError(f"map description {meta_json} lacks {missing}; rerun infer")
    try:
        with tifffile.TiffFile(str(tiff)) as tf:
            pages = list(tf.pages)
            first = pages[0]
            levels = [tuple(int(v) for v in p.shape[:2]) for p in pages if p.ndim == 2]
            dtype, ndim = first.dtype, first.ndim
            tag_mpp, tag_mpp_y = tiff_tag_mpp(first), tiff_tag_mpp(first, "Y")
            codes = description_codes(first.description)
            damage = _truncation(tf, pages)
    except PermissionError:
        raise
    except (OSError, ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise damaged_map(tiff, "cannot be read as a TIFF", exc) from exc
    if damage:
        raise damaged_map(tiff, damage)
    slide = meta["slide"]
    if ndim != 2 or dtype != np.uint8:
        raise ConfigError(
            f"class map {tiff} of slide {slide!r}: level 0 must be uint8 (H, W) class indices, "
            f"got {dtype} with {ndim} dimensions; rerun infer"
        )
    if levels[0] != (int(meta["height"]), int(meta["width"])):
        raise ConfigError(
            f"class map {tiff} is {levels[0][1]} x {levels[0][0]} px, its JSON says "
            f"{meta['width']} x {meta['height']}: the two are from different runs; rerun infer"
        )
    named = list(codes.values()) if codes is not None else None
    if named is not None and named != list(meta["classes"]):
        raise ConfigError(
            f"class map {tiff} holds classes {named}, its JSON {list(meta['classes'])}: the two "
            "are from different runs; rerun infer"
        )
    if tag_mpp is None:
        log.warning("%s has no resolution tags; using the JSON's mpp %s", tiff, meta["mpp"])
    else:
        for axis, value in (("X", tag_mpp), ("Y", tag_mpp_y)):
            if value is None or not math.isclose(value, float(meta["mpp"]), rel_tol=1e-3):
                raise ConfigError(
                    f"class map {tiff}: its {axis} resolution tag gives {value or 0:.6g} um/px, "
                    f"its JSON {meta['mpp']}: rerun infer"
                )
    return ClassMap(Path(tiff), meta, levels)  # type: ignore[arg-type]
