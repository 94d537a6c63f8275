"""A whole-slide class map of `dsf infer` as later stages read it (DESIGN section 3, infer):
the pyramidal uint8 TIFF and its JSON description, checked against each other. Map pixel
(j, i) covers level-0 pixels from (j, i) * mpp / slide mpp (the map starts at the slide's
origin)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsf.errors import ConfigError
from dsf.slide import tiff_tag_mpp

log = logging.getLogger(__name__)

#: Keys a map's JSON description must hold.
MAP_KEYS = ("slide", "init", "fraction", "mpp", "width", "height", "classes", "folds", "routing")


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
        return self.mpp * self.width / self.levels[level][1]

    def _array(self, level: int) -> tuple[Any, Any]:
        import tifffile
        import zarr

        store = tifffile.imread(str(self.path), key=level, aszarr=True)
        return store, zarr.open(store, mode="r")

    def read_level(self, level: int) -> np.ndarray:
        """A whole level, uint8 (h, w) (callers pick one small enough)."""
        store, z = self._array(level)
        try:
            return np.asarray(z[:])
        finally:
            store.close()

    def bands(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, uint8 (h, W)) bands of level 0, `rows` at a time."""
        store, z = self._array(0)
        try:
            for r0 in range(0, self.height, rows):
                yield r0, np.asarray(z[r0 : min(self.height, r0 + rows)])
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
            part = z.get_orthogonal_selection((rows[vr], cols[vc]))
        finally:
            store.close()
        out[np.ix_(vr, vc)] = part
        return out


def add_map_arguments(parser: argparse.ArgumentParser) -> None:
    """`--map` and `--map-json`: a class map of `dsf infer` for a stage that reads one."""
    parser.add_argument("--map", required=True, type=Path, help="class map TIFF of dsf infer")
    parser.add_argument("--map-json", type=Path, help="its JSON description (default: beside it)")


def open_map(tiff: Path, meta_json: Path | None = None) -> ClassMap:
    """Open a class map and check it against its JSON (the `dsf infer` contract; by default
    the `.json` beside the TIFF)."""
    import tifffile

    tiff = Path(tiff)
    meta_json = tiff.with_suffix(".json") if meta_json is None else meta_json

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
            dtype, ndim, tag_mpp = first.dtype, first.ndim, tiff_tag_mpp(first)
    except (OSError, tifffile.TiffFileError, IndexError) as exc:
        raise ConfigError(f"cannot read class map {tiff}: {exc}; rerun infer") from exc
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
    if tag_mpp is None:
        log.warning("%s has no resolution tags; using the JSON's mpp %s", tiff, meta["mpp"])
    elif not math.isclose(tag_mpp, float(meta["mpp"]), rel_tol=1e-3):
        raise ConfigError(
            f"class map {tiff}: resolution tags give {tag_mpp:.6g} um/px, its JSON "
            f"{meta['mpp']}: rerun infer"
        )
    return ClassMap(Path(tiff), meta, levels)  # type: ignore[arg-type]
