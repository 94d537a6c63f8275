"""Class rasters traced into QuPath-style GeoJSON polygons (level-0 pixel coordinates).

Each 4-connected component of a class becomes one Feature: its outer ring, then a ring per
hole (8-connected, so a hole touching the outline at a corner is still a hole). Rings follow
the pixel edges (`skimage.measure.find_contours` at 0.5 turned into the pixel corners,
`pixel_edges`), so a region keeps its area; they are simplified by Douglas-Peucker
(`simplify`), scaled by the raster's downsample `ds` from raster pixels to level-0 pixels and
wound as RFC 7946 asks; rings left with no area are dropped.
Used for the synthetic slides' annotations and for the prediction polygons of `dsf polygons`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours


def simplify(path: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a (n, 2) path, the same points as
    `skimage.measure.approximate_polygon` keeps (its distance to each chord, its first farthest
    point), but every open chord is split in one vectorised pass per recursion depth instead of
    a Python step per split: a ragged outline of 50,000 points took skimage seconds."""
    n = len(path)
    if tolerance <= 0 or n < 3:
        return path
    keep = np.zeros(n, bool)
    keep[[0, -1]] = True
    starts, ends = np.array([0]), np.array([n - 1])
    while starts.size:
        inner = ends - starts - 1
        live = inner > 0
        starts, ends, inner = starts[live], ends[live], inner[live]
        if not starts.size:
            break
        first = np.cumsum(inner) - inner  # each chord's first slot in the flat arrays
        chord = np.repeat(np.arange(starts.size), inner)
        idx = np.arange(inner.sum()) - first[chord] + starts[chord] + 1
        r0, c0 = path[starts, 0][chord], path[starts, 1][chord]
        r1, c1 = path[ends, 0][chord], path[ends, 1][chord]
        r, c = path[idx, 0], path[idx, 1]
        dr, dc = r1 - r0, c1 - c0
        angle = -np.arctan2(dr, dc)
        cos, sin = np.cos(angle), np.sin(angle)
        dr0, dc0, dr1, dc1 = r - r0, c - c0, r - r1, c - c1
        # perpendicular distance where the point projects inside the chord, else the nearer end
        inside = ((dr0 * dr + dc0 * dc) > 0) & ((-dr1 * dr - dc1 * dc) > 0)
        dist = np.where(
            inside,
            np.abs(r * cos + c * sin - (c0 * sin + r0 * cos)),
            np.minimum(np.sqrt(dc0**2 + dr0**2), np.sqrt(dc1**2 + dr1**2)),
        )
        top = np.maximum.reduceat(dist, first)
        split = top > tolerance
        slot = np.where(dist == top[chord], np.arange(dist.size), dist.size)
        at = idx[np.minimum.reduceat(slot, first)[split]]
        keep[at] = True
        starts = np.concatenate([starts[split], at])
        ends = np.concatenate([at, ends[split]])
    return path[keep]


def _ring(
    contour: np.ndarray, ds: float, tolerance: float, origin: float = 0.0, hole: bool = False
) -> list[list[float]] | None:
    """A closed ring in level-0 px (x, y) from a find_contours (row, col) path, wound as
    RFC 7946 asks (outer rings counterclockwise, holes clockwise, in x-right y-down pixel
    space read as a plane); None when simplification left it no area (fewer than 4
    positions: not a ring to GeoJSON or QuPath)."""
    path = simplify(contour, tolerance)
    xy = np.round((path[:, ::-1] + 0.5) * ds + origin, 2)
    ring = xy.tolist()
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    pts = np.asarray(ring)
    area = 0.5 * float(np.sum(pts[:-1, 0] * pts[1:, 1] - pts[1:, 0] * pts[:-1, 1]))
    if len(ring) < 4 or area == 0:
        return None
    if (area < 0) != hole:  # the shoelace sign in (x, y): positive = counterclockwise
        ring.reverse()
    return ring


def _outline(mask: np.ndarray, connected: str) -> np.ndarray:
    """The longest ring around the True pixels of a (padded) mask, along their pixel edges."""
    contours = find_contours(mask.astype(np.float32), 0.5, fully_connected=connected)
    return pixel_edges(max(contours, key=len))


def pixel_edges(contour: np.ndarray) -> np.ndarray:
    """The closed (n, 2) find_contours path at 0.5 (through the midpoints of the boundary
    pixels' edges) turned into the pixel edges themselves: at each turn the pixel corner the
    two midpoints share, and the midpoints dropped. A region keeps its exact area (a pixel is
    a square, not a diamond); a corner the ring passes twice (two parts of it meeting
    diagonally) keeps its two midpoints instead, so the ring does not touch itself."""
    p = contour[:-1] if len(contour) > 1 and np.array_equal(contour[0], contour[-1]) else contour
    if len(p) < 3:
        return contour
    q = np.roll(p, -1, axis=0)
    # each midpoint has one half-integer coordinate: the pixel edge it lies on
    half_p = np.abs(p - np.round(p)) > 0.25
    half_q = np.abs(q - np.round(q)) > 0.25
    turn = half_p[:, 0] != half_q[:, 0]
    corner = np.where(half_p, p, q)  # the half-integer coordinate of each midpoint
    at = np.flatnonzero(turn)
    if at.size < 3:
        return contour
    corners = corner[at]
    _, inv, counts = np.unique(corners, axis=0, return_inverse=True, return_counts=True)
    twice = counts[inv.ravel()] > 1
    if not twice.any():
        ring = corners
    else:
        parts = [
            np.stack([p[k], q[k]]) if dup else corners[i : i + 1]
            for i, (k, dup) in enumerate(zip(at, twice, strict=True))
        ]
        ring = np.concatenate(parts)
    return np.concatenate([ring, ring[:1]])


def component_rings(
    sub: np.ndarray,
    ds: float,
    offset: tuple[int, int],
    tolerance: float,
    min_hole_px: int = 0,
    origin: float = 0.0,
) -> list[list[list[float]]]:
    """Outer ring then hole rings of one 4-connected component (a bool crop with a 1 px False
    border whose top-left is raster pixel `offset`); holes under `min_hole_px` pixels are
    filled, and rings simplified to no area are left out (no rings: a component too thin to
    keep). `origin` (level-0 px) is added to every coordinate."""
    filled = ndimage.binary_fill_holes(sub)
    shift = np.array(offset, np.float64)
    outer = _ring(_outline(filled, "low") + shift, ds, tolerance, origin)
    if outer is None:
        return []
    rings = [outer]
    holes, _ = ndimage.label(filled & ~sub, structure=np.ones((3, 3), bool))
    sizes = np.bincount(holes.ravel())
    # each hole is traced in its own box (it lies inside the component, so the box's 1 px of
    # padding is outside the hole); the component's box would cost its whole area per hole
    for i, box in enumerate(ndimage.find_objects(holes), start=1):
        if box is None or sizes[i] < min_hole_px:
            continue
        corner = shift + (box[0].start - 1, box[1].start - 1)
        hole = np.pad(holes[box] == i, 1)
        ring = _ring(_outline(hole, "high") + corner, ds, tolerance, origin, hole=True)
        if ring is not None:
            rings.append(ring)
    return rings


def class_features(
    labels: np.ndarray,
    ds: float,
    classes: dict[int, tuple[str, tuple[int, int, int]]],
    *,
    tolerance: float,
    min_px: int = 0,
    properties: dict[str, Any] | None = None,
    origin: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """One QuPath annotation Feature per connected component of each class of `classes`
    (index -> name, RGB colour) in a (h, w) class raster at downsample `ds` of level 0,
    outlines simplified within `tolerance` raster pixels (Douglas-Peucker). Components and
    holes smaller than `min_px` raster pixels are left out (holes filled); `properties` are
    added to every feature's properties; `origin` (level-0 px) shifts every coordinate (a map
    level whose pixels sample a point off their squares' centres)."""
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
                np.pad(sub, 1), ds, (r0 - 1, c0 - 1), tolerance, min_hole_px=min_px, origin=origin
            )
            if not rings:
                continue
            yield {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [int(c) for c in colour]},
                    **extra,
                },
            }
