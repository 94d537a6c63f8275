"""Prediction polygons as Aperio ImageScope annotation XML (`dsf polygons --imagescope`).

ImageScope, the viewer of Aperio `.svs` slides (TCGA's), opens `<slide>.xml` from the slide's
folder. Each class is an annotation layer named after it, in the map's colour; each predicted
region a freehand region (type 0) whose Text is the class, its holes negative regions
(`NegativeROA="1"`), with areas in px² and µm². ImageScope cuts a layer's negative regions out
of every region of that layer, so a region lying inside a hole of a region of its own class
(an island of tumour in stroma inside tumour) goes to a later layer of the same name: the file
then shows, and reads back through `dsf.annotation_xml`, as the map it was traced from.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import points_in_poly

#: The comment that marks the XML as dsf's prediction polygons.
MARK = "prediction polygons written by dsf polygons"


def _open_ring(ring: Sequence[Sequence[float]]) -> np.ndarray:
    """(n, 2) vertices without GeoJSON's closing repeat of the first."""
    pts = np.asarray(ring, np.float64)[:, :2]
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    return pts


def ring_area(ring: Sequence[Sequence[float]] | np.ndarray) -> float:
    """A ring's area (shoelace) in its coordinates' square units, from its vertices with or
    without GeoJSON's closing repeat (which adds nothing)."""
    x, y = np.asarray(ring, np.float64)[:, :2].T
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _area_length(pts: np.ndarray) -> tuple[float, float]:
    """Area and perimeter of a closed polygon given by its open vertex list."""
    step = np.roll(pts, -1, axis=0) - pts
    return ring_area(pts), float(np.hypot(step[:, 0], step[:, 1]).sum())


def nesting_depths(polygons: Sequence[Sequence[np.ndarray]]) -> list[int]:
    """For disjoint polygons of one class (each its outer ring, then its holes): how many
    others enclose each one, i.e. how many of their holes it lies in (a polygon in a hole of
    one that itself lies in a hole of a third is in the third's hole too). A polygon counts as
    inside a hole when most of its vertices are, which holds against the rings' independent
    simplification. Testing against the holes, not the outer rings, keeps this cheap: a
    ragged outline has tens of thousands of vertices, its holes a few dozen each."""
    holes = [h for rings in polygons for h in rings[1:]]
    if not holes:
        return [0] * len(polygons)
    boxes = np.array([[*h.min(0), *h.max(0)] for h in holes])
    depths = []
    for rings in polygons:
        ext = rings[0]
        (x0, y0), (x1, y1) = ext.min(0), ext.max(0)
        around = (boxes[:, 0] <= x0) & (boxes[:, 1] <= y0) & (boxes[:, 2] >= x1)
        around &= boxes[:, 3] >= y1
        depths.append(
            sum(bool(points_in_poly(ext, holes[j]).mean() > 0.5) for j in np.flatnonzero(around))
        )
    return depths


def _colour(rgb: Sequence[int]) -> str:
    """ImageScope's LineColor: a Windows COLORREF, R + 256 G + 65536 B, in decimal."""
    r, g, b = (int(c) for c in rgb[:3])
    return str(r + 256 * g + 65536 * b)


def _region(
    parent: ET.Element, rid: int, name: str, pts: np.ndarray, negative: bool, mpp: float
) -> None:
    area, length = _area_length(pts)
    region = ET.SubElement(
        parent,
        "Region",
        Id=str(rid),
        Type="0",
        Zoom="1",
        Selected="0",
        ImageLocation="",
        ImageFocus="-1",
        Length=f"{length:.1f}",
        Area=f"{area:.1f}",
        LengthMicrons=f"{length * mpp:.1f}",
        AreaMicrons=f"{area * mpp * mpp:.1f}",
        Text=name,
        NegativeROA="1" if negative else "0",
        InputRegionId="0",
        Analyze="1",
        DisplayId=str(rid),
    )
    ET.SubElement(region, "Attributes")
    vertices = ET.SubElement(region, "Vertices")
    for x, y in pts:
        ET.SubElement(vertices, "Vertex", X=f"{x:.10g}", Y=f"{y:.10g}", Z="0")


def imagescope_xml(features: Sequence[dict[str, Any]], mpp: float) -> bytes:
    """ImageScope XML (UTF-8 bytes) of QuPath GeoJSON polygon features (`dsf.polygons`), in
    level-0 px of a slide at `mpp` µm/px: layers per class in order of first appearance."""
    by_class: dict[str, list[list[np.ndarray]]] = {}
    colours: dict[str, Sequence[int]] = {}
    for feat in features:
        cls = feat["properties"]["classification"]
        by_class.setdefault(cls["name"], []).append(
            [_open_ring(r) for r in feat["geometry"]["coordinates"]]
        )
        colours.setdefault(cls["name"], cls.get("color", (255, 255, 0)))
    root = ET.Element("Annotations", MicronsPerPixel=f"{mpp:.6f}")
    layer_id = region_id = 0
    for name, polygons in by_class.items():
        depths = nesting_depths(polygons)
        for depth in range(max(depths) + 1):
            layer_id += 1
            layer = ET.SubElement(
                root,
                "Annotation",
                Id=str(layer_id),
                Name=name,
                ReadOnly="0",
                NameReadOnly="0",
                LineColorReadOnly="0",
                Incremental="0",
                Type="4",
                LineColor=_colour(colours[name]),
                Visible="1",
                Selected="0",
                MarkupImagePath="",
                MacroName="",
            )
            attributes = ET.SubElement(layer, "Attributes")
            ET.SubElement(attributes, "Attribute", Name="Description", Id="0", Value=name)
            regions = ET.SubElement(layer, "Regions")
            for rings, d in zip(polygons, depths, strict=True):
                if d != depth:
                    continue
                for k, pts in enumerate(rings):
                    region_id += 1
                    _region(regions, region_id, name, pts, negative=k > 0, mpp=mpp)
            ET.SubElement(layer, "Plots")
    ET.indent(root, space=" ")
    head = f"<?xml version='1.0' encoding='utf-8'?>\n<!-- {MARK} -->\n"
    return head.encode() + ET.tostring(root, encoding="utf-8")


def written_by_dsf(path: Path) -> bool:
    """Whether an existing XML file is one `imagescope_xml` wrote (its comment in the first
    lines), not a pathologist's annotation that must never be overwritten."""
    with open(path, "rb") as fh:
        return MARK.encode() in fh.read(512)
