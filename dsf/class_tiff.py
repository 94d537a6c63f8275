"""The class TIFFs dsf writes: whole-slide maps (`dsf infer`) and label masks (`dsf labels`).

One uint8 class index per pixel, as a tiled pyramidal BigTIFF: palette-coloured so viewers
(QuPath, OpenSlide) show the classes in colour while the values stay class indices, resolution
tags per level so they open at the slide's scale. Levels are built while level 0 streams in,
block by block (`write_block`): level i is level 0 subsampled by 2**i (nearest: the pixel at
offset 2**(i-1) of each 2**i square, `_sampled`), large levels spooled to disk as
compressed tiles (`TileSpool`), so memory stays flat in slide size and no pass over the
finished level 0 is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dsf import __version__
from dsf.colours import class_colours
from dsf.tilespool import ZLIB_LEVEL, TileSpool

#: pyramid levels of at most this many px are kept in memory (16 MB), larger ones spooled
MEMORY_LEVEL_PX = 4096 * 4096


def pyramid_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of the levels: halved (rounding up) until one fits a tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def pyramid_levels(
    work: Path, height: int, width: int, tile: int, pool: ThreadPoolExecutor
) -> list[np.ndarray | TileSpool]:
    """Empty levels of an image: level 0 and large levels as tile spools in `work`, small
    reduced levels (at most MEMORY_LEVEL_PX) as arrays."""
    levels: list[np.ndarray | TileSpool] = []
    for i, (h, w) in enumerate(pyramid_shapes(height, width, tile)):
        if i and h * w <= MEMORY_LEVEL_PX:
            levels.append(np.zeros((h, w), np.uint8))
        else:
            levels.append(TileSpool(work / f"level{i}.tiles", (h, w), tile, pool))
    return levels


def _sampled(start: int, size: int, f: int, n: int) -> tuple[int, slice | np.ndarray]:
    """(first reduced index, offsets within the block) of the level-0 pixels in
    [start, start + size) that a level reduced by `f` (a power of two) samples, in a level-0
    axis of `n` px: pixel j of the level samples `min(j * f + f // 2, n - 1)`, the centre of
    its f-square, the pixel a nearest-neighbour read at centres picks (`MaskRaster.read`), so
    a coarse level reads as level 0 read at its scale; the last square, cut short by the
    image's edge, samples the edge pixel. A strided slice (a view), or an index array where
    the edge cuts the last square short."""
    c, n_red = f // 2, -(-n // f)
    j0 = max(0, -(-(start - c) // f))
    j1 = min(n_red, -(-(start + size - c) // f))
    if start + size == n:  # the block holds the edge pixel the last square may fall back to
        j1 = n_red
    first, last = j0 * f + c - start, (j1 - 1) * f + c - start
    if j1 <= j0 or last < size:
        return j0, slice(first, max(first, last + 1), f)
    return j0, np.minimum(np.arange(j0, j1) * f + c, n - 1) - start


def write_block(levels: list[np.ndarray | TileSpool], y: int, x: int, block: np.ndarray) -> None:
    """Store a block of level 0 at (y, x) and, on each reduced level, the level-0 pixels of
    the block that the level samples (`_sampled`)."""
    h, w = levels[0].shape
    for i, level in enumerate(levels):
        f = 1 << i
        if f == 1:
            y1, x1, sub = y, x, block
        else:
            y1, rows = _sampled(y, block.shape[0], f, h)
            x1, cols = _sampled(x, block.shape[1], f, w)
            sub = block[rows][:, cols]
            if not sub.size:
                continue
        if isinstance(level, np.ndarray):
            level[y1 : y1 + sub.shape[0], x1 : x1 + sub.shape[1]] = sub
        else:
            level.write(y1, x1, sub)


def write_tiff(
    path: Path,
    levels: list[Any],
    mpp: float,
    n_classes: int,
    tile: int,
    threads: int = 4,
    classes: list[str] | None = None,
) -> None:
    """Tiled pyramidal BigTIFF, palette-coloured (values stay class indices), resolution tags
    in px/cm per level, zlib (deflate) tiles: the spooled levels' tiles copied as they were
    compressed while predicting (`TileSpool`), the small in-memory levels encoded here. The
    first page's ImageDescription names the `classes` of the indices and their colours, as
    JSON, so the file says what it holds without the JSON beside it (QuPath shows it)."""
    import json

    import tifffile

    # index 0 (background, outside the tissue) white, as glass, where viewers draw the palette
    palette = class_colours(n_classes)
    palette[:1] = 255
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :n_classes] = palette.T.astype(np.uint16) * 257

    def tiles(arr: Any) -> Iterator[np.ndarray]:
        h, w = arr.shape
        for y in range(0, h, tile):
            strip = np.asarray(arr[y : y + tile])
            for x in range(0, w, tile):
                t = np.zeros((tile, tile), np.uint8)
                part = strip[:, x : x + tile]
                t[: part.shape[0], : part.shape[1]] = part
                yield t

    about = None
    if classes is not None:
        about = json.dumps(
            {
                "dsf": "class map",
                "classes": list(classes),
                "colours": palette.tolist(),
                "mpp": mpp,
                "values": "class index per pixel (0: background or outside the tissue)",
            }
        )
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, arr in enumerate(levels):
            px_per_cm = 1e4 / (mpp * 2**i)
            tw.write(
                arr.tiles() if isinstance(arr, TileSpool) else tiles(arr),
                shape=tuple(arr.shape),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="palette",
                colormap=cmap,
                compression="zlib",
                compressionargs={"level": ZLIB_LEVEL},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                software=f"dsf {__version__}",
                description=about if i == 0 else None,
                metadata=None,
                maxworkers=threads,  # zlib per tile in parallel (it frees the GIL)
            )


def _description(path: str | Path) -> str | None:
    """The first page's description of a TIFF (None when it cannot be read)."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            return tf.pages[0].description
    except (OSError, ValueError, IndexError, tifffile.TiffFileError):
        return None


def description_codes(description: str | None) -> dict[int, str] | None:
    """Pixel value -> class name, where a TIFF description dsf wrote says it: a class map or
    painted label mask (`write_tiff`: value i is class i of its classes) or a `dsf synth` label
    mask (its codes and their names); None for any other, whose values are raster codes."""
    import json

    try:
        about = json.loads(description or "null")
    except ValueError:
        return None
    if not isinstance(about, dict):
        return None
    classes = about.get("classes")
    if about.get("dsf") == "class map":
        if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
            return dict(enumerate(classes))
    elif about.get("generator") == "dsf.synth" and isinstance(classes, dict):
        try:
            return {int(k): str(v) for k, v in classes.items()}
        except ValueError:
            return None
    return None


def described_codes(path: str | Path) -> dict[int, str] | None:
    """`description_codes` of a TIFF file's first page."""
    return description_codes(_description(path))
