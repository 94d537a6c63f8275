"""Annotation XML of the two desktop tools pathologists draw with (DESIGN section 4).

- **Aperio ImageScope** (`<Annotations>`; ImageScope saves `<slide>.xml` beside the `.svs`; TCGA
  and PAIP annotations): each `<Annotation>` is a layer of `<Region>`s with `<Vertex X Y>`
  corners. Region type 0 is a freehand polygon, 1 a rectangle, 2 an ellipse (its bounding-box
  corners; newer versions also write `GeoShape`); arrows, rulers and pins are no areas and are
  skipped. A negative region (`NegativeROA="1"`) is cut out of its layer's other regions.
  Layers are painted in file order, a later one over an earlier one, as ImageScope shows them.
  **Indica Labs HALO** writes the same layout with named types (`Type="Polygon"`, `Rectangle`,
  `Ellipse`; pins and rulers are skipped) and `<V X Y>` corners: read alike.
- **ASAP** (`<ASAP_Annotations>`; CAMELYON16/17): `<Annotation Type PartOfGroup>` with ordered
  `<Coordinate X Y>`; the group is the class. Polygons, splines (their control polygon, as
  ASAP's own mask converter fills them) and rectangles are areas; dots, point sets and
  measurements are skipped. Groups are painted in the order `<AnnotationGroups>` lists them
  (CAMELYON16's exclusion group `_2` over its tumour groups `_0` and `_1`), annotations of a
  group in file order.

Coordinates are level-0 pixels in all three, taken as counted from the plane's corner as
OpenSlide reads it (unlike QuPath's GeoJSON, counted from a MIRAX or Leica slide's bounds:
unchecked for these tools on such slides). This module reads the
file into polygons, each with the names its class may be known by (most specific first);
`dsf.annotations` maps them to classes.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsf.errors import AnnotationError

log = logging.getLogger(__name__)

APERIO_ROOT = "Annotations"
ASAP_ROOT = "ASAP_Annotations"
#: Aperio region types that are areas (0 freehand polygon, 1 rectangle, 2 ellipse).
_APERIO_AREAS = {"0": "polygon", "1": "rectangle", "2": "ellipse"}
_GEOSHAPES = {"polygon": "polygon", "area": "polygon", "rectangle": "rectangle"}
_GEOSHAPES |= {"ellipse": "ellipse", "circle": "ellipse"}
_ASAP_AREAS = {"polygon": "polygon", "spline": "polygon", "rectangle": "rectangle"}
#: Vertices of the polygon an ellipse is filled as (at most 0.4 px off at a 5,000 px radius).
ELLIPSE_VERTICES = 256


@dataclass
class XMLPolygon:
    """One area of an annotation XML: outer ring and holes in level-0 px (x, y), the names its
    class may be known by, most specific first, and what to call it in a message."""

    names: list[str]
    what: str
    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.outer.min(0), self.outer.max(0)
        return float(x0), float(y0), float(x1), float(y1)


def _tag(elem: ET.Element) -> str:
    return elem.tag.rsplit("}", 1)[-1]  # without a namespace


def root_tag(path: Path) -> str:
    """The root element's name of an XML file, read without parsing the rest; an OSError or
    ET.ParseError when it is no readable XML."""
    for _, elem in ET.iterparse(path, events=("start",)):
        return _tag(elem)
    raise ET.ParseError(f"{path} holds no element")


def is_annotation_xml(path: Path) -> bool:
    """Whether an XML file is Aperio ImageScope or ASAP annotation (scanners and other tools
    write XML of their own beside slides)."""
    return root_tag(path) in (APERIO_ROOT, ASAP_ROOT)


def _number(text: str | None, slide_id: str, path: Path, what: str) -> float:
    """A coordinate; a decimal comma (some CAMELYON17 files) is read as a point."""
    raw = (text or "").strip()
    if "," in raw and "." not in raw:
        raw = raw.replace(",", ".")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AnnotationError(slide_id, f"{path}: {what} has coordinate {text!r}, not a number")
    return value


def _ring(points: list[tuple[float, float]], kind: str) -> np.ndarray | None:
    """The polygon of an area from its points: a rectangle or ellipse may be given by two
    opposite corners of its box; None when the points enclose nothing."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if kind == "ellipse" or (kind == "rectangle" and len(pts) == 2):
        if len(pts) < 2:
            return None
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        if kind == "rectangle":
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        else:
            t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
    if len(np.unique(pts, axis=0)) < 3 or np.ptp(pts[:, 0]) == 0 or np.ptp(pts[:, 1]) == 0:
        return None
    return pts


def _aperio(root: ET.Element, slide_id: str, path: Path) -> list[XMLPolygon]:
    out: list[XMLPolygon] = []
    skipped: Counter[str] = Counter()
    for li, layer in enumerate(c for c in root if _tag(c) == "Annotation"):
        attributes = layer.find("Attributes")
        layer_attrs = list(attributes) if attributes is not None else []
        names = _aperio_layer_names(layer, layer_attrs)
        positives: list[XMLPolygon] = []
        negatives: list[np.ndarray] = []
        for region in layer.iter():
            if _tag(region) != "Region":
                continue
            rid = region.get("Id", "?")
            what = f"region {rid} of layer {layer.get('Id', li + 1)}"
            shape = (region.get("GeoShape") or "").lower()
            rtype = (region.get("Type") or "0").strip()
            if not shape and not rtype.isdigit():  # HALO names its types
                shape = rtype.lower()
            kind = _GEOSHAPES.get(shape) if shape else _APERIO_AREAS.get(rtype)
            if kind is None:
                skipped[f"type {shape or region.get('Type')}"] += 1
                continue
            points = [
                (
                    _number(v.get("X"), slide_id, path, what),
                    _number(v.get("Y"), slide_id, path, what),
                )
                for v in region.iter()
                if _tag(v) in ("Vertex", "V")  # HALO: <V X Y>
            ]
            ring = _ring(points, kind)
            if ring is None:
                skipped["with under 3 corners"] += 1
                continue
            if region.get("NegativeROA", "0").strip() == "1":
                negatives.append(ring)
                continue
            text = (region.get("Text") or "").strip()
            positives.append(XMLPolygon([text, *names] if text else names, what, ring))
        # a negative region is cut out of every region of its layer that its box meets
        boxes = np.array([[*h.min(0), *h.max(0)] for h in negatives]).reshape(-1, 4)
        for poly in positives:
            x0, y0, x1, y1 = poly.bbox
            meets = (boxes[:, 0] <= x1) & (x0 <= boxes[:, 2])
            meets &= (boxes[:, 1] <= y1) & (y0 <= boxes[:, 3])
            poly.holes = [negatives[j] for j in np.flatnonzero(meets)]
        out += positives
    _log_skipped(path, skipped)
    return out


def _aperio_layer_names(layer: ET.Element, attrs: list[ET.Element]) -> list[str]:
    """An Aperio layer's names: its Name, its attribute values (the Description column), its
    attribute names, then `layer <Id>` for unnamed layers."""
    names = [layer.get("Name", "")]
    names += [a.get("Value", "") for a in attrs]
    names += [a.get("Name", "") for a in attrs if a.get("Name", "") != "Description"]
    names.append(f"layer {layer.get('Id', '?')}")
    return list(dict.fromkeys(n.strip() for n in names if n and n.strip()))


def _asap(root: ET.Element, slide_id: str, path: Path) -> list[XMLPolygon]:
    groups: dict[str, str] = {}  # group -> its parent group
    for group in root.iter():
        if _tag(group) == "Group" and group.get("Name"):
            groups[group.get("Name", "")] = group.get("PartOfGroup", "None")
    rank = {name: i for i, name in enumerate(groups)}
    out: list[tuple[int, int, XMLPolygon]] = []
    skipped: Counter[str] = Counter()
    for ai, ann in enumerate(e for e in root.iter() if _tag(e) == "Annotation"):
        what = f"annotation {ann.get('Name') or ai}"
        kind = _ASAP_AREAS.get((ann.get("Type") or "").lower())
        if kind is None:
            skipped[f"type {ann.get('Type')}"] += 1
            continue
        coords = [c for c in ann.iter() if _tag(c) == "Coordinate"]
        order = [_order(c, ci, slide_id, path, what) for ci, c in enumerate(coords)]
        coords = [c for _, c in sorted(zip(order, coords, strict=True), key=lambda t: t[0])]
        points = [
            (_number(c.get("X"), slide_id, path, what), _number(c.get("Y"), slide_id, path, what))
            for c in coords
        ]
        ring = _ring(points, kind)
        if ring is None:
            skipped["with under 3 corners"] += 1
            continue
        chain: list[str] = []
        group = (ann.get("PartOfGroup") or "None").strip()
        while group and group != "None" and group not in chain:
            chain.append(group)
            group = groups.get(group, "None")
        if not chain:
            raise AnnotationError(
                slide_id,
                f"{path}: {what} belongs to no group; its group is its class: put it in a "
                "group in ASAP",
            )
        out.append((rank.get(chain[0], len(rank)), ai, XMLPolygon(chain, what, ring)))
    _log_skipped(path, skipped)
    return [poly for _, _, poly in sorted(out, key=lambda t: t[:2])]


def _order(coord: ET.Element, index: int, slide_id: str, path: Path, what: str) -> int:
    """An ASAP `<Coordinate>`'s `Order` (0 when absent or empty); an AnnotationError naming
    the annotation and the coordinate when it is no whole number."""
    raw = (coord.get("Order") or "").strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise AnnotationError(
            slide_id,
            f"{path}: {what}: Coordinate {index} has Order {raw!r}, not a whole number; number "
            "the coordinates 0, 1, 2, ... in drawing order, or save the annotation again in ASAP",
        ) from None


def _log_skipped(path: Path, skipped: Counter[str]) -> None:
    if skipped:
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        log.warning(
            "%s: regions that are no areas (lines, arrows, points) skipped: %s", path, parts
        )


def read_xml(path: Path, slide_id: str) -> list[XMLPolygon]:
    """The areas of an Aperio ImageScope or ASAP annotation XML, in painting order."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise AnnotationError(slide_id, f"cannot read annotation XML {path}: {exc}") from exc
    tag = _tag(root)
    if tag == APERIO_ROOT:
        return _aperio(root, slide_id, path)
    if tag == ASAP_ROOT:
        return _asap(root, slide_id, path)
    raise AnnotationError(
        slide_id,
        f"{path} is XML with root <{tag}>, neither Aperio ImageScope (<{APERIO_ROOT}>) nor ASAP "
        f"(<{ASAP_ROOT}>) annotation; export the annotations from QuPath as GeoJSON instead",
    )
