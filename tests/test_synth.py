"""Synthetic slides: determinism, the Aperio-style file OpenSlide reads, labels and GeoJSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage
from skimage.draw import polygon

from dsf import synth, synth_tissue
from dsf.colours import class_colours
from dsf.synth import main
from dsf.synth_tissue import CLASS_NAMES, STR, TUM, render_labels, render_region

LYM = 3

# a small slide with many regions: 1024 x 768 px at 0.5 um/px, regions of about 120 um
SMALL = {"seed": 3, "width": 1024, "height": 768, "mpp": 0.5, "region_um": 120.0}
TILE, QUALITY, LABEL_DS = 128, 90, 4


def _dims(spec: dict) -> dict:
    return {"slide_width": spec["width"], "slide_height": spec["height"]}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small slide written once, with its label mask and GeoJSON."""
    folder = tmp_path_factory.mktemp("synth")
    paths = {
        "slide": folder / "small.tiff",
        "mask": folder / "small.labels.tiff",
        "geojson": folder / "small.geojson",
    }
    synth.write_synthetic_slide(
        paths["slide"],
        tile=TILE,
        quality=QUALITY,
        labels_tiff=paths["mask"],
        labels_geojson=paths["geojson"],
        label_downsample=LABEL_DS,
        **SMALL,
    )
    return paths


def _render(spec: dict, x0: float, y0: float, w: int, h: int, ds: float = 1.0):
    return render_region(
        spec["seed"], x0, y0, w, h, spec["mpp"], ds, spec["region_um"], **_dims(spec)
    )


# -- the procedure ---------------------------------------------------------------------------------
def test_deterministic_per_seed() -> None:
    a_rgb, a_lab = _render(SMALL, 100, 50, 300, 200)
    b_rgb, b_lab = _render(SMALL, 100, 50, 300, 200)
    assert a_rgb.dtype == np.uint8 and a_rgb.shape == (200, 300, 3)
    assert a_lab.dtype == np.uint8 and a_lab.shape == (200, 300)
    np.testing.assert_array_equal(a_rgb, b_rgb)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_rgb, _ = _render({**SMALL, "seed": 4}, 100, 50, 300, 200)
    assert np.abs(c_rgb.astype(int) - a_rgb).mean() > 5


def test_pieces_agree_with_the_whole() -> None:
    """Cut at odd places across chunk, tissue, region and rim boundaries: identical pixels."""
    spec = {"seed": 11, "width": 4000, "height": 3000, "mpp": 0.25, "region_um": 60.0}
    x0, y0, w, h = 130, 170, 700, 300  # reaches into the background at the top left
    rgb, lab = _render(spec, x0, y0, w, h)
    assert {0, TUM, STR, LYM} <= set(np.unique(lab).tolist())
    _, rim = synth_tissue._region_raster(
        spec["seed"], x0, y0, w, h, spec["mpp"], spec["region_um"], **_dims(spec)
    )
    assert (rim > 0).any()
    for cx, cy in [(333, 129), (517, 1), (1, 299)]:
        for (c0, c1), (r0, r1) in [
            ((0, cx), (0, cy)),
            ((cx, w), (0, cy)),
            ((0, cx), (cy, h)),
            ((cx, w), (cy, h)),
        ]:
            part_rgb, part_lab = _render(spec, x0 + c0, y0 + r0, c1 - c0, r1 - r0)
            np.testing.assert_array_equal(part_rgb, rgb[r0:r1, c0:c1])
            np.testing.assert_array_equal(part_lab, lab[r0:r1, c0:c1])


def test_labels_alone_match_render_region() -> None:
    for ds in (1.0, 4.0):
        _, lab = _render(SMALL, 40, 20, 120, 90, ds)
        alone = render_labels(
            SMALL["seed"], 40, 20, 120, 90, SMALL["mpp"], ds, SMALL["region_um"], **_dims(SMALL)
        )
        np.testing.assert_array_equal(alone, lab)


def test_downsampled_render_looks_like_an_area_average() -> None:
    full, _ = _render(SMALL, 0, 0, 512, 384)
    small, _ = _render(SMALL, 0, 0, 128, 96, 4.0)
    average = full.reshape(96, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(average - small).mean() < 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_classes_and_a_realistic_tissue_fraction(seed: int) -> None:
    spec = {"seed": seed, "width": 3000, "height": 3000, "mpp": 0.5, "region_um": 400.0}
    lab = render_labels(seed, 0, 0, 750, 750, 0.5, 4.0, 400.0, **_dims(spec))
    assert set(np.unique(lab).tolist()) == {0, TUM, STR, LYM}
    assert 0.25 <= (lab > 0).mean() <= 0.75
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    assert (border == 0).all(), "tissue stays off the slide border"


def test_tum_and_lym_differ_only_by_the_rim() -> None:
    """Region interiors of TUM and LYM share colour and nucleus density; only TUM has a rim."""
    spec = {"seed": 6, "width": 6000, "height": 6000, "mpp": 0.5, "region_um": 200.0}
    x0, y0, w, h = 1500, 1500, 1500, 1500
    rgb, lab = _render(spec, x0, y0, w, h)
    region, rim = synth_tissue._region_raster(
        spec["seed"], x0, y0, w, h, spec["mpp"], spec["region_um"], **_dims(spec)
    )
    edge = np.zeros(region.shape, bool)
    edge[1:] |= region[1:] != region[:-1]
    edge[:, 1:] |= region[:, 1:] != region[:, :-1]
    depth = ndimage.distance_transform_edt(~edge) * spec["mpp"]  # um to a region boundary
    outside = ndimage.distance_transform_edt(lab > 0) * spec["mpp"]  # um to background
    rim_um = spec["region_um"] / 12
    interior = (depth > rim_um + 10) & (outside > 30)
    band = (depth < rim_um * 0.8) & (depth > 2) & (outside > 30)
    nuclei = rgb[..., 0] < 140
    grey = rgb.astype(float).mean(axis=-1)
    stats = {}
    for cls in (TUM, LYM):
        sel = interior & (lab == cls)
        assert sel.sum() > 20_000
        stats[cls] = (rgb[sel].mean(axis=0), nuclei[sel].mean())
    colour_gap = np.abs(stats[TUM][0] - stats[LYM][0]) / stats[LYM][0]
    assert colour_gap.max() < 0.03, colour_gap
    assert abs(stats[TUM][1] - stats[LYM][1]) < 0.03
    assert (rim[lab == LYM] == 0).all() and (rim[lab == STR] == 0).all()
    tum_band, lym_band = band & (lab == TUM), band & (lab == LYM)
    assert rim[tum_band].mean() > 0.9
    assert grey[tum_band].mean() < grey[interior & (lab == TUM)].mean() - 20
    assert abs(grey[lym_band].mean() - grey[interior & (lab == LYM)].mean()) < 4


# -- the slide file --------------------------------------------------------------------------------
def test_openslide_reads_an_aperio_pyramid(small: dict[str, Path]) -> None:
    slide = openslide.OpenSlide(small["slide"])
    props = slide.properties
    assert props["openslide.vendor"] == "aperio"
    assert float(props["openslide.mpp-x"]) == pytest.approx(SMALL["mpp"])
    assert float(props["openslide.mpp-y"]) == pytest.approx(SMALL["mpp"])
    assert props["openslide.objective-power"] == "20"
    assert slide.level_dimensions == ((1024, 768), (256, 192))
    assert slide.level_downsamples == pytest.approx((1.0, 4.0))
    assert "thumbnail" in slide.associated_images
    for level, (x, y, n) in enumerate([(300, 200, 400), (40, 30, 150)]):
        ds = slide.level_downsamples[level]
        got = np.asarray(slide.read_region((int(x * ds), int(y * ds)), level, (n, n)))
        want, _ = _render(SMALL, x * ds, y * ds, n, n, ds)
        assert np.abs(got[..., :3].astype(int) - want).mean() < 6, level


def test_tiff_layout(small: dict[str, Path]) -> None:
    with tifffile.TiffFile(small["slide"]) as tif:
        level0, thumb, level1 = tif.pages
        assert level0.is_tiled and level1.is_tiled and not thumb.is_tiled
        assert level0.tilewidth == TILE and level0.compression == 7
        assert level0.description.startswith(
            "Aperio Image Library v10.0.0\r\n1024x768 [0,0 1024x768] (128x128) JPEG/RGB Q=90|"
            "AppMag = 20|MPP = 0.5000"
        )
        assert "-> 256x192" in level1.description
        for page, ds in ((level0, 1), (level1, 4)):
            assert page.tags["ResolutionUnit"].value == 3  # centimetre
            x_res = page.tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1e4 / (SMALL["mpp"] * ds), rel=1e-3)
        assert [s.name for s in tif.series] == ["Baseline", "Thumbnail"]
        assert len(tif.series[0].levels) == 2


def test_objective_power_follows_mpp(tmp_path: Path) -> None:
    path = tmp_path / "forty.tiff"
    synth.write_synthetic_slide(
        path, seed=1, width=256, height=192, mpp=0.25, tile=64, quality=80, region_um=50.0
    )
    slide = openslide.OpenSlide(path)
    assert slide.properties["openslide.objective-power"] == "40"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert [p.name for p in tmp_path.iterdir()] == ["forty.tiff"]


def test_pyramid_levels_and_bigtiff() -> None:
    spec = synth._Spec(1, 40_000, 30_000, 0.25, 256, 90, 400.0)
    assert spec.levels() == [(40_000, 30_000), (10_000, 7_500), (2_500, 1_875), (625, 468)]
    assert spec.magnification == 40 and spec.bigtiff()
    assert synth._Spec(1, 1024, 768, 0.5, 256, 90, 400.0).levels() == [(1024, 768)]
    assert not synth._Spec(1, 10_000, 10_000, 0.5, 256, 90, 400.0).bigtiff()


# -- annotations -----------------------------------------------------------------------------------
def test_label_tiff(small: dict[str, Path]) -> None:
    with tifffile.TiffFile(small["mask"]) as tif:
        page = tif.pages[0]
        mask = page.asarray()
        assert page.is_tiled and page.compression in (8, 32946)  # deflate
        assert page.tags["ResolutionUnit"].value == 3
        x_res = page.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / (SMALL["mpp"] * LABEL_DS), rel=1e-3)
    shape = (math.ceil(768 / LABEL_DS), math.ceil(1024 / LABEL_DS))
    assert mask.shape == shape and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}
    _, want = _render(SMALL, 0, 0, shape[1], shape[0], LABEL_DS)
    np.testing.assert_array_equal(mask, want)


def _rasterise(collection: dict, shape: tuple[int, int], ds: float) -> np.ndarray:
    """Outer ring filled, hole rings cleared, at pixel centres of a raster at downsample ds."""
    codes = {name: cls for cls, name in CLASS_NAMES.items()}
    out = np.zeros(shape, np.uint8)
    for feature in collection["features"]:
        mask = np.zeros(shape, bool)
        for i, ring in enumerate(feature["geometry"]["coordinates"]):
            xy = np.asarray(ring) / ds - 0.5
            rr, cc = polygon(xy[:, 1], xy[:, 0], shape)
            mask[rr, cc] = i == 0
        out[mask] = codes[feature["properties"]["classification"]["name"]]
    return out


def test_geojson_is_qupath_shaped_and_matches_the_mask(small: dict[str, Path]) -> None:
    collection = json.loads(small["geojson"].read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert {f["properties"]["classification"]["name"] for f in features} == {"TUM", "STR", "LYM"}
    for feature in features:
        assert feature["type"] == "Feature"
        assert feature["properties"]["objectType"] == "annotation"
        # the maps' colours of the same class: truth and predictions look alike in QuPath
        cls = ["ignore", "TUM", "STR", "LYM"].index(feature["properties"]["classification"]["name"])
        assert feature["properties"]["classification"]["color"] == class_colours(4)[cls].tolist()
        assert feature["geometry"]["type"] == "Polygon"
        for ring in feature["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            xy = np.asarray(ring)
            assert (xy >= 0).all() and (xy[:, 0] <= 1024).all() and (xy[:, 1] <= 768).all()
    mask = tifffile.imread(small["mask"])
    assert (_rasterise(collection, mask.shape, LABEL_DS) == mask).mean() >= 0.97


def test_geojson_holes() -> None:
    """A component with a hole gives an outer ring and a hole ring that rasterise back."""
    labels = np.zeros((40, 50), np.uint8)
    labels[5:35, 5:45] = STR
    labels[15:25, 20:30] = TUM
    features = synth.annotation_features(labels, 2.0)
    stroma = [f for f in features if f["properties"]["classification"]["name"] == "STR"]
    assert len(stroma) == 1 and len(stroma[0]["geometry"]["coordinates"]) == 2
    back = _rasterise({"features": features}, labels.shape, 2.0)
    assert (back == labels).mean() >= 0.97


# -- command line and failure ----------------------------------------------------------------------
def test_cli_writes_all_outputs_and_no_partials(tmp_path: Path) -> None:
    out = tmp_path / "cli" / "s.tiff"
    args = ["--out", str(out), "--seed", "2", "--width", "320", "--height", "256"]
    args += ["--labels-tiff", str(out.with_suffix(".labels.tiff"))]
    args += ["--labels-geojson", str(out.with_suffix(".geojson")), "--tile", "64"]
    assert main(args) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "s.geojson",
        "s.labels.tiff",
        "s.tiff",
    ]
    slide = openslide.OpenSlide(out)
    assert slide.properties["openslide.objective-power"] == "40"  # the schema's mpp 0.25


def test_cli_rejects_a_bad_tile(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "s.tiff"), "--seed", "1", "--width", "64", "--height", "64"]
    assert main([*args, "--tile", "40"]) == 2
    assert not list(tmp_path.iterdir())


def test_cli_refuses_outputs_that_overwrite_each_other_or_a_misnamed_slide(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--labels-geojson` naming the slide itself had replaced the slide with GeoJSON, and
    `--out c.png` wrote a TIFF under a PNG name; both exit 2 with nothing written."""
    args = ["--seed", "1", "--width", "64", "--height", "64", "--tile", "64"]
    slide = tmp_path / "d.tiff"
    assert main(["--out", str(slide), *args, "--labels-geojson", str(slide)]) == 2
    assert f"outputs {slide} and {slide} are one file" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "c.png"), *args]) == 2
    assert "name it .tif or .tiff" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed")
        return render_region(*args, **kwargs)

    monkeypatch.setattr(synth, "render_region", broken)
    with pytest.raises(RuntimeError):
        synth.write_synthetic_slide(
            tmp_path / "s.tiff", seed=1, width=256, height=256, mpp=0.5, tile=64, quality=80,
            region_um=50.0,
        )  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_a_rerun_clears_leftovers_of_a_killed_run(tmp_path: Path) -> None:
    (tmp_path / "s.tiff.partial").write_bytes(b"half a slide")
    (tmp_path / ".s.tiff.scratch").mkdir()
    (tmp_path / ".s.tiff.scratch" / "level1.raw").write_bytes(b"rows")
    synth.write_synthetic_slide(
        tmp_path / "s.tiff", seed=1, width=128, height=96, mpp=0.5, tile=32, quality=80,
        region_um=50.0,
    )  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["s.tiff"]


def test_a_synthetic_label_mask_is_read_by_its_class_names(small: dict[str, Path]) -> None:
    """Its description names its codes (1 TUM, 2 STR, 3 LYM): with labels.classes in another
    order the mask still agrees with its GeoJSON (the codes had been taken as indices, which
    swapped TUM and LYM)."""
    from dsf.annotations import open_labels
    from dsf.config import defaults

    size, mpp = (SMALL["width"], SMALL["height"]), SMALL["mpp"]
    settings = defaults("labels") | {"classes": ["ignore", "LYM", "STR", "TUM"]}
    mask = open_labels(small["mask"], "small", size, mpp, settings)
    polygons = open_labels(small["geojson"], "small", size, mpp, settings)
    a, b = (src.read(0, 0, 256, 192, mpp * 4) for src in (mask, polygons))
    labelled = (a > 0) & (b > 0)
    assert labelled.sum() > 1000 and (a[labelled] == b[labelled]).mean() > 0.95
