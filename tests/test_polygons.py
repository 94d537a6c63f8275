"""Prediction polygons: class maps traced into QuPath GeoJSON over their slide (`dsf polygons`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dsf.annotations import open_labels
from dsf.class_map import open_map
from dsf.class_tiff import pyramid_shapes, write_tiff
from dsf.config import defaults
from dsf.imagescope import ring_area
from dsf.polygons import main, trace_level
from dsf.synth_tissue import render_labels

from conftest import rgb_slide

CLASSES = ["ignore", "TUM", "STR", "LYM"]
SLIDE_MPP = 0.5
MAP_MPP = 2.0  # 4 slide px per map px
W, H = 1600, 1200  # slide, level-0 px


def _write_map(path: Path, level0: np.ndarray, slide: str = "s", mpp: float = MAP_MPP) -> Path:
    """A class map as `dsf infer` writes it: palette pyramid (level i samples the centre pixel
    of each 2**i square, the edge pixel for a square cut short) and its JSON."""
    levels = [level0]
    for i, (h, w) in enumerate(pyramid_shapes(*level0.shape, 64)[1:], start=1):
        f = 2**i
        rows = np.minimum(np.arange(h) * f + f // 2, level0.shape[0] - 1)
        cols = np.minimum(np.arange(w) * f + f // 2, level0.shape[1] - 1)
        levels.append(level0[np.ix_(rows, cols)])
    write_tiff(path, levels, mpp, len(CLASSES), tile=64, threads=1)
    meta = {"slide": slide, "init": "dsf", "fraction": 1.0, "mpp": mpp, "classes": CLASSES,
            "width": level0.shape[1], "height": level0.shape[0], "folds": [0],
            "routing": "out_of_fold"}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("polygons")
    return rgb_slide(d / "s.tif", np.full((H, W, 3), 200, np.uint8), SLIDE_MPP)


def _truth() -> np.ndarray:
    """A map of synthetic tissue regions (the synthetic slides' label layout)."""
    return render_labels(7, 0, 0, W // 4, H // 4, SLIDE_MPP, 4.0, 60.0, slide_width=W,
                         slide_height=H)  # fmt: skip


def _run(slide: Path, cmap: Path, out: Path, *opts: str) -> int:
    return main(["--map", str(cmap), "--slide", str(slide), "--slide-id", "s", "--out", str(out),
                 *opts])  # fmt: skip


def _back(geojson: Path, mpp: float = MAP_MPP) -> np.ndarray:
    """The polygons rasterised again at the map's grid, as dsf reads annotations."""
    settings = defaults("labels") | {"classes": CLASSES}
    src = open_labels(geojson, "s", (W, H), SLIDE_MPP, settings)
    return src.read(0, 0, round(W * SLIDE_MPP / mpp), round(H * SLIDE_MPP / mpp), mpp)


def test_polygons_trace_the_map_on_the_slide(slide: Path, tmp_path: Path) -> None:
    """Traced at the map's own resolution, unsimplified, the polygons give the map back pixel
    for pixel on the slide's level-0 grid; QuPath annotations with the maps' class colours."""
    truth = _truth()
    assert set(np.unique(truth)) >= {1, 2, 3}
    cmap = _write_map(tmp_path / "m.tiff", truth)
    out = tmp_path / "m.geojson"
    assert _run(slide, cmap, out, "--mpp", str(MAP_MPP), "--min-um2", "0", "--tolerance", "0") == 0
    doc = json.loads(out.read_text())
    props = doc["features"][0]["properties"]
    assert props["objectType"] == "annotation"
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} == {
        "TUM", "STR", "LYM",
    }  # fmt: skip
    tum = next(f for f in doc["features"] if f["properties"]["classification"]["name"] == "TUM")
    assert tum["properties"]["classification"]["color"] == [213, 94, 0]  # the map's palette
    rings = [np.asarray(r) for f in doc["features"] for r in f["geometry"]["coordinates"]]
    xy = np.concatenate(rings)
    assert xy.min() >= 0 and xy[:, 0].max() <= W and xy[:, 1].max() <= H  # level-0 px
    back = _back(out)
    assert np.array_equal(back, truth)  # the rings follow the pixel edges
    # the defaults: traced at 4 um/px (the map's level 1), simplified, specks dropped
    assert _run(slide, cmap, out) == 0
    assert (_back(out) == truth).mean() > 0.95
    coarse = json.loads(out.read_text())["features"]
    assert sum(len(r) for f in coarse for r in f["geometry"]["coordinates"]) < len(xy) / 2


def test_polygons_stay_on_a_slide_the_map_overhangs(tmp_path: Path) -> None:
    """A map's last pixel, and a coarse level's more so, reach past an odd-sized slide's edge:
    the polygons are clipped to the slide."""
    w, h = W - 3, H - 5
    odd = rgb_slide(tmp_path / "odd.tif", np.full((h, w, 3), 200, np.uint8), SLIDE_MPP)
    cmap = _write_map(tmp_path / "m.tiff", np.ones((H // 4, W // 4), np.uint8))
    out = tmp_path / "m.geojson"
    assert (
        _run(odd, cmap, out, "--mpp", "8", "--tolerance", "0") == 0
    )  # level 2: 4 map px per traced px
    (feat,) = json.loads(out.read_text())["features"]
    xy = np.asarray(feat["geometry"]["coordinates"][0])
    assert xy[:, 0].max() == w and xy[:, 1].max() == h and xy.min() >= 0
    # a reduced level's last column, placed on its sampled map pixel, can start past a slide
    # that ends in the first half of the map's last pixel: no polygon of it (it had been
    # written clipped to a line, of no area)
    n = 9  # map px; the slide ends 1 px into the last (4 slide px each)
    thin = rgb_slide(tmp_path / "thin.tif", np.full((H, 4 * n - 3, 3), 200, np.uint8), SLIDE_MPP)
    edge = np.ones((H // 4, n), np.uint8)
    edge[:, -1] = 2
    cmap = _write_map(tmp_path / "edge.tiff", edge)
    assert _run(thin, cmap, out, "--mpp", "4", "--tolerance", "0", "--min-um2", "0") == 0
    for feat in json.loads(out.read_text())["features"]:
        assert all(ring_area(r) > 0 for r in feat["geometry"]["coordinates"])
        assert np.asarray(feat["geometry"]["coordinates"][0])[:, 0].max() <= 4 * n - 3


def test_small_regions_and_holes_are_left_out(
    slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regions and holes under polygons.min_um2 are left out, and the log says how much of
    each class's area the polygons cover (summing them in QuPath misses the left-out ones)."""
    m = np.zeros((H // 4, W // 4), np.uint8)
    m[20:120, 20:200] = 1
    m[50:52, 50:52] = 2  # 4 map px = 64 um^2: a speck inside TUM
    m[60:90, 100:140] = 3  # 1200 map px = 19,200 um^2: a hole of TUM filled by LYM
    cmap = _write_map(tmp_path / "m.tiff", m)
    out = tmp_path / "m.geojson"
    assert _run(slide, cmap, out, "--mpp", str(MAP_MPP), "--min-um2", "500") == 0
    said = capsys.readouterr().err  # dsf's logging writes to stderr
    feats = json.loads(out.read_text())["features"]
    names = sorted(f["properties"]["classification"]["name"] for f in feats)
    assert names == ["LYM", "TUM"]
    # TUM: 18,000 map px less the hole, 4 um2 each; the speck (16 um2) is left out
    assert "TUM 0.0672 of 0.0672 mm2, STR 0 of 1.6e-05 mm2, LYM 0.0048 of 0.0048" in said
    tum = next(f for f in feats if f["properties"]["classification"]["name"] == "TUM")
    assert len(tum["geometry"]["coordinates"]) == 2  # the LYM hole, not the speck's
    back = _back(out)
    assert back[51, 51] == 1 and back[75, 120] == 3 and back[10, 10] == 0


def test_the_traced_level_follows_polygons_mpp(tmp_path: Path) -> None:
    cmap = open_map(_write_map(tmp_path / "m.tiff", _truth()), tmp_path / "m.json")
    assert [round(cmap.level_mpp(lv), 3) for lv in range(len(cmap.levels))] == [2, 4, 8, 16]
    assert trace_level(cmap, 1.0) == 0  # the map is coarser: its finest level
    assert trace_level(cmap, 5.0) == 1
    assert trace_level(cmap, 100.0) == 3


def test_a_map_of_another_slide_or_scale_is_refused(
    slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.geojson"
    other = _write_map(tmp_path / "o.tiff", _truth(), slide="other")
    assert _run(slide, other, out) == 2
    assert "is of slide 'other', not 's'" in capsys.readouterr().err
    scaled = _write_map(tmp_path / "x.tiff", _truth(), mpp=1.0)
    assert _run(slide, scaled, out) == 2
    assert "made with another mpp" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("m.geojson.partial").exists()


def test_imagescope_xml_reads_back_as_the_map(slide: Path, tmp_path: Path) -> None:
    """The ImageScope XML beside the GeoJSON: a layer per class in the map's colours, holes as
    negative regions, and an island inside a hole of its own class in a later layer of that
    class (ImageScope cuts negatives out of their whole layer), so it reads back as the map."""
    import xml.etree.ElementTree as ET

    from dsf.annotation_xml import is_annotation_xml

    nested = _truth()
    nested[150:280, 40:200] = 1  # TUM ...
    nested[180:250, 70:170] = 2  # ... with a STR hole ...
    nested[200:230, 100:140] = 1  # ... holding a TUM island ...
    nested[210:220, 115:125] = 3  # ... with a LYM hole
    cmap = _write_map(tmp_path / "m.tiff", nested)
    out = tmp_path / "m.geojson"
    opts = ("--mpp", str(MAP_MPP), "--min-um2", "0", "--tolerance", "0", "--imagescope")
    assert _run(slide, cmap, out, *opts) == 0
    xml = tmp_path / "m.xml"
    assert is_annotation_xml(xml)
    root = ET.parse(xml).getroot()
    assert root.get("MicronsPerPixel") == "0.500000"
    layers = [(a.get("Name"), a.get("LineColor")) for a in root.iter("Annotation")]
    r, g, b = 213, 94, 0  # TUM in the maps' palette
    assert layers[:2] == [("TUM", str(r + 256 * g + 65536 * b))] * 2  # the island's layer
    assert {name for name, _ in layers} == {"TUM", "STR", "LYM"}
    regions = list(root.iter("Region"))
    assert {r.get("NegativeROA") for r in regions} == {"0", "1"}
    assert all(r.get("Text") in ("TUM", "STR", "LYM") and r.get("Type") == "0" for r in regions)
    positive = sum(float(r.get("Area")) for r in regions if r.get("NegativeROA") == "0")
    negative = sum(float(r.get("Area")) for r in regions if r.get("NegativeROA") == "1")
    assert (positive - negative) / (4 * 4) == pytest.approx(np.count_nonzero(nested), rel=1e-3)
    back = _back(xml)
    assert back[215, 105] == 1 and back[215, 120] == 3 and back[190, 80] == 2
    assert (back == nested).mean() > 0.999
    # an XML dsf did not write (a pathologist's annotation beside the slide) is never replaced,
    # and the refused run touches nothing
    xml.write_text("<Annotations><Annotation Name='mine'/></Annotations>")
    before = out.read_bytes()
    assert _run(slide, cmap, out, *opts) == 2
    assert "mine" in xml.read_text() and out.read_bytes() == before


def test_a_geojson_dsf_did_not_write_is_never_replaced(slide: Path, tmp_path: Path) -> None:
    """`--out` naming the slide's own annotation had deleted it; dsf's GeoJSON carries a mark
    (a foreign member QuPath ignores), so a rerun replaces only its own file."""
    cmap = _write_map(tmp_path / "m.tiff", _truth())
    out = tmp_path / "s.geojson"
    mine = '{"type": "FeatureCollection", "features": []}'
    out.write_text(mine)
    assert _run(slide, cmap, out, "--mpp", str(MAP_MPP)) == 2
    assert out.read_text() == mine
    out.unlink()
    assert _run(slide, cmap, out, "--mpp", str(MAP_MPP)) == 0
    assert json.loads(out.read_text())["generator"] == "dsf polygons"
    assert _run(slide, cmap, out, "--mpp", str(MAP_MPP)) == 0  # a rerun replaces its own
    assert (_back(out) == _truth()).mean() > 0.99


def test_nesting_depth_counts_the_holes_a_region_lies_in() -> None:
    """Three TUM regions, each in a hole of the one before, and one beside them: depths 0, 1, 2
    and 0 (a region is inside another when most of its vertices lie in one of its holes)."""
    from dsf.imagescope import nesting_depths

    def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)

    outer = [square(0, 0, 100, 100), square(10, 10, 90, 90)]
    middle = [square(20, 20, 80, 80), square(30, 30, 70, 70)]
    inner = [square(40, 40, 60, 60)]
    beside = [square(200, 0, 210, 10)]
    assert nesting_depths([inner, beside, outer, middle]) == [2, 0, 0, 1]
    assert nesting_depths([beside]) == [0]


def test_regions_traced_on_a_reduced_level_are_centred_and_wound(
    slide: Path, tmp_path: Path
) -> None:
    """A reduced level keeps one map pixel of each block (off its centre): traced there, a
    region's edges are centred on those pixels, so over every phase of the block they land
    where the region is. Holes wind against their outer ring."""
    starts, ends = [], []
    for phase in range(4):
        m = np.zeros((H // 4, W // 4), np.uint8)
        x0, x1 = 101 + phase, 301 + phase
        m[40:200, x0:x1] = 1
        m[100:140, 150:200] = 0  # a hole
        cmap = _write_map(tmp_path / f"m{phase}.tiff", m)
        out = tmp_path / f"m{phase}.geojson"
        assert _run(slide, cmap, out, "--mpp", "8", "--tolerance", "0") == 0  # level 2
        (feat,) = json.loads(out.read_text())["features"]
        outer, hole = (np.asarray(r) for r in feat["geometry"]["coordinates"])
        starts.append(outer[:, 0].min() / 4 - x0)  # map px off the true edge
        ends.append(outer[:, 0].max() / 4 - x1)

        def area(r: np.ndarray) -> float:
            return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))

        assert area(outer) > 0 > area(hole)  # RFC 7946: outer counterclockwise, holes not
    assert abs(np.mean(starts)) < 0.5 and abs(np.mean(ends)) < 0.5
    assert max(map(abs, starts + ends)) <= 2
