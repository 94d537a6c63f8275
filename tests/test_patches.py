"""Patch stores: geometry against the slide, context, labels, atomicity, memory-bounded reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from dsf.annotations import open_labels
from dsf.config import defaults
from dsf.errors import AnnotationError, SlideError
from dsf.patches import Geometry, _plan, downsample_mean, extract, tile_grid
from dsf.slide import open_slide

from conftest import geojson_as_aperio, rgb_slide


def _rgb_mask(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] <= 235) & (rgb[..., 1] <= 210) & (rgb[..., 2] <= 235)


def _settings(**kw: object) -> dict:
    return defaults("patches") | kw


def _labels_settings(**kw: object) -> dict:
    return defaults("labels") | {"classes": ["ignore", "A", "B", "C"]} | kw


def _cut_labelled(
    slide: object, mask: np.ndarray, out: Path, st: dict, classes: dict, labels: object
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patch store and labels store of a slide: (labelled tiles, their pixels, labels, class
    fractions and level-0 coords), the pixels and coords looked up by the labels' index."""
    from dsf.tile_labels import build, labels_store_path

    extract(slide, mask, 8.0, out, st, progress=False)
    lab_path = labels_store_path(out)
    n = build(out, labels, lab_path, classes, st["min_label_frac"], progress=False)
    g = zarr.open_group(str(out), mode="r")
    lab = zarr.open_group(str(lab_path), mode="r")
    index = lab["index"][:]
    assert lab["labels"].shape[0] == n == len(index)
    return n, g["tiles"][:][index], lab["labels"][:], lab["label_frac"][:], g["coords"][:][index]


def test_tile_grid_is_centred() -> None:
    assert tile_grid(1000, 256, 128) == (6, (1000 - 256 - 5 * 128) // 2)
    assert tile_grid(100, 256, 128) == (0, 0)
    assert tile_grid(256, 256, 64) == (1, 0)


def test_plan_reads_each_row_once_per_band() -> None:
    g = Geometry(1.0, 1.0, 1.0, 4, 64, 128, nx=6, ny=5, ox=0, oy=0)
    keep = np.ones((5, 6), bool)
    keep[2] = False
    strips = _plan(keep, g, band_tiles=4)
    band0 = [s for s in strips if s.band == 0]
    assert [(s.row, s.y0, s.y1, s.fresh) for s in band0] == [
        (0, 0, 256, True),
        (1, 256, 384, False),
        (3, 384, 640, True),
        (4, 640, 768, False),
    ]
    # rows read per band: exactly the union of the kept tiles' rows, each once
    assert sum(s.y1 - s.y0 for s in band0) == 768


def test_downsample_mean_matches_block_average() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    got = downsample_mean(t, 4)
    ref = t.reshape(2, 4, 3, 4, 3).mean((1, 3))
    assert got.shape == (2, 3, 3) and np.abs(got - ref).max() <= 0.5


def test_kept_tiles_are_those_whose_mask_footprint_holds_enough_tissue(tmp_path: Path) -> None:
    """Which tiles a store keeps, computed here from the mask alone: a tile's tissue fraction
    is the mean of the mask pixels under its footprint, and it is kept at >= min_tissue.
    Checking that the kept tiles' `tissue` passes the threshold restates the filter: the
    fractions could come from the wrong part of the mask (a row of tiles lower) unseen. The
    random mask gives neighbouring tiles different fractions, so any shift changes the set."""
    h, w = 336, 368  # 0.5 um/px, read at 0.5: 64 px tiles 32 px apart, 9 rows x 10 columns
    ox = oy = 8  # the grid is centred: (368 - 64) % 32 = (336 - 64) % 32 = 16 px left, 8 a side
    rgb = np.full((h, w, 3), (200, 120, 180), np.uint8)
    slide = open_slide(rgb_slide(tmp_path / "s.tif", rgb, 0.5, tile=64))
    mask_mpp = 4.0  # 8 slide px per mask px: a tile is 8 x 8 mask px, the stride 4
    mask = np.random.default_rng(3).random((h // 8, w // 8)) < 0.45
    st = _settings(target_mpp=0.5, block=16, scale=4, stride=32, min_tissue=0.45, band_tiles=3)
    want: dict[tuple[int, int], float] = {}
    for row in range(9):
        for col in range(10):
            x, y = ox + col * 32, oy + row * 32
            frac = float(mask[y // 8 : (y + 64) // 8, x // 8 : (x + 64) // 8].mean())
            if frac >= 0.45:
                want[(x, y)] = frac
    assert 10 < len(want) < 80  # some tiles kept, some left out
    n = extract(slide, mask, mask_mpp, tmp_path / "s.zarr", st, progress=False)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    got = [tuple(int(v) for v in c) for c in g["coords"][:]]
    assert n == len(got) == len(set(got))
    assert set(got) == set(want)
    np.testing.assert_allclose(g["tissue"][:], [want[c] for c in got], rtol=1e-6)


def test_a_tiles_tissue_fraction_counts_the_mask_pixels_its_edges_cut_by_their_share() -> None:
    """Tiles whose edges fall inside mask pixels (256 px tiles on a mask of 8 um/px at 0.25:
    a tile is 8 mask px, its edges anywhere in one): the fraction is the tissue share of the
    footprint, computed here on the mask enlarged 16 times; a footprint rounded to whole mask
    pixels had been up to a mask pixel's row and column off (about 6% on such tiles)."""
    from types import SimpleNamespace

    from dsf.patches import tissue_fractions

    mask = np.random.default_rng(5).random((40, 50)) < 0.5
    fine = np.repeat(np.repeat(mask, 16, 0), 16, 1)  # 16 fine px per mask px
    for mask_mpp in (8.0, 4.0, 1.6):  # tile edges 0.625, 1.25, 3.125 mask px from the origin
        geo = SimpleNamespace(target_mpp=1.0, ox=5, oy=3, nx=6, ny=5, stride=37, tile=64)
        got = tissue_fractions(mask, mask_mpp, geo)
        k = 16 / mask_mpp  # fine px per target px: every edge on a whole fine pixel here
        for row in range(geo.ny):
            for col in range(geo.nx):
                x, y = geo.ox + col * geo.stride, geo.oy + row * geo.stride
                want = fine[round(y * k) : round((y + 64) * k), round(x * k) : round((x + 64) * k)]
                share = want.mean() if want.size else 0.0  # beyond the mask: no tissue
                assert got[row, col] == pytest.approx(share, abs=1e-9), (mask_mpp, row, col)


def test_cmu_store_matches_openslide_pixels(real: Path, tmp_path: Path) -> None:
    slide = open_slide(real / "CMU-1-Small-Region.svs")
    mask = _rgb_mask(slide.thumbnail(8.0))
    st = _settings(target_mpp=0.5, block=32, stride=96, min_tissue=0.3, band_tiles=3)
    out = tmp_path / "cmu.zarr"
    n = extract(slide, mask, 8.0, out, st, progress=False)
    g = zarr.open_group(str(out), mode="r")
    assert g.metadata.zarr_format == 3
    assert g["tiles"].shape == (n, 128, 128, 3) and g["tiles"].dtype == np.uint8
    assert g["context"].shape == (n, 32, 32, 3)
    assert g["coords"].shape == (n, 2) and g["coords"].dtype == np.int64
    assert g["tissue"].shape == (n,) and g["tissue"].dtype == np.float32
    assert (g["tissue"][:] >= 0.3).all()
    assert "labels" not in g
    assert g["tiles"].shards is not None  # sharded: a slide is a few files
    a = dict(g.attrs)
    assert a["slide_id"] == "CMU-1-Small-Region" and a["mpp"] == pytest.approx(0.499)
    assert a["target_mpp"] == pytest.approx(0.499)  # 0.5 served by level 0 within tolerance
    assert a["context_mpp"] == pytest.approx(4 * 0.499) and a["scale"] == 4 and a["stride"] == 96
    assert a["block"] == 32 and a["n_tiles"] == n and a["dsf_version"]
    assert a["source_size"] == (real / "CMU-1-Small-Region.svs").stat().st_size
    osr = openslide.OpenSlide(str(real / "CMU-1-Small-Region.svs"))
    coords, tiles, ctx = g["coords"][:], g["tiles"][:], g["context"][:]
    assert len({tuple(c) for c in coords}) == n
    for i in range(n):
        ref = np.asarray(osr.read_region(tuple(int(v) for v in coords[i]), 0, (128, 128)))
        np.testing.assert_array_equal(tiles[i], ref[..., :3])
        # context: the same field of view, 4x coarser, read independently through dsf
        indep = slide.read(*coords[i], 32, 32, a["context_mpp"])
        assert np.abs(ctx[i].astype(int) - indep).mean() < 1.0


def _stripes(h: int, w: int) -> np.ndarray:
    """A labelled test image: vertical class stripes 40 px wide, colour per class."""
    cls = (np.arange(w) // 40) % 3 + 1
    colours = np.array([[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)
    rgb = np.broadcast_to(colours[cls][None], (h, w, 3)).copy()
    return rgb, np.broadcast_to(cls[None], (h, w)).astype(np.uint8)


def test_labels_align_with_pixels_from_raster_and_geojson(tmp_path: Path) -> None:
    h, w = 400, 600
    rgb, lab = _stripes(h, w)
    slide_path = tmp_path / "stripes.tif"
    rgb_slide(slide_path, rgb, 0.5, tile=64)
    tifffile.imwrite(tmp_path / "mask.tif", lab[::4, ::4].copy())  # a 4x downsampled mask
    feats = []
    for k, x0 in enumerate(range(0, w, 40)):
        ring = [[x0, 0], [x0 + 40, 0], [x0 + 40, h], [x0, h], [x0, 0]]
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"classification": {"name": "ABC"[k % 3]}},
            }
        )
    (tmp_path / "ann.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": feats})
    )
    slide = open_slide(slide_path)
    mask = np.ones((h // 16, w // 16), bool)
    st = _settings(target_mpp=0.5, block=16, stride=48, min_tissue=0.5)
    colour_of = {1: (200, 40, 40), 2: (40, 200, 40), 3: (40, 40, 200)}
    for name in ("mask.tif", "ann.geojson"):
        labels = open_labels(
            tmp_path / name, "stripes", slide.dimensions, slide.mpp, _labels_settings()
        )
        out = tmp_path / f"{name}.zarr"
        n, tiles, labs, fr, _ = _cut_labelled(slide, mask, out, st, _labels_settings(), labels)
        assert labs.shape == (n, 64, 64) and fr.shape == (n, 4)
        np.testing.assert_allclose(fr.sum(1), 1.0, atol=1e-5)
        for i in range(n):
            for c, colour in colour_of.items():
                px = tiles[i][labs[i] == c]
                if not len(px):
                    continue
                # every labelled pixel carries its class colour (mask edges: 4 px of slack)
                assert (np.all(px == colour, axis=1)).mean() > (0.9 if name == "mask.tif" else 0.99)


def _square(x: int, y: int, size: int) -> list[list[int]]:
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def test_qupath_derived_classes_and_nested_annotations(tmp_path: Path, real: Path) -> None:
    """A FeatureCollection as QuPath 0.4+ exports one with its hierarchy: a derived class
    (`classification.names`), an annotation nested in `childObjects` (painted over its parent)
    and a nested cell (not a region label: skipped)."""
    slide = open_slide(real / "CMU-1-Small-Region.svs")
    cell = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_square(120, 120, 10)]},
        "properties": {"objectType": "cell", "classification": {"name": "Positive"}},
    }
    child = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_square(200, 200, 100)]},
        "properties": {"objectType": "annotation", "classification": {"name": "C"}},
    }
    parent = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_square(100, 100, 300)]},
        "properties": {
            "objectType": "annotation",
            "name": "Region 1",
            "classification": {"names": ["A", "Positive"], "color": [200, 0, 0]},
            "childObjects": [cell, child],
        },
    }
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [parent]}))
    labels = open_labels(path, "cmu", slide.dimensions, slide.mpp, _labels_settings())
    lab = labels.read(0, 0, 500, 500, slide.mpp)
    assert lab[150, 150] == 1  # the base class A of "A: Positive"
    assert lab[125, 125] == 1  # the nested cell does not relabel its parent
    assert lab[250, 250] == 3  # the nested annotation C, over its parent
    assert lab[50, 50] == 0 and lab[450, 450] == 0
    # the full derived name wins where it is mapped
    mapped = _labels_settings(names={"A: Positive": 2})
    lab = open_labels(path, "cmu", slide.dimensions, slide.mpp, mapped).read(
        0, 0, 500, 500, slide.mpp
    )
    assert lab[150, 150] == 2 and lab[250, 250] == 3
    # QuPath before 0.4 wrote a derived class as one name: its base class too
    parent["properties"]["classification"] = {"name": "A: Positive", "colorRGB": -3670016}
    path.write_text(json.dumps([parent]))
    lab = open_labels(path, "cmu", slide.dimensions, slide.mpp, _labels_settings())
    assert lab.read(0, 0, 500, 500, slide.mpp)[150, 150] == 1
    parent["properties"]["classification"] = {"names": ["Unicorn", "Positive"]}
    path.write_text(json.dumps([parent]))
    with pytest.raises(AnnotationError, match="'Unicorn: Positive', 'Unicorn'.*labels.names"):
        open_labels(path, "cmu", slide.dimensions, slide.mpp, _labels_settings())


def test_qupath_exports_of_all_objects_and_odd_features(tmp_path: Path, real: Path) -> None:
    """QuPath's export of all objects lists detections and cells beside the annotations: they
    are skipped at the top level as when nested (a top-level cell had relabelled its region
    and, classed Positive, stopped the run). A point or ruler of any class is ignored, not a
    reason to refuse the file; class names match with outer spaces as in XML."""
    slide = open_slide(real / "CMU-1-Small-Region.svs")

    def feature(kind: str, name: str, geometry: dict) -> dict:
        props = {"objectType": kind, "classification": {"name": name}}
        return {"type": "Feature", "geometry": geometry, "properties": props}

    region = feature(
        "annotation", "B ", {"type": "Polygon", "coordinates": [_square(100, 100, 300)]}
    )
    cell = feature("cell", "Positive", {"type": "Polygon", "coordinates": [_square(150, 150, 50)]})
    tile = feature("detection", "A", {"type": "Polygon", "coordinates": [_square(300, 300, 50)]})
    point = feature("annotation", "Ki67 hotspot", {"type": "Point", "coordinates": [120, 120]})
    path = tmp_path / "all.geojson"
    path.write_text(
        json.dumps({"type": "FeatureCollection", "features": [region, cell, tile, point]})
    )
    lab = open_labels(path, "cmu", slide.dimensions, slide.mpp, _labels_settings())
    lab = lab.read(0, 0, 500, 500, slide.mpp)
    assert lab[175, 175] == lab[325, 325] == lab[250, 250] == 2  # B, under the cell and tile
    assert lab[50, 50] == 0
    # detections alone (a pixel classifier's objects): the message says so and how to convert
    # them (it had said only "draw them")
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [cell, tile]}))
    with pytest.raises(AnnotationError, match=r"only 2 detection or cell objects.*convert"):
        open_labels(path, "cmu", slide.dimensions, slide.mpp, _labels_settings())


def test_qupath_02_and_03_exports_tma_cores_and_mixed_geometries(
    tmp_path: Path, real: Path
) -> None:
    """QuPath 0.2 named an object's type in the feature's `id`, 0.3 in `object_type`: their
    cells had been painted as region labels (a `Positive` cell stopped the run). Annotations
    nested in a TMA core or the root object count (they had been dropped with it), and an
    error names the object where it sits in the file."""
    slide = open_slide(real / "CMU-1-Small-Region.svs")
    square = {"type": "Polygon", "coordinates": [_square(100, 100, 300)]}
    inner = {"type": "Polygon", "coordinates": [_square(200, 200, 50)]}

    def obj(name: str, geometry: dict, **extra: object) -> dict:
        props = {"classification": {"name": name}} | extra.pop("props", {})
        return {"type": "Feature", "geometry": geometry, "properties": props} | extra

    exports = {
        "v02": [obj("B", square, id="PathAnnotationObject"),
                obj("Positive", inner, id="PathCellObject")],
        "v03": [obj("B", square, props={"object_type": "annotation"}),
                obj("Positive", inner, props={"object_type": "cell"})],
        "tma": [obj("Core", {"type": "Polygon", "coordinates": [_square(0, 0, 500)]},
                    props={"objectType": "tma_core", "childObjects": [obj("B", square)]})],
    }  # fmt: skip
    for name, features in exports.items():
        path = tmp_path / f"{name}.geojson"
        path.write_text(json.dumps(features))
        lab = open_labels(path, "cmu", slide.dimensions, slide.mpp, _labels_settings())
        lab = lab.read(0, 0, 500, 500, slide.mpp)
        assert lab[225, 225] == lab[150, 150] == 2 and lab[50, 50] == 0, name
    # an annotation of mixed parts (a GeometryCollection): its polygons count, lines not
    line = {"type": "LineString", "coordinates": [[0, 0], [50, 50]]}
    mixed = {"type": "GeometryCollection", "geometries": [line, square]}
    (tmp_path / "mixed.geojson").write_text(json.dumps([obj("B", mixed)]))
    lab = open_labels(
        tmp_path / "mixed.geojson", "cmu", slide.dimensions, slide.mpp, _labels_settings()
    )
    assert lab.read(0, 0, 500, 500, slide.mpp)[150, 150] == 2
    nested = [obj("A", square), obj("B", square, props={"childObjects": [obj("Necrosis", inner)]})]
    (tmp_path / "bad.geojson").write_text(json.dumps(nested))
    with pytest.raises(
        AnnotationError, match=r"features\[1\]\.childObjects\[0\] has class 'Necrosis'"
    ):
        open_labels(
            tmp_path / "bad.geojson", "cmu", slide.dimensions, slide.mpp, _labels_settings()
        )


def test_a_grey_and_alpha_png_mask_reads_its_grey_codes(tmp_path: Path) -> None:
    """A label mask saved as grey + alpha (PIL mode LA) had raised a bare IndexError."""
    from PIL import Image

    codes = np.zeros((50, 50), np.uint8)
    codes[10:30, 10:30] = 2
    Image.fromarray(np.stack([codes, np.full_like(codes, 255)], -1), "LA").save(tmp_path / "m.png")
    lab = open_labels(tmp_path / "m.png", "s", (100, 100), 0.25, _labels_settings())
    np.testing.assert_array_equal(lab.read(0, 0, 100, 100, 0.25)[::2, ::2], codes)


def test_annotation_outside_the_slide_and_unknown_class(tmp_path: Path, real: Path) -> None:
    slide = open_slide(real / "CMU-1-Small-Region.svs")
    far = [[10_000, 10_000], [10_100, 10_000], [10_100, 10_100], [10_000, 10_000]]
    feat = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [far]},
        "properties": {"classification": {"name": "A"}},
    }
    (tmp_path / "far.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [feat]})
    )
    with pytest.raises(AnnotationError, match="'cmu'.*overlaps the slide"):
        open_labels(
            tmp_path / "far.geojson", "cmu", slide.dimensions, slide.mpp, _labels_settings()
        )
    feat["properties"]["classification"]["name"] = "Unicorn"
    (tmp_path / "odd.geojson").write_text(json.dumps([feat]))
    with pytest.raises(AnnotationError, match="'Unicorn'.*labels.names"):
        open_labels(
            tmp_path / "odd.geojson", "cmu", slide.dimensions, slide.mpp, _labels_settings()
        )
    # a class named like labels.classes[0], the unlabelled index 0 (`classes: [A, B]` had
    # erased every A region silently); labels.names may erase it on purpose
    feat["properties"]["classification"]["name"] = "a"
    inside = {"type": "Polygon", "coordinates": [_square(100, 100, 300)]}
    (tmp_path / "first.geojson").write_text(json.dumps([feat | {"geometry": inside}]))
    only_drawn = _labels_settings(classes=["A", "B"])
    said = r"'a', labels.classes\[0\].*unlabelled.*\[ignore, A, B\]"
    with pytest.raises(AnnotationError, match=said):
        open_labels(tmp_path / "first.geojson", "cmu", slide.dimensions, slide.mpp, only_drawn)
    erase = _labels_settings(classes=["A", "B"], names={"A": 0})
    lab = open_labels(tmp_path / "first.geojson", "cmu", slide.dimensions, slide.mpp, erase)
    assert (lab.read(0, 0, 500, 500, slide.mpp) == 0).all()
    tifffile.imwrite(tmp_path / "wrong.tif", np.ones((100, 900), np.uint8))
    with pytest.raises(AnnotationError, match="'cmu'.*does not cover the slide"):
        open_labels(tmp_path / "wrong.tif", "cmu", slide.dimensions, slide.mpp, _labels_settings())
    tifffile.imwrite(tmp_path / "codes.tif", np.full((296, 222), 19, np.uint8))
    with pytest.raises(AnnotationError, match=r"codes \[19\].*labels.class_map"):
        open_labels(tmp_path / "codes.tif", "cmu", slide.dimensions, slide.mpp, _labels_settings())
    bcss = _labels_settings(class_map={"19": 1, "2": 2}, other_class=3)
    src = open_labels(tmp_path / "codes.tif", "cmu", slide.dimensions, slide.mpp, bcss)
    assert (src.read(0, 0, 10, 10, slide.mpp) == 1).all()


def test_no_tissue_tile_is_an_error_naming_the_slide(real: Path, tmp_path: Path) -> None:
    slide = open_slide(real / "CMU-1-Small-Region.svs")
    mask = np.zeros((371, 278), bool)
    with pytest.raises(SlideError, match="CMU-1-Small-Region.*patches.min_tissue"):
        extract(
            slide,
            mask,
            8.0,
            tmp_path / "x.zarr",
            _settings(target_mpp=0.5, block=32),
            progress=False,
        )
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


def _write_mask(path: Path, mask: np.ndarray, mpp: float) -> None:
    tifffile.imwrite(
        path,
        mask.astype(np.uint8) * 255,
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )


def test_killed_patch_job_leaves_no_store_and_rerun_is_valid(real: Path, tmp_path: Path) -> None:
    slide = open_slide(real / "CMU-1-Small-Region.svs")
    w, h = slide.size_at(8.0)
    _write_mask(tmp_path / "mask.tiff", np.ones((h, w), bool), 8.0)
    out = tmp_path / "cmu.zarr"
    cmd = [
        sys.executable,
        "-m",
        "dsf.patches",
        "--slide",
        str(slide.path),
        "--tissue-mask",
        str(tmp_path / "mask.tiff"),
        "--out",
        str(out),
        "--target-mpp",
        "0.5",
        "--block",
        "32",
        "--stride",
        "48",
        "--shard-mb",
        "0.5",
        "--min-tissue",
        "0.1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    partial = tmp_path / "cmu.zarr.partial"
    deadline = time.time() + 60
    while time.time() < deadline and not list(partial.glob("tiles/c/*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing that looks complete
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    g = zarr.open_group(str(out), mode="r")
    n = g.attrs["n_tiles"]
    assert g["tiles"].shape[0] == n == g["coords"].shape[0] > 100
    osr = openslide.OpenSlide(str(slide.path))
    for i in (0, n // 2, n - 1):
        ref = np.asarray(osr.read_region(tuple(int(v) for v in g["coords"][i]), 0, (128, 128)))
        np.testing.assert_array_equal(g["tiles"][i], ref[..., :3])


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from dsf.synth import write_synthetic_slide

    d = tmp_path_factory.mktemp("synth")
    spec = {"seed": 11, "width": 2048, "height": 1536, "mpp": 0.5, "region_um": 150}
    write_synthetic_slide(
        d / "s.tiff",
        tile=256,
        quality=90,
        labels_tiff=d / "s.labels.tiff",
        labels_geojson=d / "s.geojson",
        label_downsample=4,
        **spec,
    )
    geojson_as_aperio(d / "s.geojson", d / "s.xml")
    return {"dir": d, **spec}


@pytest.mark.parametrize("labels_file", ["s.labels.tiff", "s.geojson", "s.xml"])
def test_synthetic_labels_align_with_ground_truth(synth_slide: dict, labels_file: str) -> None:
    from dsf.synth_tissue import render_labels
    from dsf.tissue import detect_tissue

    d = synth_slide["dir"]
    slide = open_slide(d / "s.tiff")
    assert slide.mpp == pytest.approx(0.5)
    mask, _ = detect_tissue(slide.thumbnail(8.0), 8.0, defaults("tissue"))
    classes = defaults("labels") | {"classes": ["ignore", "TUM", "STR", "LYM"]}
    labels = open_labels(d / labels_file, "s", slide.dimensions, slide.mpp, classes)
    st = _settings(target_mpp=1.0, block=16, stride=48, min_tissue=0.5)
    out = d / f"{labels_file}.zarr"
    n, _, labs, _, coords = _cut_labelled(slide, mask, out, st, classes, labels)
    agree = []
    for i in range(n):
        x, y = (int(v) for v in coords[i])
        truth = render_labels(
            synth_slide["seed"],
            x,
            y,
            64,
            64,
            0.5,
            downsample=2.0,
            region_um=synth_slide["region_um"],
            slide_width=2048,
            slide_height=1536,
        )
        agree.append((labs[i] == truth).mean())
    # the mask is 4x coarser than level 0 (edges differ by a few px); GeoJSON is traced from it
    assert np.mean(agree) > 0.97 and np.min(agree) > 0.85
    assert set(np.unique(labs)) >= {1, 2, 3}
