"""Slides whose scanned region does not start at the plane's corner (OpenSlide's bounds: Leica
SCN here, MIRAX alike): dsf reads the whole plane, QuPath shows the region cropped, so QuPath's
GeoJSON coordinates count from the region's corner, in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from scn_slide import write_scn
from test_polygons import CLASSES, _write_map

from dsf.annotations import open_labels
from dsf.config import defaults
from dsf.polygons import main as polygons_main
from dsf.slide import open_slide
from dsf.tile_labels import _bounds_origin

MPP = 0.5
ORIGIN = (256, 128)  # level-0 px of the scanned region in the plane
PLANE = (1280, 1024)
REGION = (768, 512)  # its width, height


@pytest.fixture(scope="module")
def scn(tmp_path_factory: pytest.TempPathFactory, real: Path) -> Path:
    """A Leica SCN slide: a piece of CMU-1 at ORIGIN in a PLANE of glass OpenSlide reports
    whole."""
    with open_slide(real / "CMU-1-Small-Region.svs") as src:
        rgb = src.read(400, 800, REGION[0], REGION[1], src.mpp)
    path = tmp_path_factory.mktemp("bounds") / "leica 1.scn"
    write_scn(path, rgb, MPP, ORIGIN, PLANE, levels=2)
    np.save(path.with_suffix(".npy"), rgb)
    return path


def _settings() -> dict:
    return defaults("labels") | {"classes": CLASSES}


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_a_leica_slide_is_read_whole_and_says_where_its_region_starts(scn: Path) -> None:
    s = open_slide(scn)
    assert s.properties["openslide.vendor"] == "leica"
    assert s.dimensions == PLANE and s.bounds_origin == ORIGIN
    rgb = np.load(scn.with_suffix(".npy"))
    np.testing.assert_array_equal(s.read(*ORIGIN, *REGION, MPP), rgb)
    assert (s.read(0, 0, 200, 100, MPP) == 255).all()  # glass outside the region: background


def test_qupath_geojson_paints_where_it_was_drawn_and_xml_counts_from_the_plane(
    scn: Path, tmp_path: Path
) -> None:
    """A rectangle at x 10..110, y 20..80 in QuPath (the region cropped) lies at the region's
    corner plus that in the plane dsf reads; the same numbers in ImageScope XML are the
    plane's."""
    s = open_slide(scn)
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_rect(10, 20, 110, 80)]},
        "properties": {"objectType": "annotation", "classification": {"name": "TUM"}},
    }
    gj = tmp_path / "a.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    labels = open_labels(gj, s.slide_id, s.dimensions, s.mpp, _settings(), s.bounds_origin)
    painted = labels.read(0, 0, *PLANE, MPP)
    rows, cols = np.nonzero(painted)
    ox, oy = ORIGIN
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (ox + 10, ox + 109, oy + 20, oy + 79)
    assert set(np.unique(painted)) == {0, 1}
    xml = tmp_path / "a.xml"
    xml.write_text(
        '<Annotations><Annotation Id="1" Name="TUM"><Regions><Region Id="1" Type="1"><Vertices>'
        '<Vertex X="10" Y="20"/><Vertex X="110" Y="20"/><Vertex X="110" Y="80"/>'
        '<Vertex X="10" Y="80"/></Vertices></Region></Regions></Annotation></Annotations>'
    )
    by_xml = open_labels(xml, s.slide_id, s.dimensions, s.mpp, _settings(), s.bounds_origin)
    rows, cols = np.nonzero(by_xml.read(0, 0, *PLANE, MPP))
    assert (cols.min(), rows.min()) == (10, 20)
    # without the origin (a slide without bounds) the GeoJSON is the plane's too
    plain = open_labels(gj, s.slide_id, s.dimensions, s.mpp, _settings())
    assert np.array_equal(plain.read(0, 0, *PLANE, MPP), by_xml.read(0, 0, *PLANE, MPP))


def test_a_qupath_drawing_off_the_region_names_where_it_was_counted_from(
    scn: Path, tmp_path: Path
) -> None:
    """Plane coordinates given as GeoJSON (another tool's export) land past the slide: the
    refusal says the coordinates were counted from the region's corner."""
    s = open_slide(scn)
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_rect(1100, 950, 1200, 1000)]},
        "properties": {"classification": {"name": "TUM"}},
    }
    gj = tmp_path / "far.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(Exception, match="counted from the slide's scanned region at x 256, y 128"):
        open_labels(gj, s.slide_id, s.dimensions, s.mpp, _settings(), s.bounds_origin)


def test_prediction_polygons_count_from_the_region_and_read_back_as_the_map(
    scn: Path, tmp_path: Path
) -> None:
    """`dsf polygons` on a map of the Leica slide: the GeoJSON counts from the region's corner
    (QuPath shows it on the slide there), the ImageScope XML from the plane's; each read back
    as an annotation gives the map pixel for pixel."""
    f = 4  # slide px per map px (2 um/px)
    truth = np.zeros((PLANE[1] // f, PLANE[0] // f), np.uint8)
    ox, oy = ORIGIN[0] // f, ORIGIN[1] // f
    truth[oy + 10 : oy + 60, ox + 20 : ox + 90] = 1
    truth[oy + 30 : oy + 40, ox + 100 : ox + 150] = 3
    cmap = _write_map(tmp_path / "m.tiff", truth, slide="leica_1")
    out = tmp_path / "m.geojson"
    args = ["--map", str(cmap), "--slide", str(scn), "--slide-id", "leica_1", "--out", str(out)]
    tight = ["--mpp", "2", "--min-um2", "0", "--tolerance", "0", "--imagescope"]
    assert polygons_main([*args, *tight]) == 0
    doc = json.loads(out.read_text())
    xy = np.concatenate(
        [np.asarray(r) for ft in doc["features"] for r in ft["geometry"]["coordinates"]]
    )
    assert xy[:, 0].min() == 20 * f and xy[:, 1].min() == 10 * f  # from the region's corner
    s = open_slide(scn)
    for path in (out, out.with_suffix(".xml")):
        back = open_labels(path, "leica_1", s.dimensions, s.mpp, _settings(), s.bounds_origin)
        assert np.array_equal(back.read(0, 0, *truth.shape[::-1], 2.0), truth), path


def test_tile_labels_take_the_origin_from_the_store_or_else_from_its_slide(
    scn: Path, tmp_path: Path
) -> None:
    """A patch store records the origin; one cut by an earlier dsf records none, and its slide
    is asked (for GeoJSON only); a store whose slide is gone cannot say, and is refused."""
    store = tmp_path / "s.zarr"
    gj, xml = tmp_path / "a.geojson", tmp_path / "a.xml"
    assert _bounds_origin(store, {"bounds_origin": [7, 9]}, gj) == (7, 9)
    earlier = {"source": str(scn), "slide_id": "leica_1"}
    assert _bounds_origin(store, earlier, gj) == ORIGIN
    assert _bounds_origin(store, earlier, xml) == (0, 0)
    gone = {"source": str(tmp_path / "moved.scn"), "slide_id": "leica_1"}
    with pytest.raises(Exception, match="rerun its patches job"):
        _bounds_origin(store, gone, gj)


def test_a_store_of_a_leica_slide_takes_qupath_labels_where_they_were_drawn(
    scn: Path, tmp_path: Path
) -> None:
    """The patch store records the region's corner, and `dsf tile-labels` paints a QuPath
    rectangle over the tiles under it, not over those at its numbers in the plane."""
    from dsf.patches import extract
    from dsf.tile_labels import main as tile_labels_main
    from dsf.tissue import detect_tissue

    s = open_slide(scn)
    mask, _ = detect_tissue(s.thumbnail(8.0), 8.0, defaults("tissue") | {"min_object_um2": 0})
    store = tmp_path / "leica_1.zarr"
    st = defaults("patches") | {"target_mpp": MPP, "scale": 2, "block": 32, "stride": 64}
    assert extract(s, mask, 8.0, store, st, progress=False) > 0
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert list(attrs["bounds_origin"]) == list(ORIGIN)
    gj = tmp_path / "leica_1.geojson"
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_rect(0, 0, 256, 256)]},
        "properties": {"classification": {"name": "TUM"}},
    }
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    out = tmp_path / "leica_1.labels.zarr"
    classes = ["--classes", *CLASSES]
    assert tile_labels_main(["--store", str(store), "--labels", str(gj), "--out", str(out),
                             "--no-progress", *classes]) == 0  # fmt: skip
    lab = zarr.open_group(str(out), mode="r")
    coords = zarr.open_group(str(store), mode="r")["coords"][:][lab["index"][:]]
    # every labelled tile lies within the region's first 256 x 256 px
    x, y = coords[:, 0], coords[:, 1]
    assert len(coords) and (x >= ORIGIN[0]).all() and (y >= ORIGIN[1]).all()
    assert (x < ORIGIN[0] + 256).all() and (y < ORIGIN[1] + 256).all()
