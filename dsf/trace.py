"""Class rasters traced into QuPath-style GeoJSON polygons (level-0 pixel coordinates).

Each 4-connected component of a class becomes one Feature: its outer ring, then a ring per
hole (8-connected, so a hole touching the outline at a corner is still a hole). Rings follow
the pixel edges (`skimage.measure.find_contours` at 0.5), simplified by `approximate_polygon`,
and are scaled by the raster's downsample `ds` from raster pixels to level-0 pixels.
Used for the synthetic slides' annotations and for the prediction polygons of `dsf polygons`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours


def _ring(contour: np.ndarray, ds: float, tolerance: float) -> list[list[float]]:
    """A closed ring in level-0 px (x, y) from a find_contours (row, col) path."""
    path = approximate_polygon(contour, tolerance=tolerance)
    xy = np.round((path[:, ::-1] + 0.5) * ds, 2)
    ring = xy.tolist()
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def _outline(mask: np.ndarray, connected: str) -> np.ndarray:
    """The longest contour around the True pixels of a (padded) mask."""
    contours = find_contours(mask.astype(np.float32), 0.5, fully_connected=connected)
    return max(contours, key=len)


def component_rings(
    sub: np.ndarray,
    ds: float,
    offset: tuple[int, int],
    tolerance: float = 0.2,
    min_hole_px: int = 0,
) -> list[list[list[float]]]:
    """Outer ring then hole rings of one 4-connected component (a bool crop with a 1 px False
    border whose top-left is raster pixel `offset`); holes under `min_hole_px` pixels are
    filled."""
    filled = ndimage.binary_fill_holes(sub)
    shift = np.array(offset, np.float64)
    rings = [_ring(_outline(filled, "low") + shift, ds, tolerance)]
    holes, n = ndimage.label(filled & ~sub, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(np.ones_like(holes), holes, range(1, n + 1)) if n else []
    for i, size in enumerate(sizes, start=1):
        if size >= min_hole_px:
            rings.append(_ring(_outline(holes == i, "high") + shift, ds, tolerance))
    return rings


def class_features(
    labels: np.ndarray,
    ds: float,
    classes: dict[int, tuple[str, tuple[int, int, int]]],
    *,
    tolerance: float = 0.2,
    min_px: int = 0,
    properties: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """One QuPath annotation Feature per connected component of each class of `classes`
    (index -> name, RGB colour) in a (h, w) class raster at downsample `ds` of level 0.
    Components and holes smaller than `min_px` raster pixels are left out (holes filled);
    `properties` are added to every feature's properties."""
    extra = dict(properties or {})
    for cls, (name, colour) in classes.items():
        comps, _ = ndimage.label(labels == cls)
        boxes = ndimage.find_objects(comps)
        for i, box in enumerate(boxes, start=1):
            if box is None:
                continue
            sub = comps[box] == i
            if min_px and np.count_nonzero(sub) < min_px:
                continue
            r0, c0 = box[0].start, box[1].start
            rings = component_rings(
                np.pad(sub, 1), ds, (r0 - 1, c0 - 1), tolerance, min_hole_px=min_px
            )
            yield {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [int(c) for c in colour]},
                    **extra,
                },
            }
