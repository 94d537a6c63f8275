"""`dsf labels`: one label mask per slide, from a mask per class or from an annotation with
the tissue it leaves out as a base class.

Some datasets annotate each class in a binary mask of its own at the slide's full size: PAIP
2019 gives `<id>_whole.tif` (whole tumour) and `<id>_viable.tif` (viable tumour, inside it), and
the paper adds "tissue area" for tissue outside them, tissue where (R, G, B) <= (235, 210, 235)
(paper section IV-A, DESIGN section 5: PAIP classes 1 tissue, 2 whole tumour, 3 viable tumour).
Others draw only the lesion (CAMELYON's tumour polygons): the rest of the tissue is normal.
This stage paints them into the one class-index mask the other stages read:

- the base class (`labels.base`) where the slide's pixel passes `tissue.rgb_max`, pixel by
  pixel at the label mask's resolution;
- then each class's mask, nonzero pixels taking the class, in the order of `labels.classes` (a
  later class over an earlier one: viable tumour over whole tumour); or the annotation (any
  format `dsf.annotations` reads), its annotated pixels over the base.

The slide and the masks are read band by band (masks lazily, `dsf.mask_raster`), and the result
is written as a tiled pyramidal TIFF coloured like the maps (`dsf.class_tiff`), so memory
is a band of 512 rows of bytes across the slide plus a few column blocks (about 50 MB at
100k px wide) and QuPath shows it over the slide.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dsf.annotations import open_labels
from dsf.atomic import atomic_path, check_outputs, remove
from dsf.class_tiff import pyramid_levels, write_block, write_tiff
from dsf.config import add_section_arguments, add_setting_argument, section_from_args
from dsf.errors import AnnotationError, ConfigError
from dsf.label_settings import base_class, check_label_settings, class_index
from dsf.mask_raster import MaskRaster
from dsf.runner import run, setup_logging
from dsf.slide import Slide, add_tolerance_argument, open_slide
from dsf.tilespool import TileSpool
from dsf.tissue import has_data, rgb_rule

log = logging.getLogger(__name__)

#: Rows of the label mask painted at a time (the TIFF's tile size: whole tile rows per band).
TILE = 512
#: Output columns of one slide read (its pixels stay within the slide reader's bound).
READ_COLS = 4096


def _paint_tissue(
    slide: Slide,
    band: np.ndarray,
    y: float,
    f: float,
    mpp: float,
    rgb_max: list[int],
    value: int,
    pool: ThreadPoolExecutor,
) -> None:
    """Set `value` in `band` (output rows from `y`, the whole width) where the slide passes the
    rgb_max rule, read in column blocks on the pool's threads, each painting its own columns;
    black no-data is never tissue (as in `dsf.tissue`)."""
    h, width = band.shape

    def block(x0: int) -> None:
        w = min(READ_COLS, width - x0)
        rgb = slide.read(x0 * f, y * f, w, h, mpp)
        tissue = rgb_rule(rgb, rgb_max) & has_data(rgb)
        band[:, x0 : x0 + w][tissue] = value

    for _ in pool.map(block, range(0, width, READ_COLS)):
        pass


def paint_labels(
    slide: Slide,
    masks: dict[str, Path],
    settings: dict[str, Any],
    rgb_max: list[int],
    mpp: float,
    out: Path,
    threads: int,
    progress: bool = True,
    annotation: Path | None = None,
) -> dict[str, float]:
    """Paint the per-class `masks` (class name -> file) of `slide`, or its `annotation`, over
    the base class into a label mask TIFF where the patches for `mpp` are cut (a level within
    the slide's mpp tolerance at its own mpp; no finer than the slide), written atomically to
    `out`; returns each class's share of the mask's pixels."""
    check_label_settings(settings)
    classes = list(settings["classes"])
    if bool(masks) == (annotation is not None):
        raise ConfigError(
            f"slide {slide.slide_id!r}: give per-class masks (--mask CLASS=FILE) or one "
            "annotation (--annotation FILE)"
        )
    layers = sorted(
        (class_index(name, classes, "--mask"), name, Path(path)) for name, path in masks.items()
    )
    base = base_class(settings)
    base_idx = class_index(base, classes, "labels.base") if base is not None else None
    # where the patches are cut (a level within the tolerance as it is: 0.243 for a 0.25
    # target), so the mask is the slide's size or a whole downsample of it, as masks are read
    mpp = max(slide.effective_mpp(float(mpp)), slide.mpp)
    f = mpp / slide.mpp  # level-0 slide px per label px
    width, height = slide.size_at(mpp)
    source = (
        open_labels(
            annotation,
            slide.slide_id,
            slide.dimensions,
            slide.mpp,
            settings,
            slide.bounds,
        )
        if annotation is not None
        else None
    )
    rasters = [
        (idx, name, MaskRaster(path, slide.slide_id, slide.dimensions, f"{name} mask"))
        for idx, name, path in layers
    ]
    counts = np.zeros(len(classes), np.int64)
    own = np.zeros(len(classes), np.int64)  # pixels each mask marks, before later ones paint
    try:
        with (
            atomic_path(out) as partial,
            tempfile.TemporaryDirectory(prefix="dsf-labels-", dir=out.parent) as work,
            ThreadPoolExecutor(max(1, threads), thread_name_prefix="dsf-labels") as pool,
        ):
            levels = pyramid_levels(Path(work), height, width, TILE, pool)
            bands = tqdm(
                range(0, height, TILE), desc=f"{slide.slide_id} labels", disable=not progress
            )
            for y in bands:
                h = min(TILE, height - y)
                # the band's one full-width array; everything else is read and painted a
                # column block at a time: 512 bytes per column of slide, not a dozen times that
                band = np.zeros((h, width), np.uint8)
                if base_idx is not None:
                    _paint_tissue(slide, band, y, f, mpp, rgb_max, base_idx, pool)
                for x0 in range(0, width, READ_COLS):
                    w = min(READ_COLS, width - x0)
                    block = band[:, x0 : x0 + w]
                    for idx, _, raster in rasters:
                        marked = raster.read(x0 * f, y * f, w, h, f) > 0
                        block[marked] = idx
                        own[idx] += np.count_nonzero(marked)
                    if source is not None:
                        drawn = source.read(x0 * f, y * f, w, h, mpp)
                        np.copyto(block, drawn, where=drawn > 0)
                    # per block: bincount copies its input as int64, 8 bytes a pixel
                    counts += np.bincount(block.ravel(), minlength=len(classes))[: len(classes)]
                write_block(levels, y, 0, band)
            for level in levels:
                if isinstance(level, TileSpool):
                    level.close()
            write_tiff(partial, levels, mpp, len(classes), TILE, threads, classes=list(classes))
    finally:
        for _, _, raster in rasters:
            raster.close()
    total = max(1, width * height)
    shares = {name: float(n) / total for name, n in zip(classes, counts, strict=True)}
    for idx, name, _ in rasters:
        if counts[idx] == 0 and own[idx]:
            later = [n for i, n, _ in rasters if i > idx] + (["the annotation"] if source else [])
            log.warning(
                "%s: every pixel the %s mask marks is painted over by %s (later in "
                "labels.classes, or the annotation): check the order of labels.classes",
                slide.slide_id,
                name,
                " or ".join(later) or "a later class",
            )
        elif counts[idx] == 0:
            log.warning(
                "%s: the %s mask marks no pixel of the slide (an empty mask, or codes 0 only)",
                slide.slide_id,
                name,
            )
    return shares


def _mask_option(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r} is not CLASS=FILE")
    return name, Path(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsf labels",
        description=(
            "One label mask of a slide from per-class binary masks (PAIP's whole and viable "
            "tumour) or from an annotation, with the tissue outside them as labels.base."
        ),
    )
    parser.add_argument("--slide", required=True, type=Path, help="slide file")
    parser.add_argument("--slide-id", help="slide id for messages (default: file stem)")
    parser.add_argument(
        "--sheet-mpp", type=float, help="level-0 um/px from the sheet (overrides the file's)"
    )
    add_tolerance_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--mask",
        dest="masks",
        action="append",
        type=_mask_option,
        metavar="CLASS=FILE",
        help="a class's binary mask (nonzero = the class), at any downsample of the slide",
    )
    source.add_argument(
        "--annotation",
        "--labels",  # dsf tile-labels' and dsf evaluate slide's name for it
        dest="annotation",
        type=Path,
        help="an annotation (label mask, GeoJSON or XML) painted over labels.base",
    )
    parser.add_argument("--out", required=True, type=Path, help="output label mask TIFF")
    add_setting_argument(
        parser,
        "--mpp",
        "patches.target_mpp",
        "label mask resolution, um/px (a slide level within --mpp-tolerance: its own)",
    )
    add_setting_argument(
        parser, "--rgb-max", "tissue.rgb_max", "tissue rule of labels.base", metavar=("R", "G", "B")
    )
    add_setting_argument(parser, "--threads", "patches.threads", "slide reader threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # labels.masks are the workflow's file patterns: a run by hand gives --mask CLASS=FILE
    add_section_arguments(parser, "labels", skip=("masks",))
    return parser


def _stage(args: argparse.Namespace) -> None:
    check_outputs([args.out], [args.slide, args.annotation, *(p for _, p in args.masks or [])])
    remove(args.out)  # a failed rerun must not leave the previous mask looking current
    settings = section_from_args(args, "labels")
    masks: dict[str, Path] = {}
    for name, path in args.masks or []:
        if name in masks:
            raise ConfigError(f"--mask names class {name!r} twice ({masks[name]} and {path})")
        masks[name] = path
    if not math.isfinite(args.mpp) or args.mpp <= 0:
        raise ConfigError(f"--mpp {args.mpp} is not a positive resolution (um/px)")
    with open_slide(
        args.slide, args.sheet_mpp, args.slide_id, mpp_tolerance=args.mpp_tolerance
    ) as slide:
        for name, path in masks.items():
            if not path.is_file():
                raise AnnotationError(
                    slide.slide_id,
                    f"the {name} mask {path} is not a file; fix its `mask:{name}` column",
                )
        shares = paint_labels(
            slide,
            masks,
            settings,
            list(args.rgb_max),
            args.mpp,
            args.out,
            args.threads,
            progress=not args.no_progress,
            annotation=args.annotation,
        )
    log.info(
        "%s: label mask %s: %s",
        args.slide_id or args.slide.stem,
        args.out,
        ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()),
    )


def main(argv: list[str] | None = None) -> int:
    """`dsf labels --slide S (--mask CLASS=FILE [--mask ...] | --annotation FILE) --out L.tiff
    [labels options]`."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    return run(lambda: _stage(args))


if __name__ == "__main__":
    sys.exit(main())
