"""Deterministic synthetic H&E-like whole-slide images with exact class labels (`dsf synth`).

The demo, the tests and the benchmarks need slides of any size (a few hundred px up to 40,000 px
and more) with known ground truth and nothing to download. The tissue and its labels are
`dsf.synth_tissue` (a pure function of the seed and level-0 coordinates); this module writes them
as an Aperio-like pyramidal TIFF (tiled JPEG, reduced levels, thumbnail), a label mask TIFF and
QuPath GeoJSON annotations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsf.synth_tissue import CLASS_NAMES, render_labels, render_region

log = logging.getLogger(__name__)

_APERIO_HEADER = "Aperio Image Library v10.0.0"
_LEVEL_FACTOR = 4  # each reduced level is 4 times smaller, like Aperio's
_SMALLEST_LEVEL = 1024  # px; the pyramid stops at the first level whose longer side fits
_THUMBNAIL = 768  # px; longer side of the stripped thumbnail image
_RAW_TIFF_LIMIT = 2**31  # bytes; above this estimate the file is written as BigTIFF


@dataclass(frozen=True)
class _Spec:
    """What a synthetic slide file is made of."""

    seed: int
    width: int
    height: int
    mpp: float
    tile: int
    quality: int
    region_um: float

    @property
    def magnification(self) -> int:
        return round(10.0 / self.mpp)

    def levels(self) -> list[tuple[int, int]]:
        """(width, height) per pyramid level: divide by 4 until the longer side is at most
        1024 px, with at least one reduced level when the slide spans more than 4 tiles."""
        dims = [(self.width, self.height)]
        while True:
            w, h = dims[-1]
            wanted = max(w, h) > _SMALLEST_LEVEL or (
                len(dims) == 1 and max(w, h) > _LEVEL_FACTOR * self.tile
            )
            nw, nh = w // _LEVEL_FACTOR, h // _LEVEL_FACTOR
            if not wanted or min(nw, nh) < 1:
                return dims
            dims.append((nw, nh))

    def description(self, size: tuple[int, int] | None = None) -> str:
        """Aperio ImageDescription: level 0 when `size` is None, else a reduced image."""
        w, h, t = self.width, self.height, self.tile
        head = f"{_APERIO_HEADER}\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t})"
        if size is not None:
            head += f" -> {size[0]}x{size[1]}"
        return (
            f"{head} JPEG/RGB Q={self.quality}|AppMag = {self.magnification}"
            f"|MPP = {self.mpp:.4f}|Generator = dsf.synth|Seed = {self.seed}"
            f"|RegionUM = {self.region_um:g}"
        )

    def resolution(self, size: tuple[int, int]) -> tuple[float, float]:
        """TIFF resolution (px/cm) of an image of `size` covering the slide."""
        return (
            1e4 * size[0] / (self.mpp * self.width),
            1e4 * size[1] / (self.mpp * self.height),
        )

    def bigtiff(self) -> bool:
        """Whether the file may pass 2 GB (classic TIFF ends at 4): JPEG assumed only 2:1."""
        return self.width * self.height * 3 * 4 / 3 / 2 > _RAW_TIFF_LIMIT


def _reduce(strip: np.ndarray) -> np.ndarray:
    """Area-average 4 x 4 blocks (uint8 (h, w, c) -> (h // 4, w // 4, c)), rounding."""
    f = _LEVEL_FACTOR
    h, w = strip.shape[0] // f, strip.shape[1] // f
    rows = strip[: h * f, : w * f].reshape(h, f, w, f, -1)
    total = rows[:, 0].astype(np.uint16)
    for i in range(1, f):
        total += rows[:, i]
    cols = total.reshape(h, w, f, -1)
    acc = cols[:, :, 0] + np.uint16(f * f // 2)
    for j in range(1, f):
        acc += cols[:, :, j]
    return (acc // np.uint16(f * f)).astype(np.uint8)


def _tiles(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Full tiles of one row of tiles, edge tiles padded by replication (no black JPEG seams)."""
    h, w = strip.shape[:2]
    if h < tile:
        strip = np.pad(strip, ((0, tile - h), (0, 0), (0, 0)), mode="edge")
    for x in range(0, w, tile):
        t = strip[:, x : x + tile]
        if t.shape[1] < tile:
            t = np.pad(t, ((0, 0), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        yield np.ascontiguousarray(t)


class _RawLevel:
    """A reduced level kept as raw RGB rows in a temporary file (bounded memory)."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path, self.width, self.height = path, width, height
        self.rows = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in finish()

    def append(self, rows: np.ndarray) -> None:
        rows = rows[: self.height - self.rows, : self.width]
        self._fh.write(np.ascontiguousarray(rows).tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        self._fh.close()

    def finish(self) -> None:
        self.close()
        if self.rows != self.height:
            raise RuntimeError(f"level {self.path} has {self.rows} rows, not {self.height}")

    def strips(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive strips of `rows` rows, read with plain file reads."""
        with open(self.path, "rb") as fh:
            for y in range(0, self.height, rows):
                n = min(rows, self.height - y)
                buf = np.empty((n, self.width, 3), np.uint8)
                fh.readinto(memoryview(buf).cast("B"))
                yield buf


def _level0_tiles(spec: _Spec, reduced: _RawLevel | None, bar: Any) -> Iterator[np.ndarray]:
    """Render level 0 one row of tiles at a time; feed the first reduced level on the way."""
    t = spec.tile
    for y in range(0, spec.height, t):
        strip, _ = render_region(
            spec.seed, 0, y, spec.width, min(t, spec.height - y), spec.mpp, 1.0,
            spec.region_um, slide_width=spec.width, slide_height=spec.height,
        )  # fmt: skip
        if reduced is not None:
            reduced.append(_reduce(strip))
        if bar is not None:
            bar.update(1)
        yield from _tiles(strip, t)


def _level_tiles(level: _RawLevel, tile: int) -> Iterator[np.ndarray]:
    for strip in level.strips(tile):
        yield from _tiles(strip, tile)


def _reduce_file(src: _RawLevel, dst: _RawLevel) -> None:
    """Fill `dst` with the 4 x 4 area average of `src`, strip by strip."""
    for strip in src.strips(64 * _LEVEL_FACTOR):
        dst.append(_reduce(strip))
    dst.finish()


def _thumbnail(level: _RawLevel) -> np.ndarray:
    """A small RGB overview from the smallest raw level."""
    from PIL import Image

    image = Image.fromarray(np.concatenate(list(level.strips(level.height)), axis=0))
    image.thumbnail((_THUMBNAIL, _THUMBNAIL), Image.Resampling.BOX)
    return np.asarray(image)


def _encoded(tiles: Iterator[np.ndarray], quality: int, inflight: int) -> Iterator[bytes]:
    """JPEG tiles encoded on worker threads while the caller renders the next ones (the codec
    and numpy release the GIL), in order, the same bytes tifffile would write."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs

    args = {"level": quality, "colorspace": "RGB", "outcolorspace": "YCBCR"}
    args["subsampling"] = (2, 2)
    workers = max(1, min(4, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers, thread_name_prefix="synth-jpeg") as pool:
        pending: deque[Any] = deque()
        for tile in tiles:
            pending.append(pool.submit(imagecodecs.jpeg_encode, tile, **args))
            while len(pending) > inflight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_pyramid(path: Path, spec: _Spec, scratch: Path, progress: bool) -> None:
    """Write the pyramidal Aperio-style TIFF to `path`: level 0, thumbnail, reduced levels."""
    import tifffile

    dims = spec.levels()
    first = (spec.width // _LEVEL_FACTOR, spec.height // _LEVEL_FACTOR)
    raw = [_RawLevel(scratch / "level1.raw", *first)] if min(first) >= 1 else []
    raw += [_RawLevel(scratch / f"level{i}.raw", *size) for i, size in enumerate(dims) if i > 1]
    per_row = -(-spec.width // spec.tile)
    bar = _progress_bar(-(-spec.height // spec.tile), progress)

    def page(data: Any, size: tuple[int, int], reduced: bool, tiled: bool = True) -> None:
        tiling = {"shape": (size[1], size[0], 3), "dtype": np.uint8, "tile": (spec.tile,) * 2}
        tif.write(
            data, photometric="rgb", compression="jpeg",
            compressionargs={"level": spec.quality}, resolutionunit="CENTIMETER",
            resolution=spec.resolution(size), subfiletype=0, metadata=None,
            software="dsf.synth", description=spec.description(size if reduced else None),
            **(tiling if tiled else {}),
        )  # fmt: skip

    try:
        with tifffile.TiffWriter(path, bigtiff=spec.bigtiff()) as tif:
            tiles = _level0_tiles(spec, raw[0] if raw else None, bar)
            page(_encoded(tiles, spec.quality, 2 * per_row), dims[0], reduced=False)
            if not raw:
                return
            raw[0].finish()
            for src, dst in zip(raw[:-1], raw[1:], strict=False):
                _reduce_file(src, dst)
            thumb = _thumbnail(raw[-1])
            page(thumb, (thumb.shape[1], thumb.shape[0]), reduced=True, tiled=False)
            for level, size in zip(raw, dims[1:], strict=False):
                tiles = _level_tiles(level, spec.tile)
                page(_encoded(tiles, spec.quality, 2 * per_row), size, reduced=True)
    finally:
        for level in raw:
            level.close()
        if bar is not None:
            bar.close()


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr over tile rows; sparse updates when stderr is a log file."""
    if not enabled:
        return None
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total, desc="tile rows", unit="row", file=sys.stderr,
        mininterval=0.5 if interactive else 10.0, dynamic_ncols=interactive,
    )  # fmt: skip


def _label_strips(spec: _Spec, ds: int, rows: int) -> Iterator[np.ndarray]:
    """The class mask at downsample `ds` (shape ceil(H / ds) x ceil(W / ds)), `rows` at a time."""
    width, height = -(-spec.width // ds), -(-spec.height // ds)
    for y in range(0, height, rows):
        yield render_labels(
            spec.seed, 0, y * ds, width, min(rows, height - y), spec.mpp, float(ds),
            spec.region_um, slide_width=spec.width, slide_height=spec.height,
        )  # fmt: skip


def _write_label_tiff(path: Path, spec: _Spec, ds: int) -> None:
    """Tiled, deflate-compressed uint8 class mask at downsample `ds`, resolution tags in cm."""
    import tifffile

    width, height = -(-spec.width // ds), -(-spec.height // ds)
    tile = 256

    def tiles() -> Iterator[np.ndarray]:
        for strip in _label_strips(spec, ds, tile):
            for x in range(0, width, tile):
                yield strip[:, x : x + tile]

    res = 1e4 / (spec.mpp * ds)
    description = json.dumps(
        {
            "generator": "dsf.synth",
            "seed": spec.seed,
            "classes": {str(k): v for k, v in CLASS_NAMES.items()},
            "mpp": spec.mpp * ds,
            "downsample": ds,
            "slide": [spec.width, spec.height],
        }
    )
    with tifffile.TiffWriter(path, bigtiff=width * height > _RAW_TIFF_LIMIT) as tif:
        tif.write(
            tiles(), shape=(height, width), dtype=np.uint8, tile=(tile, tile),
            photometric="minisblack", compression="zlib", resolution=(res, res),
            resolutionunit="CENTIMETER", description=description, metadata=None,
            software="dsf.synth",
        )  # fmt: skip


_GEOJSON_MAX_PX = 16_000_000  # label raster size the polygons are traced on (bounded memory)
#: Douglas-Peucker tolerance (raster px) of the synthetic annotation's outlines: a fifth of a
#: pixel keeps them on the painted truth (the maps' polygons use polygons.tolerance)
_GEOJSON_TOLERANCE_PX = 0.2


def annotation_features(labels: np.ndarray, ds: float) -> list[dict[str, Any]]:
    """The synthetic truth as QuPath annotations: one Feature per connected component per class
    of a label raster at downsample `ds` (`dsf.trace`), in the maps' class colours."""
    from dsf.colours import class_colours
    from dsf.trace import class_features

    # the maps' colours (the same class indices): truth and predictions look alike in QuPath
    colours = class_colours(max(CLASS_NAMES) + 1)
    named = {cls: (name, tuple(colours[cls].tolist())) for cls, name in CLASS_NAMES.items()}
    return list(class_features(labels, ds, named, tolerance=_GEOJSON_TOLERANCE_PX))


def _write_geojson(path: Path, spec: _Spec, ds: int) -> None:
    """QuPath-style GeoJSON of the label regions, traced on the label raster at downsample
    `ds` (coarser for huge slides so memory stays bounded)."""
    while -(-spec.width // ds) * -(-spec.height // ds) > _GEOJSON_MAX_PX:
        ds += 1
    width, height = -(-spec.width // ds), -(-spec.height // ds)
    labels = render_labels(
        spec.seed, 0, 0, width, height, spec.mpp, float(ds), spec.region_um,
        slide_width=spec.width, slide_height=spec.height,
    )  # fmt: skip
    collection = {"type": "FeatureCollection", "features": annotation_features(labels, float(ds))}
    path.write_text(json.dumps(collection, separators=(",", ":")))  # dumps: the C encoder


def _partial(path: Path) -> Path:
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return partial


def _atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Run `write` on `path`.partial and rename it to `path` only when it succeeded."""
    final = Path(path)
    partial = _partial(final)
    try:
        write(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)


def write_synthetic_slide(
    path: str | os.PathLike[str],
    *,
    seed: int,
    width: int,
    height: int,
    mpp: float,
    tile: int,
    quality: int,
    region_um: float,
    labels_tiff: str | os.PathLike[str] | None = None,
    labels_geojson: str | os.PathLike[str] | None = None,
    label_downsample: int | None = None,
    progress: bool = False,
) -> None:
    """Write a synthetic slide as a pyramidal JPEG TIFF that OpenSlide opens as Aperio, and
    optionally its class mask (TIFF at `label_downsample`) and QuPath GeoJSON annotations.

    Level 0 is rendered one row of tiles at a time and the reduced levels are area averages kept
    in temporary files, so memory stays bounded for slides of any size. Each output is written to
    `<name>.partial` and renamed when complete. `label_downsample` defaults to the schema's
    synth.label_downsample.
    """
    if label_downsample is None:
        from dsf.config import defaults

        label_downsample = int(defaults("synth")["label_downsample"])
    spec = _Spec(int(seed), int(width), int(height), float(mpp), int(tile), int(quality),
                 float(region_um))  # fmt: skip
    if spec.tile % 16:
        from dsf.errors import ConfigError

        raise ConfigError(f"synth.tile must be a multiple of 16 for JPEG tiles, not {tile}")
    final = Path(path)
    log.info(
        "synthetic slide %s: seed %d, %d x %d px at %.4g um/px, %d levels",
        final, spec.seed, spec.width, spec.height, spec.mpp, len(spec.levels()),
    )  # fmt: skip

    def write(partial: Path) -> None:
        # reduced levels wait in a scratch folder named after the slide, so a rerun after a
        # killed job clears its own leftovers and never touches a neighbour's
        scratch = final.with_name(f".{final.name}.scratch")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            _write_pyramid(partial, spec, scratch, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    _atomic(final, write)
    if labels_tiff is not None:
        _atomic(labels_tiff, lambda p: _write_label_tiff(p, spec, int(label_downsample)))
        log.info("label mask %s (downsample %d)", labels_tiff, label_downsample)
    if labels_geojson is not None:
        _atomic(labels_geojson, lambda p: _write_geojson(p, spec, int(label_downsample)))
        log.info("annotations %s", labels_geojson)


# -- command line --------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from dsf.config import add_section_arguments

    parser = argparse.ArgumentParser(
        prog="dsf synth",
        description="Write a deterministic synthetic H&E-like slide (pyramidal Aperio-style "
        "TIFF) with its class mask and QuPath GeoJSON annotations.",
    )
    parser.add_argument("--out", required=True, type=Path, help="slide TIFF to write")
    parser.add_argument("--seed", required=True, type=int, help="random seed (>= 0)")
    parser.add_argument("--width", required=True, type=int, help="level-0 width (px)")
    parser.add_argument("--height", required=True, type=int, help="level-0 height (px)")
    parser.add_argument("--labels-tiff", type=Path, help="class mask TIFF to write")
    parser.add_argument("--labels-geojson", type=Path, help="QuPath GeoJSON to write")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_section_arguments(parser, "synth", skip=("slides",))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`dsf synth`: write one synthetic slide and its annotations."""
    from dsf.config import section_from_args
    from dsf.runner import run, setup_logging

    args = _parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> None:
        settings = section_from_args(args, "synth")
        from dsf.atomic import check_outputs
        from dsf.errors import ConfigError

        if args.seed < 0 or args.width < 1 or args.height < 1:
            raise ConfigError("--seed must be >= 0 and --width/--height >= 1")
        if args.out.suffix.lower() not in (".tif", ".tiff"):
            raise ConfigError(f"--out {args.out}: the slide is a TIFF; name it .tif or .tiff")
        check_outputs([args.out, args.labels_tiff, args.labels_geojson], [])
        write_synthetic_slide(
            args.out, seed=args.seed, width=args.width, height=args.height,
            mpp=settings["mpp"], tile=settings["tile"], quality=settings["quality"],
            region_um=settings["region_um"], labels_tiff=args.labels_tiff,
            labels_geojson=args.labels_geojson, label_downsample=settings["label_downsample"],
            progress=True,
        )  # fmt: skip

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
