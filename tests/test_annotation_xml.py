"""Aperio ImageScope and ASAP annotation XML as label sources (`dsf.annotation_xml`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from dsf.annotation_xml import ELLIPSE_VERTICES, is_annotation_xml, read_xml
from dsf.annotations import open_labels
from dsf.config import defaults
from dsf.errors import AnnotationError

from conftest import aperio_xml

DIMS = (400, 300)  # slide width, height (level-0 px)
MPP = 0.5


def _settings(**names: int) -> dict:
    return defaults("labels") | {"classes": ["ignore", "TUM", "STR", "NORM"], "names": names}


def _read(path: Path, **names: int) -> np.ndarray:
    src = open_labels(path, "s", DIMS, MPP, _settings(**names))
    return src.read(0, 0, DIMS[0], DIMS[1], MPP)


def _vertices(*xy: tuple[float, float]) -> str:
    return "<Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in xy) + "</Vertices>"


def _region(rid: int, kind: str, *xy: tuple[float, float], negative: bool = False, text: str = "",
            geoshape: str = "") -> str:  # fmt: skip
    shape = f' GeoShape="{geoshape}"' if geoshape else ""
    return (
        f'<Region Id="{rid}" Type="{kind}"{shape} Text="{text}" NegativeROA="{int(negative)}">'
        f"<Attributes/>{_vertices(*xy)}</Region>"
    )


def _layer(lid: int, name: str, *regions: str, description: str = "") -> str:
    return (
        f'<Annotation Id="{lid}" Name="{name}" LineColor="255"><Attributes>'
        f'<Attribute Name="Description" Id="0" Value="{description}"/></Attributes>'
        f"<Regions>{''.join(regions)}</Regions><Plots/></Annotation>"
    )


def _aperio(tmp_path: Path, *layers: str) -> Path:
    path = tmp_path / "s.xml"
    path.write_text(f'<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.5">{"".join(layers)}'
                    "</Annotations>")  # fmt: skip
    return path


def _square(x: float, y: float, size: float) -> tuple[tuple[float, float], ...]:
    return ((x, y), (x + size, y), (x + size, y + size), (x, y + size))


def test_aperio_layers_regions_negative_regions_and_shapes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ImageScope's layers are classes (by name, description, or `layer <Id>`); a negative region
    cuts its layer's regions; rectangles (4 corners or 2), ellipses and GeoShape are areas;
    rulers are not; a later layer is painted over an earlier one; region text names a class."""
    tumour = _layer(
        1,
        "Tumor",
        _region(1, "0", *_square(10, 10, 100)),
        _region(2, "1", *_square(40, 40, 30), negative=True),
        _region(3, "4", (0, 0), (300, 300)),  # a ruler: no area
        _region(4, "1", (200, 10), (260, 50)),  # a rectangle by two corners
        _region(5, "0", *_square(300, 200, 40), text="norm"),
    )
    stroma = _layer(
        2, "", _region(1, "2", (100, 100), (180, 140)), description="stroma"
    )  # an ellipse, class from the layer's description
    unnamed = _layer(3, "", _region(1, "99", *_square(200, 100, 60), geoshape="Rectangle"))
    path = _aperio(tmp_path, tumour, stroma, unnamed)
    assert is_annotation_xml(path)
    with caplog.at_level(logging.WARNING):
        lab = _read(path, tumor=1, stroma=2, norm=3, **{"layer 3": 2})
    assert "type 4" in caplog.text  # the ruler is named as skipped
    assert lab[20, 20] == 1 and lab[105, 105] == 1  # tumour polygon (row, col)
    assert lab[55, 55] == 0  # cut by the negative region
    assert lab[30, 230] == 1 and lab[55, 230] == 0  # rectangle from two corners
    assert lab[120, 140] == 2 and lab[138, 178] == 0  # ellipse centre in, box corner out
    assert lab[108, 108] == 2  # the later stroma layer over the tumour region
    assert lab[130, 230] == 2  # GeoShape wins over an unknown Type code
    assert lab[220, 320] == 3  # region text "norm" over its layer's name
    assert lab[5, 5] == 0 and lab[290, 390] == 0
    # the ellipse is filled as a fine polygon: its area is within 1% of pi * a * b
    ellipse = read_xml(path, "s")[3]
    assert len(ellipse.outer) == ELLIPSE_VERTICES
    x, y = ellipse.outer.T
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    assert area == pytest.approx(np.pi * 40 * 20, rel=0.01)


def test_aperio_unknown_layer_names_every_name_it_tried(tmp_path: Path) -> None:
    path = _aperio(tmp_path, _layer(7, "", _region(1, "0", *_square(10, 10, 50))))
    match = "region 1 of layer 7 has class 'layer 7'.*labels.names"
    with pytest.raises(AnnotationError, match=match):
        _read(path)
    assert (_read(path, **{"LAYER 7": 1})[30, 30]) == 1  # names match case-insensitively


def _asap(tmp_path: Path, annotations: str, groups: str) -> Path:
    path = tmp_path / "camelyon.xml"
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        f"{annotations}</Annotations><AnnotationGroups>{groups}</AnnotationGroups>"
        "</ASAP_Annotations>"
    )
    return path


def _asap_annotation(name: str, kind: str, group: str, *xy: tuple[str | float, str | float],
                     order: list[int] | None = None) -> str:  # fmt: skip
    order = order or list(range(len(xy)))
    pairs = zip(order, xy, strict=True)
    coords = "".join(f'<Coordinate Order="{o}" X="{x}" Y="{y}"/>' for o, (x, y) in pairs)
    return (
        f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
        f"<Coordinates>{coords}</Coordinates></Annotation>"
    )


def _group(name: str, parent: str = "None") -> str:
    return f'<Group Name="{name}" PartOfGroup="{parent}" Color="#ff0000"><Attributes/></Group>'


def test_asap_groups_are_classes_painted_in_their_listed_order(tmp_path: Path) -> None:
    """CAMELYON16: the exclusion group _2 is listed after the tumour groups and erases them,
    though its annotation comes first in the file; coordinates come by their Order, a decimal
    comma is read; a spline is filled by its control polygon; dots are skipped."""
    exclusion = _asap_annotation("Annotation 1", "Polygon", "_2", *_square(40, 40, 20))
    tumour = _asap_annotation(
        "Annotation 0", "Spline", "_0", ("110,5", 10), ("10", "10"), (110, 110), (10, 110),
        order=[1, 0, 2, 3],
    )  # fmt: skip
    dot = _asap_annotation("Annotation 2", "Dot", "_1", (5, 5))
    nested = _asap_annotation("Annotation 3", "Rectangle", "metastases", *_square(200, 50, 40))
    groups = _group("_0") + _group("_1") + _group("_2") + _group("metastases", "Tumor")
    groups += _group("Tumor")
    path = _asap(tmp_path, exclusion + tumour + dot + nested, groups)
    assert is_annotation_xml(path)
    lab = _read(path, _0=1, _1=1, _2=0, tumor=1)
    assert lab[20, 20] == 1 and lab[100, 105] == 1  # the spline, corner x 110.5 read
    assert lab[50, 50] == 0  # erased by _2, painted after _0
    assert lab[5, 5] == 0  # the dot is no area
    assert lab[70, 220] == 1  # group metastases has no class: its parent group Tumor does
    polys = read_xml(path, "s")
    assert [p.names for p in polys] == [["_0"], ["_2"], ["metastases", "Tumor"]]


def test_asap_annotation_without_group_is_an_error(tmp_path: Path) -> None:
    path = _asap(tmp_path, _asap_annotation("Annotation 5", "Polygon", "None",
                                            *_square(10, 10, 30)), "")  # fmt: skip
    with pytest.raises(AnnotationError, match="Annotation 5 belongs to no group"):
        _read(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<Slide><Scanner/></Slide>", r"root <Slide>, neither Aperio.*nor ASAP"),
        ("<Annotations><Annotation", "cannot read annotation XML"),
        (
            '<Annotations><Annotation Id="1" Name="TUM"><Regions><Region Id="3" Type="0">'
            + _vertices((1, 1), ("x", 5), (9, 9))
            + "</Region></Regions></Annotation></Annotations>",
            r"region 3 of layer 1 has coordinate 'x', not a number",
        ),
        ('<Annotations><Annotation Id="1" Name="TUM"/></Annotations>', "holds no polygon"),
    ],
)
def test_bad_xml_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=f"'s'.*{message}"):
        _read(path)


def test_aperio_xml_labels_equal_the_same_polygons_as_geojson(tmp_path: Path) -> None:
    """One annotation, two formats, one raster: an Aperio layer with a negative region is the
    GeoJSON polygon with a hole."""
    import json

    outer = [[20, 20], [180, 30], [170, 160], [30, 150], [20, 20]]
    hole = [[60, 60], [120, 70], [90, 120], [60, 60]]
    other = [[150, 100], [300, 110], [260, 250], [150, 100]]
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"classification": {"name": name}},
        }
        for name, rings in (("TUM", [outer, hole]), ("STR", [other]))
    ]
    geo = tmp_path / "s.geojson"
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    xml = tmp_path / "s.xml"
    xml.write_text(aperio_xml([("TUM", [outer, hole]), ("STR", [other])]))
    for mpp in (MPP, 1.3, 4.0):
        a = open_labels(geo, "s", DIMS, MPP, _settings()).read(7, 3, 150, 120, mpp)
        b = open_labels(xml, "s", DIMS, MPP, _settings()).read(7, 3, 150, 120, mpp)
        np.testing.assert_array_equal(a, b)
        assert set(np.unique(a)) == {0, 1, 2}


def test_the_older_key_geojson_names_is_still_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _aperio(tmp_path, _layer(1, "tumour", _region(1, "0", *_square(10, 10, 50))))
    settings = _settings() | {"geojson_names": {"tumour": 1}}
    with caplog.at_level(logging.WARNING):
        lab = open_labels(path, "s", DIMS, MPP, settings).read(0, 0, 100, 100, MPP)
    assert lab[30, 30] == 1
    assert "labels.geojson_names is the older name of labels.names" in caplog.text


def test_scanline_fill_matches_a_point_in_polygon_test() -> None:
    """`fill_ring` (a scanline fill, fast for outlines of thousands of vertices) marks exactly
    the pixel centres skimage's point-in-polygon test does, self-intersecting rings and rings
    reaching past the array included."""
    from skimage.draw import polygon

    from dsf.annotations import fill_ring

    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(3, 40))
        h, w = (int(v) for v in rng.integers(5, 80, 2))
        rows, cols = rng.uniform(-10, h + 10, k), rng.uniform(-10, w + 10, k)
        want = np.zeros((h, w), bool)
        want[polygon(rows, cols, (h, w))] = True
        np.testing.assert_array_equal(fill_ring(rows, cols, (h, w)), want)


def test_a_region_with_many_holes_reads_the_same_in_any_window(tmp_path: Path) -> None:
    """Each hole is rasterised only in its own box: windows at any offset and scale, cutting
    through holes or missing them, equal the even-odd reference (outer ring minus every hole,
    each filled over the whole window)."""
    import json

    from skimage.draw import polygon

    outer = [[5.0, 5.0], [395.0, 8.0], [390.0, 295.0], [8.0, 290.0]]
    holes = [
        [[x, y], [x + 9.5, y + 1.0], [x + 7.0, y + 8.5], [x + 0.5, y + 6.0]]
        for x in range(20, 370, 23)
        for y in range(20, 270, 19)
    ]
    geo = tmp_path / "s.geojson"
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [outer, *holes]},
        "properties": {"objectType": "annotation", "classification": {"name": "TUM"}},
    }
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    src = open_labels(geo, "s", DIMS, MPP, _settings())
    rng = np.random.default_rng(1)
    for _ in range(25):
        f = float(rng.choice([0.5, 1.0, 2.5]))  # level-0 px per output pixel
        x, y = (float(v) for v in rng.uniform(-20, 300, 2))
        w, h = (int(v) for v in rng.integers(10, 120, 2))
        want = np.zeros((h, w), bool)
        for k, ring in enumerate([outer, *holes]):
            xy = np.asarray(ring)
            inside = np.zeros((h, w), bool)
            inside[polygon((xy[:, 1] - y) / f - 0.5, (xy[:, 0] - x) / f - 0.5, (h, w))] = True
            want = want | inside if k == 0 else want & ~inside
        got = src.read(x, y, w, h, MPP * f)
        np.testing.assert_array_equal(got == 1, want)
        assert set(np.unique(got)) <= {0, 1}


def test_halo_xml_is_read_as_imagescopes_layout(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Indica Labs HALO writes ImageScope's layout with named types and `<V X Y>` corners: it
    had been 'no polygon annotations', its polygons listed as skipped regions."""

    def region(kind: str, *xy: tuple[float, float], negative: bool = False) -> str:
        corners = "".join(f'<V X="{x}" Y="{y}"/>' for x, y in xy)
        return (f'<Region Type="{kind}" HasEndcaps="0" NegativeROA="{int(negative)}">'
                f"<Vertices>{corners}</Vertices></Region>")  # fmt: skip

    tumour = (
        '<Annotation LineColor="65280" Name="Tumor" Visible="True"><Regions>'
        + region("Polygon", *_square(10, 10, 100))
        + region("Polygon", *_square(40, 40, 30), negative=True)
        + region("Rectangle", *_square(200, 10, 50))
        + region("Ruler", (0, 0), (300, 300))
        + "</Regions></Annotation>"
    )
    stroma = (
        '<Annotation LineColor="255" Name="Stroma" Visible="True"><Regions>'
        + region("Ellipse", (100, 150), (180, 190))
        + "</Regions></Annotation>"
    )
    path = tmp_path / "s.xml"
    path.write_text(f'<?xml version="1.0"?>\n<Annotations>{tumour}{stroma}</Annotations>')
    with caplog.at_level(logging.WARNING):
        lab = _read(path, tumor=1, stroma=2)
    assert "type ruler" in caplog.text  # named as skipped
    assert lab[20, 20] == 1 and lab[105, 105] == 1 and lab[55, 55] == 0  # a hole cut
    assert lab[30, 220] == 1 and lab[5, 205] == 0  # the rectangle
    assert lab[170, 140] == 2 and lab[152, 102] == 0  # ellipse centre in, box corner out
    assert (lab == 1).sum() == 100 * 100 - 30 * 30 + 50 * 50
