"""Annotations as class-index rasters read like slide regions (DESIGN section 4).

Three sources, one interface (`LabelSource.read(x, y, width, height, mpp)`, level-0 origin,
resolution in um/px, nearest-neighbour so class indices stay exact):
- raster masks (TIFF or PNG) at any downsample of the slide, up to its full size, codes mapped
  through a class map (e.g. the BCSS preset); the downsample is inferred from the mask's size and
  must be the same in x and y; TIFFs are read lazily (`dsf.mask_raster`);
- QuPath-style GeoJSON (FeatureCollection, feature list or single feature; Polygon and
  MultiPolygon in level-0 pixels, counted, as QuPath counts them, from the corner of the
  slide's `Slide.bounds`: QuPath crops MIRAX and Leica slides to OpenSlide's bounds);
- Aperio ImageScope or ASAP annotation XML (`dsf.annotation_xml`).
Polygons are rasterised per requested region so memory stays bounded; their class names map to
`labels.classes` by name or through `labels.names`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dsf.annotation_xml import read_xml
from dsf.class_tiff import described_codes
from dsf.errors import AnnotationError, found_at_start
from dsf.label_settings import check_label_settings
from dsf.mask_raster import MaskRaster

log = logging.getLogger(__name__)

_UNMAPPED = 255


class LabelSource:
    """Class indices (uint8, 0 = unlabelled) of slide regions."""

    slide_id: str

    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """Labels (height, width) of the region with level-0 top-left (x, y) at `mpp`."""
        raise NotImplementedError


def _code_lut(settings: dict[str, Any]) -> np.ndarray:
    """Lookup table raster code -> class index (`_UNMAPPED` marks codes that are an error)."""
    n_classes = len(settings["classes"])
    lut = np.full(256, _UNMAPPED, np.uint8)
    if settings["class_map"]:
        lut[:] = settings["other_class"]
        for code, cls in settings["class_map"].items():
            lut[int(code)] = cls
    else:
        lut[:n_classes] = np.arange(n_classes, dtype=np.uint8)
    return lut


class RasterLabels(LabelSource):
    """A label mask at some downsample of the slide, read lazily (`MaskRaster`: a tiled or
    pyramidal TIFF is never loaded whole) with nearest-neighbour sampling and mapped through
    the class map."""

    #: A mask's coarsest level up to this size is checked for unmapped codes when opened.
    CHECK_PX = 16 * 1024 * 1024

    def __init__(
        self,
        path: Path,
        slide_id: str,
        slide_dims: tuple[int, int],
        mpp0: float,
        settings: dict[str, Any],
    ) -> None:
        self.slide_id = slide_id
        self.path = path
        self._mpp0 = mpp0
        self._lut = _code_lut(settings)
        self._n_classes = len(settings["classes"])
        if Path(path).suffix.lower() in {".tif", ".tiff"}:
            self._by_name(described_codes(path), list(settings["classes"]))
        self._raster = MaskRaster(path, slide_id, slide_dims, "label mask")
        self.ds_x, self.ds_y = self._raster.ds_x, self._raster.ds_y
        coarse = self._raster.coarsest(self.CHECK_PX)
        if coarse is not None:  # most bad codes are named now, not in the middle of a stage
            self._check(np.unique(coarse))

    def _by_name(self, codes: dict[int, str] | None, classes: list[str]) -> None:
        """A mask dsf wrote names the class of each of its values: a painted label mask
        (`dsf labels`, results/labels/) or a map holds class indices of its classes, a `dsf
        synth` mask its codes. Those are mapped to labels.classes by name (never through
        labels.class_map, which is for raster codes; a class the run does not have is
        refused), so a reordered class list cannot swap classes."""
        if codes is None:
            return
        lower = [c.lower() for c in classes]
        lut = np.full(256, _UNMAPPED, np.uint8)
        lut[0] = 0
        for code, name in codes.items():
            if code == 0 or not 0 <= code < 256:
                continue  # 0: unlabelled, whatever the mask calls it
            if name.lower() not in lower[1:]:
                raise AnnotationError(
                    self.slide_id,
                    f"label mask {self.path} holds class {name!r} (value {code}), which is not "
                    f"one of labels.classes {classes[1:]}: rebuild it with these classes "
                    "(delete it and rerun the labels stage; the workflow does so itself when "
                    "labels.classes changes) or set labels.classes back",
                )
            lut[code] = lower.index(name.lower(), 1)
        self._lut = lut

    def _check(self, present: np.ndarray) -> None:
        bad = [int(c) for c in present if self._lut[c] == _UNMAPPED]
        if bad:
            raise AnnotationError(
                self.slide_id,
                f"label mask {self.path} holds codes {bad} that are not class indices of "
                f"labels.classes ({self._n_classes} classes); map them with labels.class_map",
            )

    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """Class indices of the region at level-0 (x, y), `width` x `height` px at `mpp`."""
        f = mpp / self._mpp0
        codes = self._raster.read(x, y, width, height, f)
        out = self._lut[codes]
        if (out == _UNMAPPED).any():
            self._check(np.unique(codes))
        # past the mask's edges (a coarse map's last pixels reach past the slide) nothing is
        # labelled: code 0 there is no pixel of the mask (labels.other_class had taken it)
        cols, rows = self._raster.covered(x, y, width, height, f)
        if not cols.all() or not rows.all():
            out[~rows] = 0
            out[:, ~cols] = 0
        return out


def fill_ring(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels (of an array of `shape`) whose centres lie inside a polygon given by its vertices'
    (fractional) rows and columns, even-odd rule: a scanline fill, whose cost grows with the
    rows times the edges each crosses, not with the box's pixels times the vertices as a
    point-in-polygon test per pixel does (a traced tumour outline has thousands of vertices)."""
    h, w = shape
    y0, x0 = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    y1, x1 = np.roll(y0, -1), np.roll(x0, -1)  # each vertex to the next, the ring closed
    first = np.clip(np.ceil(np.minimum(y0, y1)), 0, h).astype(np.int64)
    stop = np.clip(np.ceil(np.maximum(y0, y1)), 0, h).astype(np.int64)
    n = stop - first  # the rows r with min <= r < max that an edge crosses (half-open)
    edge = np.repeat(np.arange(len(n)), n)
    if edge.size == 0:
        return np.zeros(shape, bool)
    starts = np.cumsum(n) - n
    r = first[edge] + (np.arange(edge.size) - starts[edge])
    xs = x0[edge] + (r - y0[edge]) * (x1 - x0)[edge] / (y1 - y0)[edge]
    order = np.lexsort((xs, r))
    r, xs = r[order], xs[order]
    # crossings come in pairs per row: the centres c with left <= c < right are inside
    c0 = np.clip(np.ceil(xs[0::2]), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil(xs[1::2]), 0, w).astype(np.int64)
    rows_in, spans = r[0::2], c1 > c0
    diff = np.zeros((h, w + 1), np.int32)
    np.add.at(diff, (rows_in[spans], c0[spans]), 1)
    np.add.at(diff, (rows_in[spans], c1[spans]), -1)
    return np.cumsum(diff, axis=1)[:, :w] > 0


def _window(
    bbox: tuple[float, float, float, float], x: float, y: float, f: float, shape: tuple[int, int]
) -> tuple[slice, slice] | None:
    """The pixels of an output window (`shape`, top-left pixel at level-0 (x, y), `f` level-0
    px per pixel) that a level-0 box (x0, y0, x1, y1) covers, with a pixel of margin; None when
    they do not meet."""
    bx0, by0, bx1, by1 = bbox
    c0, r0 = max(0, int((bx0 - x) / f) - 1), max(0, int((by0 - y) / f) - 1)
    c1 = min(shape[1], int(np.ceil((bx1 - x) / f)) + 1)
    r1 = min(shape[0], int(np.ceil((by1 - y) / f)) + 1)
    if c1 <= c0 or r1 <= r0:
        return None
    return slice(r0, r1), slice(c0, c1)


@dataclass
class _Shape:
    cls: int
    outer: np.ndarray  # (n, 2) x, y level-0
    holes: list[np.ndarray]
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1

    @cached_property
    def hole_boxes(self) -> list[tuple[float, float, float, float]]:
        """Each hole's box (x0, y0, x1, y1), found once: every window read needs them."""
        return [(*h.min(0), *h.max(0)) for h in self.holes]

    def shifted(self, dx: float, dy: float) -> _Shape:
        """The shape moved by (dx, dy) level-0 px."""
        d = np.array([dx, dy], np.float64)
        x0, y0, x1, y1 = self.bbox
        return _Shape(
            self.cls,
            self.outer + d,
            [h + d for h in self.holes],
            (x0 + dx, y0 + dy, x1 + dx, y1 + dy),
        )


def _name_map(settings: dict[str, Any]) -> dict[str, int]:
    """Annotation class name (lower case) -> class index: the classes' own names, then
    `labels.names` (and its older name `geojson_names`). The name of class 0 (unlabelled) is
    not among them: only `labels.names` erases (`_Classes.index` says why)."""
    names = {name.strip().lower(): i for i, name in enumerate(settings["classes"]) if i}
    for key in ("geojson_names", "names"):
        names.update({str(k).strip().lower(): int(v) for k, v in settings.get(key, {}).items()})
    return names


class _Classes:
    """Class indices of one annotation file's class names (`_name_map`). Names it cannot map
    are gathered, not refused at the first, so one error names them all (a QuPath project's
    Tumor, Stroma and Immune cells had taken three runs to learn of)."""

    def __init__(self, settings: dict[str, Any], path: Path, sid: str) -> None:
        self.names, self.settings, self.path, self.sid = _name_map(settings), settings, path, sid
        self.unknown: dict[str, tuple[str, list[str]]] = {}  # said -> (a name, where)

    def index(self, candidates: list[str], where: str) -> int:
        """The class index of the first of an annotation's `candidates` names that is known
        (0 for one that is not: `check` refuses the file)."""
        for name in candidates:  # matched as XML names are: case and outer spaces aside
            if name.strip().lower() in self.names:
                return self.names[name.strip().lower()]
        said = repr(candidates[0]) if len(candidates) == 1 else f"names {candidates}"
        first = self.settings["classes"][0]
        if any(name.strip().lower() == first.strip().lower() for name in candidates):
            # `classes: [TUM, STR, LYM]` had silently erased every TUM region
            spare = "unlabelled" if first.strip().lower() == "ignore" else "ignore"
            raise AnnotationError(
                self.sid,
                f"{self.path}: {where} has class {said}, labels.classes[0], which is index 0, "
                "the unlabelled class (its pixels are never trained on or scored). To leave "
                f"such regions unlabelled, map the name to 0 with labels.names ({{{first}: 0}}); "
                f"if {first} is a class to learn, list an unlabelled class first (classes: "
                f"[{spare}, {', '.join(self.settings['classes'])}])",
            )
        self.unknown.setdefault(said, (candidates[-1].strip(), []))[1].append(where)
        return 0

    def check(self) -> None:
        """Refuse the file if any of its class names is not known, naming every such name."""
        if not self.unknown:
            return
        classes = self.settings["classes"]
        if len(self.unknown) == 1:
            ((said, (_, wheres)),) = self.unknown.items()
            more = f" (and {len(wheres) - 1} more)" if len(wheres) > 1 else ""
            raise AnnotationError(
                self.sid,
                f"{self.path}: {wheres[0]}{more} has class {said}, which is not one of "
                f"labels.classes {classes}; map it with labels.names (`--names` of a stage run "
                "by hand)",
            )
        listed = ", ".join(
            f"{said} ({len(w)}, first {w[0]})" for said, (_, w) in self.unknown.items()
        )
        name = next(iter(self.unknown.values()))[0]
        raise AnnotationError(
            self.sid,
            f"{self.path} has {len(self.unknown)} class names that are not labels.classes "
            f"{classes}: {listed}. Map each to its class index with labels.names (e.g. names: "
            f"{{{name}: 1}} reads {name} as {classes[1]}; `--names` of a stage run by hand)",
        )


def _full_and_base(full: str) -> list[str]:
    """A class name, then for a derived one (`Tumor: Positive`) its base class (`Tumor`)."""
    base = full.split(":", 1)[0].strip()
    return [full, base] if ":" in full and base else [full]


def _class_names(props: dict[str, Any]) -> list[str]:
    """The names a feature's class may be known by, most specific first. QuPath writes
    `classification.name`, or for a derived class (e.g. Tumor: Positive) `classification.names`
    ["Tumor", "Positive"] (QuPath 0.4 on; earlier versions wrote it as the one name "Tumor:
    Positive"): its full name "Tumor: Positive", then its base class "Tumor". Other tools put
    the class in `properties.name` or `properties.class`."""
    info = props.get("classification")
    if isinstance(info, str) and info.strip():  # other tools write the class as its name
        return _full_and_base(info.strip())
    if isinstance(info, dict):
        if info.get("name"):
            return _full_and_base(str(info["name"]))
        names = info.get("names")
        parts = [str(p) for p in names if p] if isinstance(names, list) else []
        if parts:
            return [": ".join(parts), parts[0]] if len(parts) > 1 else parts
    name = props.get("name") or props.get("class")
    return [str(name)] if name else []


def _properties(feat: Any) -> dict[str, Any]:
    """A feature's `properties`, or {} when it has none or is no valid feature."""
    props = feat.get("properties") if isinstance(feat, dict) else None
    return props if isinstance(props, dict) else {}


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words, with a short excerpt for a message."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    kind = "null" if value is None else kinds.get(type(value), "a number")
    text = json.dumps(value)
    return kind if value is None else f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


#: How GeoJSON polygon coordinates nest, for messages about malformed ones.
_NESTING = (
    " (a Polygon's coordinates are a list of rings, the outline then its holes, each a list "
    "of [x, y] points; a MultiPolygon's are a list of such polygons)"
)


def _geojson_ring(ring: Any) -> tuple[np.ndarray | None, str]:
    """A GeoJSON ring's points as an (n, 2) array of level-0 x, y, or None and what is wrong
    with it. Points may carry a z (dropped); every x and y must be a finite number."""
    if not isinstance(ring, list):
        return None, f"is {_json_kind(ring)}, not a list of [x, y] points{_NESTING}"
    if not ring:
        return None, f"is empty{_NESTING}"
    try:
        pts = np.asarray(ring, np.float64)
    except (TypeError, ValueError):  # ragged, or not numbers: each point is checked below
        pts = None
    if pts is None or pts.ndim != 2 or pts.shape[1] < 2:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in ring):
            return None, f"is a list of numbers, not of [x, y] points{_NESTING}"
        rows: list[tuple[float, float]] = []
        for k, point in enumerate(ring):
            xy = point[:2] if isinstance(point, list) and len(point) >= 2 else None
            wrong = f"point {k} is {_json_kind(point)}, not [x, y] numbers{_NESTING}"
            if xy is None or not all(
                isinstance(v, int | float | str) and not isinstance(v, bool) for v in xy
            ):
                return None, wrong
            try:
                rows.append((float(xy[0]), float(xy[1])))
            except ValueError:
                return None, wrong
        pts = np.array(rows, np.float64)
    pts = pts[:, :2]
    finite = np.isfinite(pts).all(1)
    if not finite.all():
        k = int(np.argmin(finite))
        return None, f"point {k} is {_json_kind(ring[k])}, not finite x, y numbers"
    return pts, ""


#: QuPath 0.2 named an object's type by its class in the feature's `id`.
_LEGACY_TYPES = {
    "pathannotationobject": "annotation",
    "pathdetectionobject": "detection",
    "pathcellobject": "cell",
    "pathtileobject": "tile",
    "tmacoreobject": "tma_core",
    "pathrootobject": "root",
}


def _is_annotation(feat: Any) -> bool:
    """Whether a feature is a region label: QuPath's annotations (or a feature of another tool,
    which states no type), not its detections, cells, tiles, TMA cores or root. The type is
    `properties.objectType` (QuPath 0.4 on), `properties.object_type` (0.3) or the feature's
    `id` (0.2), as QuPath itself reads them."""
    props = _properties(feat)
    kind = props.get("objectType") or props.get("object_type")
    if kind is None and isinstance(feat, dict):
        kind = _LEGACY_TYPES.get(str(feat.get("id", "")).lower())
    return str(kind or "annotation").lower() == "annotation"


def _polygonal(geom: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (type, geometry) of a geometry's polygonal parts: itself when a Polygon or
    MultiPolygon, the polygonal members of a GeometryCollection (QuPath writes one for an
    annotation of mixed parts), none for points and lines."""
    kind = geom.get("type")
    if kind in ("Polygon", "MultiPolygon"):
        return [(str(kind), geom)]
    if kind == "GeometryCollection" and isinstance(geom.get("geometries"), list):
        return [
            part
            for member in geom["geometries"]
            if isinstance(member, dict)
            for part in _polygonal(member)
        ]
    return []


def _with_annotation_children(
    features: list[Any], skipped: list[int] | None = None
) -> Iterator[tuple[str, Any]]:
    """Each annotation feature with where it is in the file (`features[2].childObjects[0]`),
    followed by the objects nested in its `properties.childObjects` (QuPath exports the
    hierarchy this way), depth first, so a child annotation is painted over its parent.
    Detections and cells (cell outlines, tiles), nested or at the top level as QuPath's export
    of all objects lists them, are not region labels: skipped, while the annotations nested in
    them (under a TMA core or the root object) are not. `skipped` gets the count of the
    objects skipped (for the message of a file of detections alone)."""
    count = 0
    stack = [(f"features[{i}]", f) for i, f in reversed(list(enumerate(features)))]
    while stack:
        where, feat = stack.pop()
        children = _properties(feat).get("childObjects") or []
        nested = (
            [(f"{where}.childObjects[{j}]", c) for j, c in enumerate(children)]
            if isinstance(children, list)
            else []
        )
        if _is_annotation(feat):
            yield where, feat  # the caller checks it is an object with object properties
        else:
            count += 1
        stack.extend(reversed(nested))
    if count:
        log.info("%d detection or cell objects are not region labels: skipped", count)
    if skipped is not None:
        skipped.append(count)


#: How far past a slide's edge an annotation part may lie and be dropped with a warning, not
#: taken for other coordinates: px, and a share of the slide's longer side (the larger)
EDGE_MARGIN_PX = 256
EDGE_MARGIN = 0.02


def _empty(path: Path, detections: int = 0) -> str:
    """The message for an annotation file without a polygon (as ImageScope saves one), or
    with QuPath detections alone (a pixel classifier's objects created as detections)."""
    if detections:
        return (
            f"{path} holds no polygon annotations, only {detections} detection or cell "
            "objects, which dsf does not take as region labels (cells, tiles, a classifier's "
            "detections): in QuPath, convert the regions to annotations (a pixel classifier "
            "creates annotations when its objects are asked to be annotations), then export "
            "them again"
        )
    return (
        f"{path} holds no polygon annotations: draw them, or move the file away from the slide "
        "(or clear the slide's `labels` cell in a sheet) to leave the slide unannotated"
    )


class PolygonLabels(LabelSource):
    """Polygon annotations, rasterised per requested region."""

    #: What the file is called in messages.
    kind = "annotation file"
    #: Whether the file's coordinates count from the corner of the slide's bounds (QuPath's),
    #: not from the plane's corner.
    from_bounds = False

    def __init__(
        self,
        path: Path,
        slide_id: str,
        slide_dims: tuple[int, int],
        mpp0: float,
        settings: dict[str, Any],
        bounds: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.slide_id = slide_id
        self.path = path
        self._mpp0 = mpp0
        classes = _Classes(settings, path, slide_id)
        self._shapes = self._parse(path, classes)
        classes.check()
        if not self._shapes:
            raise AnnotationError(slide_id, _empty(path, sum(getattr(self, "_detections", []))))
        # checked in the file's own coordinates: QuPath's image of a slide with bounds is its
        # scanned region, so a shape off that region is misplaced even inside the plane
        sw, sh = slide_dims
        extent = f"the slide (0..{sw} x 0..{sh} level-0 px)"
        shift = None
        plane_hint = ""
        if self.from_bounds and bounds is not None:
            bx, by, sw, sh = bounds
            shift = (bx, by)
            extent = (
                f"the slide's scanned region (0..{sw} x 0..{sh} px, counted from its corner at "
                f"level-0 x {bx}, y {by}, as QuPath counts them)"
            )
            plane_hint = (
                f". A GeoJSON counted from the plane's corner (another tool's, an older dsf's "
                f"polygons) needs x {bx} and y {by} taken from its coordinates"
            )

        def within(shape: _Shape, margin: float) -> bool:
            """Whether the shape's box meets the slide grown by `margin` px on every side."""
            x0, y0, x1, y1 = shape.bbox
            return x1 > -margin and y1 > -margin and x0 < sw + margin and y0 < sh + margin

        inside = [s for s in self._shapes if within(s, 0)]
        if not inside:
            raise AnnotationError(
                slide_id,
                f"no annotation of {path} overlaps {extent}: "
                f"the {self.kind} belongs to another slide or uses other coordinates. Check the "
                "`labels` column of the sheet, and export the annotations in level-0 pixels"
                + plane_hint,
            )
        # a shape drawn just past the slide's edge (a stroke beyond the image, a piece of a
        # region) is dropped with a word; farther ones mean other coordinates (below)
        margin = max(EDGE_MARGIN_PX, EDGE_MARGIN * max(sw, sh))
        outside = [s for s in self._shapes if not within(s, 0)]
        far = [s for s in outside if not within(s, margin)]
        if len(far) < len(outside):
            log.warning(
                "%s: %d annotation part(s) lie just outside %s (within %.0f px of its edge): "
                "left out",
                path,
                len(outside) - len(far),
                extent,
                margin,
            )
        if far:
            # a scale error (um for px, a downsampled image's coordinates) leaves some in:
            # training on the rest would learn from misplaced regions without a word
            x0, y0, x1, y1 = far[0].bbox
            raise AnnotationError(
                slide_id,
                f"{len(far)} of {len(inside) + len(far)} annotations of "
                f"{path} lie wholly outside {extent}, one at "
                f"x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}: "
                f"the {self.kind} uses other coordinates (another scale, or another slide's). "
                "Export the annotations in level-0 pixels, or remove those outside" + plane_hint,
            )
        if shift is not None:
            inside = [s.shifted(*shift) for s in inside]
            log.info("%s: %s counted from the scanned region's corner (x %d, y %d)", slide_id,
                     path, *shift)  # fmt: skip
        self._shapes = inside
        self._boxes = np.array([s.bbox for s in inside], np.float64)

    def _parse(self, path: Path, classes: _Classes) -> list[_Shape]:
        """The file's polygons with their class indices, in painting order."""
        raise NotImplementedError

    @classmethod
    def check_file(cls, path: Path, slide_id: str, settings: dict[str, Any]) -> None:
        """Parse the file as opening it for a slide does, short of the slide's geometry: an
        AnnotationError for a class `labels` cannot map, a malformed or an empty file."""
        parser = cls.__new__(cls)
        parser.slide_id, parser.path = slide_id, path
        classes = _Classes(settings, path, slide_id)
        shapes = parser._parse(path, classes)
        classes.check()
        if not shapes:
            detections = sum(getattr(parser, "_detections", []))
            raise AnnotationError(slide_id, _empty(path, detections))

    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """Class indices of the region at level-0 (x, y), `width` x `height` px at `mpp`."""
        f = mpp / self._mpp0
        out = np.zeros((height, width), np.uint8)
        x1, y1 = x + width * f, y + height * f
        b = self._boxes
        hits = np.nonzero((b[:, 2] >= x) & (b[:, 0] <= x1) & (b[:, 3] >= y) & (b[:, 1] <= y1))[0]
        for k in hits:
            shape = self._shapes[k]
            # only the output window the shape's box covers is rasterised (bands of a whole
            # slide's width stay cheap however many shapes there are), and each hole only in
            # its own box (a ragged region has hundreds of holes)
            box = _window(shape.bbox, x, y, f, (height, width))
            if box is None:
                continue
            r0, c0 = box[0].start, box[1].start
            x0, y0 = x + c0 * f, y + r0 * f
            mask = self._raster(shape.outer, x0, y0, f, out[box].shape)
            for hole, hole_box in zip(shape.holes, shape.hole_boxes, strict=True):
                sub = _window(hole_box, x0, y0, f, mask.shape)
                if sub is not None:
                    hx, hy = x0 + sub[1].start * f, y0 + sub[0].start * f
                    mask[sub] &= ~self._raster(hole, hx, hy, f, mask[sub].shape)
            out[box][mask] = shape.cls
        return out

    @staticmethod
    def _raster(
        ring: np.ndarray, x: float, y: float, f: float, shape: tuple[int, int]
    ) -> np.ndarray:
        """Pixels whose centres lie inside the ring (ring in level-0 px, `shape` the output
        window whose top-left pixel starts at level-0 (x, y))."""
        return fill_ring((ring[:, 1] - y) / f - 0.5, (ring[:, 0] - x) / f - 0.5, shape)


class XMLLabels(PolygonLabels):
    """Aperio ImageScope or ASAP annotation XML (`dsf.annotation_xml`)."""

    kind = "annotation XML"

    def _parse(self, path: Path, classes: _Classes) -> list[_Shape]:
        return [
            _Shape(classes.index(p.names, p.what), p.outer, p.holes, p.bbox)
            for p in read_xml(path, self.slide_id)
        ]


class GeoJSONLabels(PolygonLabels):
    """QuPath-style GeoJSON polygons."""

    kind = "GeoJSON"
    from_bounds = True

    #: What to do about a malformed feature.
    FIX = (
        "fix or remove that feature (QuPath's File > Export objects as GeoJSON writes valid "
        "GeoJSON)"
    )

    def _parse(self, path: Path, classes: _Classes) -> list[_Shape]:
        again = "export the annotations again (QuPath: File > Export objects as GeoJSON)"
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is no error
            with open(path, encoding="utf-8-sig") as fh:
                doc = json.load(fh)
        except UnicodeDecodeError as exc:
            raise AnnotationError(
                self.slide_id, f"{path} is not text, so not GeoJSON (a binary file?); {again}"
            ) from exc
        except (OSError, ValueError) as exc:
            if path.is_file() and path.stat().st_size == 0:
                raise AnnotationError(self.slide_id, f"{path} is empty (0 bytes); {again}") from exc
            raise AnnotationError(self.slide_id, f"cannot read GeoJSON {path}: {exc}") from exc
        if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
            features = doc.get("features", [])
        elif isinstance(doc, dict) and doc.get("type") == "Feature":
            features = [doc]
        elif isinstance(doc, list):
            features = doc
        else:
            raise AnnotationError(self.slide_id, f"{path} is not a GeoJSON feature collection")
        if not isinstance(features, list):
            raise AnnotationError(
                self.slide_id,
                f"{path}: `features` is {_json_kind(features)}, not a list of features; export "
                "the annotations again (QuPath: File > Export objects as GeoJSON)",
            )
        shapes: list[_Shape] = []
        self._detections: list[int] = []
        for at, feat in _with_annotation_children(features, self._detections):
            if not isinstance(feat, dict):
                raise self._malformed(path, at, f"is {_json_kind(feat)}, not an object")
            props = feat.get("properties") or {}
            if not isinstance(props, dict):
                raise self._malformed(
                    path, at, f"has properties {_json_kind(props)}, not an object"
                )
            if not isinstance(props.get("childObjects") or [], list):
                raise self._malformed(
                    path,
                    at,
                    f"has childObjects {_json_kind(props['childObjects'])}, not a list",
                )
            geom = feat.get("geometry") or {}
            if not isinstance(geom, dict):
                wrong = f"has geometry {_json_kind(geom)}, not an object"
                raise self._malformed(path, at, wrong)
            parts = _polygonal(geom)
            if not parts:  # a point, a ruler: no area, any class
                log.warning("%s: %s is a %s, not a polygon; ignored", path, at, geom.get("type"))
                continue
            candidates = _class_names(props)
            if not candidates:
                raise AnnotationError(
                    self.slide_id,
                    f"{path}: {at} has no classification name; classify it in QuPath",
                )
            cls = classes.index(candidates, at)
            where = f"{at} (class {candidates[0]!r})"
            for kind, part in parts:
                coords = part.get("coordinates")
                if not isinstance(coords, list):
                    said = (
                        "no coordinates" if coords is None else f"coordinates {_json_kind(coords)}"
                    )
                    raise self._malformed(path, where, f"is a {kind} with {said}{_NESTING}")
                polys = [coords] if kind == "Polygon" else coords
                for pi, rings in enumerate(polys):
                    part = "" if kind == "Polygon" else f"polygon {pi} "
                    if not isinstance(rings, list):
                        wrong = f"polygon {pi} is {_json_kind(rings)}, not a list of rings"
                        raise self._malformed(path, where, wrong + _NESTING)
                    if not rings:
                        continue
                    parsed: list[np.ndarray] = []
                    for ri, ring in enumerate(rings):
                        pts, wrong = _geojson_ring(ring)
                        if pts is None:
                            raise self._malformed(path, where, f"{part}ring {ri} {wrong}")
                        parsed.append(pts)
                    outer, holes = parsed[0], parsed[1:]
                    bbox = (*outer.min(0), *outer.max(0))
                    shapes.append(_Shape(cls, outer, holes, tuple(bbox)))  # type: ignore[arg-type]
        return shapes

    def _malformed(self, path: Path, where: str, wrong: str) -> AnnotationError:
        """The error for a feature of the file that is not valid GeoJSON."""
        return AnnotationError(self.slide_id, f"{path}: {where} {wrong}; {self.FIX}")


#: Annotation file suffix -> its polygon reader (`open_labels` reads anything else as a raster).
_POLYGON_READERS: dict[str, type[PolygonLabels]] = {
    ".geojson": GeoJSONLabels,
    ".json": GeoJSONLabels,
    ".xml": XMLLabels,
}
#: Suffixes of annotations whose coordinates count from the corner of the slide's bounds.
GEOJSON_SUFFIXES = frozenset(k for k, v in _POLYGON_READERS.items() if v.from_bounds)
#: Seconds `check_annotations` spends before leaving the other files to their jobs.
CHECK_BUDGET_S = 10.0


def check_annotations(
    files: dict[str, str], settings: dict[str, Any], budget_s: float = CHECK_BUDGET_S
) -> None:
    """Parse the sheet's polygon annotations (GeoJSON, XML) before any job runs: a class name
    that `labels.classes`/`labels.names` cannot map, or a malformed or empty file, stops the
    run at once naming every such slide, instead of failing one tile-labels job per slide
    after the tissue and patches jobs ran. Raster masks need their pixels and are left to
    their jobs, as is what `budget_s` leaves unchecked."""
    check_label_settings(settings)
    start = time.monotonic()
    problems: list[str] = []
    unchecked = 0
    for sid, name in files.items():
        path = Path(name)
        kind = _POLYGON_READERS.get(path.suffix.lower())
        if kind is None:
            continue
        if time.monotonic() - start > budget_s:
            unchecked += 1
            continue
        if not path.is_file():  # a workflow output (synthetic), or Snakemake names it missing
            continue
        try:
            kind.check_file(path, sid, settings)
        except AnnotationError as exc:
            problems.append(str(exc))
    if unchecked:
        log.info(
            "%d annotation files are checked by their own jobs (over %.0f s)", unchecked, budget_s
        )
    if problems:
        raise found_at_start(
            problems, "annotations", "or the `labels` column, labels.classes or labels.names"
        )


def add_annotation_argument(parser: Any) -> None:
    """`--labels FILE` of a stage that reads a slide's annotation (also `--annotation`, the
    name `dsf labels` gives it)."""
    parser.add_argument(
        "--labels",
        "--annotation",
        dest="labels",
        required=True,
        type=Path,
        help="annotation: raster mask, GeoJSON or XML",
    )


def open_labels(
    path: str | Path,
    slide_id: str,
    slide_dims: tuple[int, int],
    mpp0: float,
    settings: dict[str, Any],
    bounds: tuple[int, int, int, int] | None = None,
) -> LabelSource:
    """Open an annotation for a slide: `.geojson`/`.json` or `.xml` polygons, or a raster
    mask. GeoJSON coordinates count from the corner of the slide's scanned region `bounds`
    (x, y, width, height: `Slide.bounds`), as QuPath writes them, and must lie on it; XML and
    masks count from the plane's corner."""
    path = Path(path)
    check_label_settings(settings)
    if not path.is_file():
        raise AnnotationError(
            slide_id, f"annotation {path} not found; fix the `labels` column of the sheet"
        )
    reader = _POLYGON_READERS.get(path.suffix.lower())
    if reader is not None:
        return reader(path, slide_id, slide_dims, mpp0, settings, bounds)
    return RasterLabels(path, slide_id, slide_dims, mpp0, settings)


def class_fractions(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Fraction of pixels per class index (length n_classes) of a label tile."""
    # one comparison per class: bincount would first widen the uint8 tile to int64 (5x slower
    # on a 1024 px tile)
    counts = np.array([np.count_nonzero(labels == c) for c in range(n_classes)], np.float64)
    return (counts / max(1, labels.size)).astype(np.float32)
