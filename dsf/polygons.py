"""Prediction polygons: a class map of `dsf infer` traced into QuPath GeoJSON over its slide.

The map is a separate image; pathologists review predictions on the slide itself. Each
predicted region becomes a QuPath annotation (class name and colour of the map's palette,
coordinates in the slide's level-0 pixels, counted as QuPath counts them: from the corner of
the slide's `Slide.bounds` where OpenSlide gives them, MIRAX and Leica), so a drag onto the
slide in QuPath shows them, and corrected annotations exported again are labels dsf reads
(`labels` column). Polygons stay on the slide, and on a MIRAX or Leica slide on its scanned
region (what QuPath shows of it). The map is traced at about `polygons.mpp` (its pyramid level
at or finer than that), regions and holes under `polygons.min_um2` are left out, rings
simplified by `polygons.tolerance` traced pixels. With `polygons.imagescope` the same polygons
are also written as Aperio ImageScope XML beside the GeoJSON (`dsf.imagescope`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dsf.atomic import atomic_path, check_outputs, remove
from dsf.class_map import ClassMap, add_map_arguments, open_map
from dsf.colours import class_colours
from dsf.config import add_section_arguments, section_from_args
from dsf.errors import ConfigError
from dsf.imagescope import imagescope_xml, ring_area, written_by_dsf
from dsf.runner import run, setup_logging
from dsf.slide import add_tolerance_argument, open_slide
from dsf.trace import class_features

log = logging.getLogger(__name__)

#: A map level larger than this (pixels) is not traced; a coarser one is.
MAX_TRACE_PX = 1 << 26


def trace_level(cmap: ClassMap, mpp: float) -> int:
    """The map level traced for `mpp`: the coarsest at or finer than it (level 0 when even
    that is coarser), or coarser still when it would exceed MAX_TRACE_PX pixels."""
    fine = [lv for lv in range(len(cmap.levels)) if cmap.level_mpp(lv) <= mpp * 1.001]
    level = max(fine, key=cmap.level_mpp) if fine else 0
    while math.prod(cmap.levels[level]) > MAX_TRACE_PX and level + 1 < len(cmap.levels):
        level += 1
    if cmap.level_mpp(level) > mpp * 1.001 and fine:
        log.warning(
            "%s: traced at %.3g um/px, coarser than polygons.mpp %.3g, to stay within %d px",
            cmap.path,
            cmap.level_mpp(level),
            mpp,
            MAX_TRACE_PX,
        )
    return level


def check_slide_fits(cmap: ClassMap, slide_id: str, dims: tuple[int, int], mpp0: float) -> None:
    """The map must be of this slide and cover it at its scale (the map starts at the slide's
    origin); else a ConfigError naming both."""
    if str(cmap.meta["slide"]) != slide_id:
        raise ConfigError(
            f"class map {cmap.path} is of slide {cmap.meta['slide']!r}, not {slide_id!r}"
        )
    f = cmap.mpp / mpp0
    for name, px, size in (("width", cmap.width, dims[0]), ("height", cmap.height, dims[1])):
        if abs(px * f - size) > f + 1:
            raise ConfigError(
                f"class map {cmap.path} covers {px * f:.0f} level-0 px of {slide_id!r}'s "
                f"{name} {size} at {mpp0:.4g} um/px: the map was made with another mpp; "
                "rerun infer with the slide's mpp (sheet column `mpp`)"
            )


def map_polygons(
    cmap: ClassMap,
    mpp0: float,
    settings: dict[str, Any],
    region: tuple[int, int, int, int] | None = None,
) -> dict[str, Any]:
    """The map's regions as a GeoJSON FeatureCollection in level-0 px of a slide at `mpp0`,
    clipped to `region` (x, y, width, height in level-0 px: the slide's plane, or its
    `Slide.bounds`): a map's last pixels, and more so a coarse level's, reach past the slide's
    edge, and a MIRAX or Leica map covers the glass around the scanned region too."""
    level = trace_level(cmap, float(settings["mpp"]))
    level_mpp = cmap.level_mpp(level)
    classes = [str(c) for c in cmap.meta["classes"]]
    colours = class_colours(len(classes))
    named = {i: (classes[i], tuple(colours[i].tolist())) for i in range(1, len(classes))}
    raster = cmap.read_level(level)
    present = set(np.unique(raster).tolist()) - {0}
    unknown = sorted(present - set(named))
    if unknown:
        raise ConfigError(f"class map {cmap.path} holds class indices {unknown} beyond {classes}")
    min_px = math.ceil(float(settings["min_um2"]) / level_mpp**2)
    # a reduced level keeps the pixel at offset f // 2 of each f-square of map pixels, so a
    # region's edges are known to a block: centre them on the sampled pixels (half a map
    # pixel right and down of the square's centre when f is even)
    scale = cmap.mpp / mpp0  # level-0 px per map px
    f = 2**level
    shift = (f // 2 + 0.5 - f / 2) * scale
    if region is not None:  # traced pixels wholly off the region are background
        raster = _within(raster, region, f * scale, shift)
    features = list(
        class_features(
            raster,
            level_mpp / mpp0,
            {i: named[i] for i in sorted(present)},
            tolerance=float(settings["tolerance"]),
            min_px=min_px,
            origin=shift,
        )
    )
    # but the map's own edges are exact: put edges traced there back on them
    far = np.array([raster.shape[1], raster.shape[0]]) * 2**level * scale + shift
    edge = np.array([cmap.width, cmap.height]) * scale
    for feat in features:
        rings = []
        for ring in feat["geometry"]["coordinates"]:
            xy = np.asarray(ring)
            xy = np.where(np.isclose(xy, shift, atol=0.01), 0.0, xy)
            xy = np.where(np.isclose(xy, far, atol=0.01), edge, xy)
            rings.append(xy.tolist())
        feat["geometry"]["coordinates"] = rings
    if region is not None:  # the pixels across its edges: their part on it
        lo = np.array(region[:2], np.float64)
        hi = lo + region[2:]
        features = [
            feat | {"geometry": feat["geometry"] | {"coordinates": rings}}
            for feat in features
            if (rings := _clipped(feat["geometry"]["coordinates"], lo, hi))
        ]
    counts = Counter(f["properties"]["classification"]["name"] for f in features)
    traced: Counter[str] = Counter()
    for feat in features:
        traced[feat["properties"]["classification"]["name"]] += _area(feat) * mpp0**2
    mapped = np.bincount(raster.ravel(), minlength=len(classes)) * level_mpp**2
    log.info(
        "%s: %d regions traced at %.3g um/px (%s), covering %s of the map (regions under "
        "%g um2 left out: the class areas are in areas.tsv)",
        cmap.meta["slide"],
        len(features),
        level_mpp,
        ", ".join(f"{name} {counts[name]}" for name in classes if counts[name]) or "none",
        ", ".join(
            f"{name} {traced[name] / 1e6:.3g} of {mapped[i] / 1e6:.3g} mm2"
            for i, name in enumerate(classes)
            if i and mapped[i]
        )
        or "none",
        float(settings["min_um2"]),
    )
    return {"type": "FeatureCollection", "features": features}


def _within(
    raster: np.ndarray, region: tuple[int, int, int, int], px: float, shift: float
) -> np.ndarray:
    """`raster` (traced pixels of `px` level-0 px, the first starting at `shift`) with the
    pixels wholly outside `region` (x, y, width, height in level-0 px) set to 0, so that no
    outline runs off it (a vertex clamp of such an outline folds it onto the edge)."""
    x, y, w, h = region
    c0, r0 = (max(0, math.floor((v - shift) / px)) for v in (x, y))
    c1, r1 = (max(0, math.ceil((v - shift) / px)) for v in (x + w, y + h))
    if r0 == c0 == 0 and r1 >= raster.shape[0] and c1 >= raster.shape[1]:
        return raster
    out = np.zeros_like(raster)
    out[r0:r1, c0:c1] = raster[r0:r1, c0:c1]
    return out


def _clipped(rings: list[Any], lo: np.ndarray, hi: np.ndarray) -> list[list[Any]]:
    """A polygon's rings clamped to the box `lo`..`hi`: exact for an outline whose pixels
    straddle the box's edges only (`_within`). Holes clamped to a line are left out; [] when
    the outer ring is."""
    outer, *holes = (np.clip(np.asarray(r, np.float64), lo, hi) for r in rings)
    if ring_area(outer) == 0:
        return []
    return [r.tolist() for r in (outer, *holes) if ring_area(r) > 0]


def _from(
    features: list[dict[str, Any]], bounds: tuple[int, int, int, int] | None
) -> list[dict[str, Any]]:
    """The features (clipped to `bounds` by `map_polygons`) as QuPath places them on a slide
    with `bounds` (`Slide.bounds`: QuPath's image of a MIRAX or Leica slide is that region):
    counted from its corner."""
    if bounds is None:
        return features
    x, y, w, h = bounds
    log.info("coordinates counted from the slide's scanned region at x %d, y %d, as QuPath "
             "counts them (%d x %d px)", x, y, w, h)  # fmt: skip
    d = np.array([x, y], np.float64)
    out = []
    for feat in features:
        rings = [(np.asarray(r) - d).tolist() for r in feat["geometry"]["coordinates"]]
        out.append(feat | {"geometry": feat["geometry"] | {"coordinates": rings}})
    return out


def _area(feature: dict[str, Any]) -> float:
    """A polygon feature's area in its coordinates' square units (outer ring less holes)."""
    rings = feature["geometry"]["coordinates"]
    return sum(ring_area(r) if i == 0 else -ring_area(r) for i, r in enumerate(rings))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf polygons",
        description="Trace a class map of `dsf infer` into QuPath GeoJSON annotations over its "
        "slide (level-0 pixels): drag the file onto the slide in QuPath.",
    )
    add_map_arguments(p)
    p.add_argument("--slide", required=True, type=Path, help="the slide the map is of")
    p.add_argument("--slide-id", help="slide id (default: from the file name)")
    p.add_argument("--sheet-mpp", type=float, help="level-0 um/px from the sheet (wins)")
    add_tolerance_argument(p)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="GeoJSON to write (with --imagescope also the XML: this name with suffix .xml)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_section_arguments(p, "polygons", skip=("enabled",))
    return p


#: A foreign member at the head of the GeoJSON written here (QuPath ignores it): a rerun may
#: replace a file that carries it; any other file (a pathologist's annotation) is left alone.
MARK = {"generator": "dsf polygons"}


def _written_by_dsf(path: Path) -> bool:
    """Whether an existing GeoJSON or ImageScope XML is one `dsf polygons` wrote."""
    if path.suffix.lower() == ".xml":
        return written_by_dsf(path)
    with open(path, "rb") as fh:
        return json.dumps(MARK, separators=(",", ":"))[1:-1].encode() in fh.read(512)


def main(argv: list[str] | None = None) -> int:
    """`dsf polygons`."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> None:
        settings = section_from_args(args, "polygons")
        xml = args.out.with_suffix(".xml") if settings["imagescope"] else None
        if xml == args.out:
            raise ConfigError(f"--out {args.out}: the GeoJSON needs another suffix than .xml")
        check_outputs([args.out, xml], [args.map, args.map_json, args.slide])
        for out in (args.out, xml):
            if out is not None and out.is_file() and not _written_by_dsf(out):
                raise ConfigError(
                    f"{out} exists and was not written by dsf polygons (an annotation beside "
                    "its slide?): it is left alone; give --out a name in another folder (or "
                    "delete it, if an older dsf wrote it)"
                )
        # a failed rerun must not leave the previous polygons looking current
        for out in (args.out, xml):
            if out is not None:
                remove(out)
        cmap = open_map(args.map, args.map_json)
        with open_slide(
            args.slide, args.sheet_mpp, args.slide_id, mpp_tolerance=args.mpp_tolerance
        ) as slide:
            check_slide_fits(cmap, slide.slide_id, slide.dimensions, slide.mpp)
            mpp0, bounds = slide.mpp, slide.bounds
            region = bounds or (0, 0, *slide.dimensions)
        features = map_polygons(cmap, mpp0, settings, region)["features"]
        collection = {"type": "FeatureCollection", **MARK, "features": _from(features, bounds)}
        with atomic_path(args.out) as tmp:  # dumps: json's C encoder (dump's is Python)
            tmp.write_text(json.dumps(collection, separators=(",", ":")))
        if xml is not None:  # the same, counted from the plane's corner (as dsf reads XML)
            with atomic_path(xml) as tmp:
                tmp.write_bytes(imagescope_xml(features, mpp0))

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
