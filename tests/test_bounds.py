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
from dsf.errors import AnnotationError, ConfigError
from dsf.polygons import main as polygons_main
from dsf.slide import open_slide
from dsf.tile_labels import _bounds

MPP = 0.5
ORIGIN = (256, 128)  # level-0 px of the scanned region in the plane
PLANE = (1280, 1024)
REGION = (768, 512)  # its width, height
BOUNDS = (*ORIGIN, *REGION)


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
    assert s.dimensions == PLANE and s.bounds == BOUNDS
    rgb = np.load(scn.with_suffix(".npy"))
    np.testing.assert_array_equal(s.read(*ORIGIN, *REGION, MPP), rgb)
    assert (s.read(0, 0, 200, 100, MPP) == 255).all()  # glass outside the region: background


def test_qupath_geojson_paints_where_it_was_drawn_and_xml_counts_from_the_plane(
    scn: Path, tmp_path: Path
) -> None:
    """A rectangle at x 10..110, y 20..80 in QuPath (the region cropped), with a hole at
    x 40..60, y 30..50, lies at the region's corner plus that in the plane dsf reads, hole and
    all; the same numbers in ImageScope XML are the plane's."""
    s = open_slide(scn)
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon",
                     "coordinates": [_rect(10, 20, 110, 80), _rect(40, 30, 60, 50)]},
        "properties": {"objectType": "annotation", "classification": {"name": "TUM"}},
    }  # fmt: skip
    gj = tmp_path / "a.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    labels = open_labels(gj, s.slide_id, s.dimensions, s.mpp, _settings(), s.bounds)
    painted = labels.read(0, 0, *PLANE, MPP)
    rows, cols = np.nonzero(painted)
    ox, oy = ORIGIN
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (ox + 10, ox + 109, oy + 20, oy + 79)
    assert set(np.unique(painted)) == {0, 1}
    hole = painted[oy + 30 : oy + 50, ox + 40 : ox + 60]
    assert not hole.any() and painted[oy + 29, ox + 40] and painted[oy + 50, ox + 39]
    xml = tmp_path / "a.xml"
    xml.write_text(
        '<Annotations><Annotation Id="1" Name="TUM"><Regions><Region Id="1" Type="1"><Vertices>'
        '<Vertex X="10" Y="20"/><Vertex X="110" Y="20"/><Vertex X="110" Y="80"/>'
        '<Vertex X="10" Y="80"/></Vertices></Region></Regions></Annotation></Annotations>'
    )
    by_xml = open_labels(xml, s.slide_id, s.dimensions, s.mpp, _settings(), s.bounds)
    rows, cols = np.nonzero(by_xml.read(0, 0, *PLANE, MPP))
    assert (cols.min(), rows.min()) == (10, 20)
    # without bounds (a slide that states none) the GeoJSON is the plane's too
    plain = open_labels(gj, s.slide_id, s.dimensions, s.mpp, _settings())
    at_plane = np.roll(painted, (-oy, -ox), axis=(0, 1))  # the same drawing, moved back
    assert np.array_equal(plain.read(0, 0, *PLANE, MPP), at_plane)


def test_geojson_off_the_scanned_region_is_refused_in_the_files_own_numbers(
    scn: Path, tmp_path: Path
) -> None:
    """Plane coordinates given as GeoJSON (another tool's export, an older dsf's polygons) land
    off the region QuPath shows, even where they stay inside the plane: refused, saying where
    the coordinates count from, with the file's own numbers."""
    s = open_slide(scn)
    inside = {
        "type": "Feature",
        "properties": {"classification": {"name": "TUM"}},
        "geometry": {"type": "Polygon", "coordinates": [_rect(300, 200, 400, 300)]},
    }
    off = {"type": "Feature", "properties": {"classification": {"name": "TUM"}},
           "geometry": {"type": "Polygon", "coordinates": [_rect(100, 800, 200, 880)]}}  # fmt: skip
    gj = tmp_path / "far.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [inside, off]}))
    # in the plane (1280 x 1024) the second lies at x 356..456, y 928..1008: inside it
    with pytest.raises(AnnotationError) as err:
        open_labels(gj, s.slide_id, s.dimensions, s.mpp, _settings(), s.bounds)
    said = str(err.value)
    assert (
        "scanned region (0..768 x 0..512 px, counted from its corner at level-0 x 256, y 128"
        in said
    )
    assert "one at x 100..200, y 800..880" in said
    assert "needs x 256 and y 128 taken from its coordinates" in said


def test_prediction_polygons_count_from_the_region_and_read_back_as_the_map(
    scn: Path, tmp_path: Path
) -> None:
    """`dsf polygons` on a map of the Leica slide: the GeoJSON counts from the region's corner
    and stays on it (QuPath shows it on the slide there), the ImageScope XML counts from the
    plane's; each read back as an annotation gives the map pixel for pixel."""
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
    rings = [np.asarray(r) for ft in doc["features"] for r in ft["geometry"]["coordinates"]]
    xy = np.concatenate(rings)
    assert xy[:, 0].min() == 20 * f and xy[:, 1].min() == 10 * f  # from the region's corner
    s = open_slide(scn)
    for path in (out, out.with_suffix(".xml")):
        back = open_labels(path, "leica_1", s.dimensions, s.mpp, _settings(), s.bounds)
        assert np.array_equal(back.read(0, 0, *truth.shape[::-1], 2.0), truth), path
    # a map with classes off the region (infer.mask_output: false): the GeoJSON stays on it
    everywhere = _write_map(tmp_path / "all.tiff", np.ones_like(truth), slide="leica_1")
    args[1], args[-1] = str(everywhere), str(tmp_path / "all.geojson")
    assert polygons_main([*args, "--mpp", "2", "--min-um2", "0", "--tolerance", "0"]) == 0
    (feat,) = json.loads((tmp_path / "all.geojson").read_text())["features"]
    xy = np.asarray(feat["geometry"]["coordinates"][0])
    assert (xy.min(0) == 0).all() and (xy.max(0) == REGION).all()


def _folded(ring: np.ndarray, axis: int, value: float) -> float:
    """How far `ring`'s edges on the line `axis` = `value` run over each other: 0 for a
    simple polygon's outline, more where a clamp folded an outline onto the line."""
    spans = [
        sorted((a[1 - axis], b[1 - axis]))
        for a, b in zip(ring[:-1], ring[1:], strict=True)
        if a[axis] == b[axis] == value
    ]
    covered = np.zeros(int(max((hi for _, hi in spans), default=0)) + 1, bool)
    for lo, hi in spans:
        covered[int(lo) : int(hi)] = True
    return sum(hi - lo for lo, hi in spans) - covered.sum()


def test_a_region_across_the_scanned_regions_edge_is_cut_there_not_folded_onto_it(
    scn: Path, tmp_path: Path
) -> None:
    """A predicted region reaching off the scanned region (a map of the whole plane,
    infer.mask_output false) ends on its edge as a simple outline: the part off it traced
    as background, not its vertices clamped onto the edge (where an outline turning back
    runs over itself, a polygon QuPath reports as invalid). Read back, the map on the
    region."""
    f = 4
    truth = np.zeros((PLANE[1] // f, PLANE[0] // f), np.uint8)
    ox, oy = ORIGIN[0] // f, ORIGIN[1] // f
    truth[oy + 10 : oy + 60, ox : ox + 40] = 1  # on the region, from its left edge
    truth[oy + 15 : oy + 40, ox - 12 : ox] = 1  # off it: a cup open upwards
    truth[oy + 15 : oy + 32, ox - 9 : ox - 3] = 0
    truth[oy - 8 : oy + 5, ox + 50 : ox + 60] = 1  # across its top edge
    cmap = _write_map(tmp_path / "m.tiff", truth, slide="leica_1")
    out = tmp_path / "m.geojson"
    args = ["--map", str(cmap), "--slide", str(scn), "--slide-id", "leica_1", "--out", str(out)]
    assert polygons_main([*args, "--mpp", "2", "--min-um2", "0", "--tolerance", "0"]) == 0
    rings = [
        np.asarray(r)
        for ft in json.loads(out.read_text())["features"]
        for r in ft["geometry"]["coordinates"]
    ]
    assert len(rings) == 2
    for ring in rings:
        assert _folded(ring, 0, 0) == 0 and _folded(ring, 1, 0) == 0
        assert len(np.unique(ring[:-1], axis=0)) == len(ring) - 1  # no vertex twice
    s = open_slide(scn)
    back = open_labels(out, "leica_1", s.dimensions, s.mpp, _settings(), s.bounds)
    on = np.zeros_like(truth)
    on[oy : oy + REGION[1] // f, ox : ox + REGION[0] // f] = 1
    assert np.array_equal(back.read(0, 0, *truth.shape[::-1], 2.0), truth * on)
    # the defaults: traced on the map's level 1, whose pixels straddle the region's edges
    assert polygons_main([*args, "--min-um2", "0"]) == 0
    for ft in json.loads(out.read_text())["features"]:
        for ring in map(np.asarray, ft["geometry"]["coordinates"]):
            assert (ring >= 0).all() and (ring <= REGION).all()
            assert _folded(ring, 0, 0) == 0 and _folded(ring, 1, 0) == 0
    back = open_labels(out, "leica_1", s.dimensions, s.mpp, _settings(), s.bounds)
    assert (back.read(0, 0, *truth.shape[::-1], 2.0) == truth * on).mean() > 0.99


def test_tile_labels_take_the_bounds_from_the_store_or_else_from_its_slide(
    scn: Path, tmp_path: Path
) -> None:
    """A patch store records the bounds (None: the slide states none); one cut by an earlier
    dsf records nothing, and its slide is asked (for GeoJSON only). Where that slide is gone
    (moved, its results kept), a format without bounds needs none; a Leica or MIRAX one cannot
    say, and is refused."""
    store = tmp_path / "s.zarr"
    gj, xml = tmp_path / "a.geojson", tmp_path / "a.xml"
    assert _bounds(store, {"bounds": [7, 9, 10, 12]}, gj) == (7, 9, 10, 12)
    assert _bounds(store, {"bounds": None, "source": str(scn)}, gj) is None
    earlier = {"source": str(scn), "slide_id": "leica_1"}
    assert _bounds(store, earlier, gj) == BOUNDS
    assert _bounds(store, earlier, xml) is None
    moved_svs = {"source": str(tmp_path / "moved.svs"), "slide_id": "s"}
    assert _bounds(store, moved_svs, gj) is None
    gone = {"source": str(tmp_path / "moved.scn"), "slide_id": "leica_1"}
    with pytest.raises(ConfigError, match="put the slide back there"):
        _bounds(store, gone, gj)


def test_painted_label_masks_of_a_leica_slide_take_qupath_labels_where_drawn(
    scn: Path, tmp_path: Path
) -> None:
    """`dsf labels` (the label masks the evaluation scores against) paints a QuPath rectangle
    at the region's corner plus its numbers."""
    import tifffile

    from dsf.labels import paint_labels

    gj = tmp_path / "a.geojson"
    feature = {"type": "Feature", "properties": {"classification": {"name": "STR"}},
               "geometry": {"type": "Polygon", "coordinates": [_rect(0, 0, 64, 32)]}}  # fmt: skip
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    out = tmp_path / "a.labels.tiff"
    st = _settings() | {"base": None}
    s = open_slide(scn)
    paint_labels(s, {}, st, [235, 210, 235], MPP, out, 1, progress=False, annotation=gj)
    painted = tifffile.imread(out, key=0)
    rows, cols = np.nonzero(painted == 2)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (256, 319, 128, 159)


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
    assert list(attrs["bounds"]) == list(BOUNDS)
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


def test_slide_scores_of_a_leica_slide_compare_the_map_with_qupath_labels_where_drawn(
    scn: Path, tmp_path: Path
) -> None:
    """`dsf evaluate slide`: a map that predicts exactly what a pathologist drew in QuPath
    scores perfectly (the drawing read at the region's corner, as the map is of the plane)."""
    import pandas as pd

    from dsf.evaluate import main as evaluate_main

    f = 4  # slide px per map px (2 um/px)
    truth = np.zeros((PLANE[1] // f, PLANE[0] // f), np.uint8)
    ox, oy = ORIGIN[0] // f, ORIGIN[1] // f
    truth[oy + 10 : oy + 60, ox + 20 : ox + 90] = 1
    cmap = _write_map(tmp_path / "m.tiff", truth, slide="leica_1")
    gj = tmp_path / "a.geojson"
    drawn = {"type": "Polygon", "coordinates": [_rect(80, 40, 360, 240)]}
    feature = {"type": "Feature", "properties": {"classification": {"name": "TUM"}},
               "geometry": drawn}  # fmt: skip
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    folds = tmp_path / "folds.tsv"  # the map's model held the slide out
    folds.write_text("slide\tgroup\tfold\nleica_1\tp1\t0\nother\tp2\t1\n")
    out = tmp_path / "s.tsv"
    args = ["slide", "--map", str(cmap), "--slide", str(scn), "--slide-id", "leica_1",
            "--labels", str(gj), "--folds", str(folds), "--out", str(out),
            "--classes", *CLASSES]  # fmt: skip
    assert evaluate_main(args) == 0
    row = pd.read_csv(out, sep="\t").iloc[0]
    assert row["pixel_accuracy"] == 1.0 and row["cm_TUM_TUM"] == 50 * 70
