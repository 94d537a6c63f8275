"""Slide access on real scanner files, synthetic TIFF layouts and broken files."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from dsf.errors import ConfigError, SlideError
from dsf.slide import check_resolutions, describe_slide, open_slide


def _box_down(a: np.ndarray, k: int) -> np.ndarray:
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    return a[:h, :w].reshape(h // k, k, w // k, k, 3).mean((1, 3))


def test_cmu_aperio_metadata_and_exact_pixels(real: Path) -> None:
    s = open_slide(real / "CMU-1-Small-Region.svs")
    assert s.backend_name == "openslide"
    assert s.mpp == pytest.approx(0.499)
    assert s.dimensions == (2220, 2967)
    assert s.objective_power == 20
    osr = openslide.OpenSlide(str(real / "CMU-1-Small-Region.svs"))
    ref = np.asarray(osr.read_region((700, 900), 0, (300, 200)))[..., :3]
    got = s.read(700, 900, 300, 200, 0.499)
    assert got.shape == (200, 300, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)


def test_cmu_coarser_read_is_downsampled_full_resolution(real: Path) -> None:
    s = open_slide(real / "CMU-1-Small-Region.svs")
    full = s.read(400, 800, 1024, 1024, s.mpp)
    coarse = s.read(400, 800, 256, 256, s.mpp * 4)
    diff = np.abs(coarse.astype(float) - _box_down(full, 4))
    assert diff.mean() < 1.0


def test_tcga_needs_sheet_mpp_and_reads_its_pyramid(real: Path) -> None:
    path = real / "TCGA-CR-7395-01A-01-TS1.histolab.svs"
    with pytest.raises(SlideError) as err:
        open_slide(path, slide_id="TCGA-CR-7395")
    assert "TCGA-CR-7395" in str(err.value) and "`mpp` column" in str(err.value)
    s = open_slide(path, mpp=2.0, slide_id="TCGA-CR-7395")
    assert s.dimensions == (4443, 3567)
    assert len(s.levels) == 2 and s.levels[1].downsample == pytest.approx(2.001, abs=1e-3)
    assert s.best_level(4.0) == 1  # level 1 serves a 2x coarser request as it is
    full = s.read(1600, 1200, 800, 800, 2.0)
    coarse = s.read(1600, 1200, 400, 400, 4.0)
    # Level 1 is the scanner's own lossy (JPEG 2000 Q70) downsample, half a pixel off ours:
    # it matches ours where compression noise is averaged out, and a 2 px shift is much worse.
    diff = np.abs(_box_down(coarse.astype(float), 4) - _box_down(full, 8))
    assert diff.mean() < 5.0
    shifted = s.read(1600 - 8, 1200 - 8, 400, 400, 4.0)
    assert np.abs(_box_down(shifted.astype(float), 4) - _box_down(full, 8)).mean() > 8.0


def test_tiny_aperio_fixture(real: Path) -> None:
    s = open_slide(real / "openslide-python-fixtures" / "small.svs")
    assert s.dimensions == (16, 16) and s.mpp == pytest.approx(0.499)
    assert s.read(0, 0, 16, 16, s.mpp).shape == (16, 16, 3)


@pytest.mark.parametrize("name", ["tissue-level0-4302-10273-4814-10785.png", "no-tissue.png"])
def test_plain_image_regions_need_sheet_mpp(real: Path, name: str) -> None:
    path = real / "histolab-tiles" / name
    with pytest.raises(SlideError, match="mpp"):
        open_slide(path)
    s = open_slide(path, mpp=0.5)
    assert s.backend_name == "image"
    rgb = s.read(0, 0, *s.dimensions, 0.5)
    ref = np.asarray(Image.open(path).convert("RGBA"))
    opaque = ref[..., 3] == 255
    np.testing.assert_array_equal(rgb[opaque], ref[..., :3][opaque])


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("openslide-python-fixtures/unreadable.svs", ["unreadable", "corrupt", "Bogus marker"]),
        ("openslide-python-fixtures/unopenable.tiff", ["unopenable", "compression"]),
    ],
)
def test_broken_files_fail_with_a_clear_message(real: Path, name: str, words: list[str]) -> None:
    with pytest.raises(SlideError) as err:
        open_slide(real / name)
    for word in words:
        assert word in str(err.value)


def test_non_image_and_missing_files(tmp_path: Path, real: Path) -> None:
    fake = tmp_path / "notes.svs"
    shutil.copy(real / "README.md", fake)
    with pytest.raises(SlideError, match="'notes'.*not a slide format"):
        open_slide(fake)
    with pytest.raises(SlideError, match="'gone'.*not found.*`path` column"):
        open_slide(tmp_path / "gone.svs")
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes((real / "CMU-1-Small-Region.svs").read_bytes()[:200_000])
    with pytest.raises(SlideError, match="'cut'"):
        open_slide(truncated)


def test_bad_sheet_mpp(real: Path) -> None:
    with pytest.raises(SlideError, match="positive number"):
        open_slide(real / "CMU-1-Small-Region.svs", mpp=-1.0)


def test_reads_outside_the_slide_are_background(real: Path) -> None:
    s = open_slide(real / "CMU-1-Small-Region.svs")
    w, h = s.dimensions
    edge = s.read(w - 50, h - 50, 100, 100, s.mpp)
    assert (edge[50:, :] == 255).all() and (edge[:, 50:] == 255).all()
    np.testing.assert_array_equal(edge[:50, :50], s.read(w - 50, h - 50, 50, 50, s.mpp))


def _ome_pyramid(path: Path, rgb: np.ndarray, mpp: float) -> None:
    with tifffile.TiffWriter(path, ome=True) as tw:
        opts = {"tile": (128, 128), "compression": "zlib", "photometric": "rgb"}
        tw.write(
            rgb,
            subifds=1,
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            **opts,
        )
        tw.write(rgb[::2, ::2], subfiletype=1, **opts)


def _pattern(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)


def test_ome_tiff_pyramid_via_tifffile(tmp_path: Path) -> None:
    rgb = _pattern(600, 900)
    path = tmp_path / "roi.ome.tif"
    _ome_pyramid(path, rgb, 0.25)
    s = open_slide(path)
    assert s.backend_name == "tiff"
    assert s.mpp == pytest.approx(0.25)
    assert [(lv.width, lv.height) for lv in s.levels] == [(900, 600), (450, 300)]
    np.testing.assert_array_equal(s.read(100, 50, 200, 100, 0.25), rgb[50:150, 100:300])
    # level 1 is served as it is for a 2x coarser request
    np.testing.assert_array_equal(s.read(100, 50, 100, 50, 0.5), rgb[::2, ::2][25:75, 50:150])


@pytest.mark.parametrize("ome", [True, False], ids=["ome", "generic-tiff"])
def test_the_largest_image_is_the_slide_when_a_macro_comes_first(tmp_path: Path, ome: bool) -> None:
    """A converter may write the macro (overview) image before the scan: the first image had
    been read as the slide (OpenSlide's generic TIFF reader too), with the macro's 20 um/px."""
    rgb, macro = _pattern(600, 900), np.full((120, 300, 3), 200, np.uint8)
    path = tmp_path / ("m.ome.tif" if ome else "m.tif")
    with tifffile.TiffWriter(path, ome=ome) as tw:
        for image, mpp, name in ((macro, 20.0, "macro"), (rgb, 0.25, "scan")):
            tags = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
            meta = {"axes": "YXS", "Name": name, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
            tw.write(
                image, photometric="rgb", tile=(64, 64), subifds=int(image is rgb and ome),
                **({"metadata": meta} if ome else tags),
            )  # fmt: skip
        if ome:
            tw.write(rgb[::2, ::2], photometric="rgb", tile=(64, 64), subfiletype=1)
    s = open_slide(path)
    assert (s.backend_name, s.dimensions, s.mpp) == ("tiff", (900, 600), pytest.approx(0.25))
    assert len(s.levels) == (2 if ome else 1)
    np.testing.assert_array_equal(s.read(100, 50, 200, 100, 0.25), rgb[50:150, 100:300])


def test_a_dicom_wsi_folder_reads_through_openslide(tmp_path: Path, real: Path) -> None:
    """DICOM VL Whole Slide Microscopy (Imaging Data Commons' format): a folder of one series'
    instances is a slide, its first level instance stands in, and any instance opens the whole
    series; levels and the mpp (from the pixel spacing) come from the level instances."""
    from dicom_wsi import ANNOTATIONS, write_dicom_slide, write_instance

    from dsf.scan import scan_folder
    from dsf.slide import describe_slide

    with open_slide(real / "CMU-1-Small-Region.svs") as src:
        rgb = src.read(600, 900, 700, 500, src.mpp)
    paths = write_dicom_slide(tmp_path / "case-7", rgb, mpp=0.5, patient="P-1")
    (tmp_path / "case-7.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    # another slide of that patient, and a series of annotations (not a slide)
    write_dicom_slide(tmp_path / "SM_1.2.3", rgb[:256, :256], mpp=0.5, patient="P-1")
    # Imaging Data Commons names a folder by the series UUID: the slide's barcode names it
    uuid = "SM_3f2a9c1e-7b4d-4e8a-9c2f-0123456789ab"
    write_dicom_slide(tmp_path / uuid, rgb[:256, :256], mpp=0.5, container="TCGA-AA-3549-01Z")
    (tmp_path / "TCGA-AA-3549-01Z.geojson").write_text('{"type": "FeatureCollection"}')
    (tmp_path / "ANN_4.5.6").mkdir()
    write_instance(
        tmp_path / "ANN_4.5.6" / "a.dcm", rgb[:64, :64], image_type=["DERIVED"], mpp=0.5,
        tile=64, series="4.5.6", study="7.8", patient="P-1", sop_class=ANNOTATIONS,
    )  # fmt: skip
    (tmp_path / "case-7" / "000-broken.dcm").write_bytes(b"DICM")  # skipped: slides follow
    rows = {r["slide"]: r for r in scan_folder(tmp_path)}
    assert set(rows) == {"case-7", "SM_1.2.3", "TCGA-AA-3549-01Z"}
    barcode = rows["TCGA-AA-3549-01Z"]
    assert Path(barcode["path"]).parent.name == uuid
    assert barcode["labels"] == str(tmp_path / "TCGA-AA-3549-01Z.geojson")
    assert barcode["group"] == "TCGA-AA-3549"  # no PatientID: the barcode's patient
    row = rows["case-7"]
    assert row["path"] == str(paths[1]) and row["labels"] == str(tmp_path / "case-7.geojson")
    assert row["group"] == rows["SM_1.2.3"]["group"] == "P-1"  # one patient: one fold
    s = open_slide(row["path"], slide_id=row["slide"])
    assert s.backend_name == "openslide" and s.properties["openslide.vendor"] == "dicom"
    assert s.mpp == pytest.approx(0.5) and s.objective_power == 20
    assert [(lv.width, lv.height) for lv in s.levels] == [(700, 500), (350, 250)]
    assert np.abs(s.read(0, 0, 700, 500, 0.5).astype(float) - rgb).mean() < 5  # JPEG q95, 4:2:2
    assert s.best_level(1.0) == 1  # 2x coarser is served from the level below
    assert np.abs(s.read(0, 0, 350, 250, 1.0) - _box_down(rgb, 2)).mean() < 5
    facts = describe_slide(paths[0])  # the label instance opens the same slide
    assert (facts.reader, facts.width, facts.levels) == ("openslide (dicom)", 700, 2)
    # two slides' instances in one folder: which is meant cannot be told, so the scan stops
    for f in (tmp_path / "SM_1.2.3").iterdir():
        f.rename(tmp_path / "case-7" / f"other-{f.name}")
    with pytest.raises(ConfigError, match=r"case-7 holds 2 DICOM slides.*folder of its own"):
        scan_folder(tmp_path)


def test_a_zeiss_czi_slide_of_two_scenes_reads_through_openslide(
    tmp_path: Path, real: Path
) -> None:
    """A Zeiss CZI (Axio Scan) is found by its suffix and read through OpenSlide: level 0
    exactly, its coarser levels, the mpp from its metadata; the glass between its scenes (tissue
    sections), which it does not store, reads as background and is no tissue."""
    from czi_slide import write_czi

    from dsf.config import defaults
    from dsf.scan import scan_folder
    from dsf.tissue import detect_tissue

    with open_slide(real / "CMU-1-Small-Region.svs") as src:
        rgb = src.read(600, 900, 1024, 768, src.mpp)
    second = rgb[:512, :512].copy()
    path = tmp_path / "axio 7.czi"
    write_czi(path, [(5000, 3000, rgb), (7000, 3000, second)], mpp=0.22)
    (tmp_path / "axio 7.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    [row] = scan_folder(tmp_path)
    assert (row["slide"], row["path"]) == ("axio_7", str(path))
    assert row["labels"] == str(tmp_path / "axio 7.geojson")
    s = open_slide(path)
    assert s.properties["openslide.vendor"] == "zeiss" and s.mpp == pytest.approx(0.22)
    assert [(lv.width, lv.height) for lv in s.levels] == [(2512, 768), (628, 192)]
    np.testing.assert_array_equal(s.read(0, 0, 1024, 768, 0.22), rgb)
    np.testing.assert_array_equal(s.read(2000, 0, 512, 512, 0.22), second)
    assert s.best_level(0.88) == 1
    assert np.abs(s.read(0, 0, 256, 192, 0.88) - _box_down(rgb, 4)).mean() < 1
    gap = s.read(1100, 0, 800, 768, 0.22)
    assert (gap == 255).all()  # no scene there: background, as OpenSlide's transparent pixels
    thumb = s.read(0, 0, 69, 21, 8.0)  # scenes at columns 0-28 and 55-69 of 8 um/px
    mask, _ = detect_tissue(thumb, 8.0, defaults("tissue") | {"min_object_um2": 0})
    cols = mask.any(axis=0)
    assert cols[:28].any() and not cols[29:55].any() and cols[56:].any()


def test_stripped_tiff_with_inch_resolution_and_threads(tmp_path: Path) -> None:
    rgb = _pattern(300, 400)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(
        path,
        rgb,
        photometric="rgb",
        rowsperstrip=16,
        resolution=(25400 / 0.5, 25400 / 0.5),
        resolutionunit="INCH",
    )
    s = open_slide(path)
    assert s.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(s.read(10, 20, 30, 40, 0.5), rgb[20:60, 10:40])

    def crop(i: int) -> np.ndarray:
        return s.read(i * 7, i * 5, 64, 64, 0.5)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(crop, range(20)))
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, rgb[i * 5 : i * 5 + 64, i * 7 : i * 7 + 64])


@pytest.mark.parametrize("tiled", [False, True], ids=["strips-tifffile", "tiles-openslide"])
@pytest.mark.parametrize("dpi", [72, 300, 600])
def test_default_dpi_is_not_a_resolution(tmp_path: Path, dpi: int, tiled: bool) -> None:
    """Software writes 72, 300 or 600 dpi into images it saves: 353, 85 or 42 um/px, never a
    scan. Through either reader (OpenSlide reads tiled generic TIFFs' resolution tags too)."""
    path = tmp_path / f"dpi{dpi}.tif"
    tile = {"tile": (64, 64)} if tiled else {}
    tifffile.imwrite(
        path, _pattern(128, 128), photometric="rgb", resolution=(dpi, dpi),
        resolutionunit="INCH", **tile,
    )  # fmt: skip
    with pytest.raises(SlideError, match=r"default DPI.*`mpp` column") as err:
        open_slide(path)
    assert f"{25400 / dpi:.4g} um/px" in str(err.value)
    s = open_slide(path, mpp=1.0)
    assert s.mpp == 1.0 and s.backend_name == ("openslide" if tiled else "tiff")


@pytest.mark.parametrize(
    ("size", "unit", "mpp"),
    [(500.0, "nm", 0.5), (5000.0, "Å", 0.5), (0.5, "\u03bcm", 0.5), (0.5, "pixel", None)],
)
def test_ome_sizes_are_read_in_their_unit(
    tmp_path: Path, size: float, unit: str, mpp: float | None
) -> None:
    """Every OME length unit is converted (Å had been taken for um: 5000 um/px); a unit that
    is no length ('pixel') states no resolution, so the sheet must give it."""
    path = tmp_path / "u.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit}
    meta |= {"PhysicalSizeY": size, "PhysicalSizeYUnit": unit}
    tifffile.imwrite(path, _pattern(64, 64), ome=True, photometric="rgb", metadata=meta)
    if mpp is None:
        with pytest.raises(SlideError, match=r"`mpp` column"):
            open_slide(path)
    else:
        assert open_slide(path).mpp == pytest.approx(mpp)


@pytest.mark.parametrize("ome", [False, True])
def test_non_square_pixels_are_refused_unless_the_sheet_says(
    tmp_path: Path, ome: bool, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ("ns.ome.tif" if ome else "ns.tif")
    rgb = _pattern(128, 128)
    if ome:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 1.0}
        tifffile.imwrite(path, rgb, ome=True, photometric="rgb", tile=(64, 64), metadata=meta)
    else:  # X 0.5 um, Y 1 um, in pixels per centimetre
        tifffile.imwrite(
            path, rgb, photometric="rgb", tile=(64, 64), resolution=(2e4, 1e4),
            resolutionunit="CENTIMETER",
        )  # fmt: skip
    with pytest.raises(SlideError, match=r"not square \(0.5 x 1 um\).*resample") as err:
        open_slide(path)
    assert "`mpp` column" not in str(err.value)  # one um/px reads such pixels wrong
    assert open_slide(path, mpp=0.5).mpp == 0.5
    with caplog.at_level("WARNING", logger="dsf"):  # and said at the start of a run
        check_resolutions({"ns": (str(path), 0.5)})
    assert "ns (the sheet's 0.5 um/px is read, but its " in caplog.text
    square = tmp_path / "sq.tif"  # a scanner's rounding (0.2527 x 0.2529) is square
    tifffile.imwrite(
        square, rgb, photometric="rgb", tile=(64, 64),
        resolution=(1e4 / 0.2527, 1e4 / 0.2529), resolutionunit="CENTIMETER",
    )  # fmt: skip
    assert open_slide(square).mpp == pytest.approx(0.2527)


@pytest.mark.parametrize(
    ("data", "axes", "words"),
    [
        (np.zeros((3, 64, 64), np.uint16), "CYX", "3 channels of uint16 grey values"),
        (np.zeros((4, 64, 64), np.uint8), "CYX", "4 channels of uint8 grey values"),
        (np.zeros((64, 64), np.uint16), "YX", "one uint16 grey channel"),
    ],
    ids=["fluorescence-3", "multiplex-4", "grey16"],
)
def test_fluorescence_is_refused(tmp_path: Path, data: np.ndarray, axes: str, words: str) -> None:
    """Grey channels are not an RGB scan: read as one, 12-bit data in uint16 came out black and
    a 4th channel was taken for alpha, and the tissue and patch stages ran on that silently."""
    path = tmp_path / "fluo.ome.tif"
    meta = {"axes": axes, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    tifffile.imwrite(path, data, ome=True, photometric="minisblack", tile=(64, 64), metadata=meta)
    with pytest.raises(SlideError, match=rf"'fluo'.*{words}.*brightfield"):
        open_slide(path)
    palette = tmp_path / "map.tif"  # a class map (palette indices) given as a slide
    cmap = np.zeros((3, 256), np.uint16)
    tifffile.imwrite(palette, np.zeros((64, 64), np.uint8), photometric="palette", colormap=cmap)
    with pytest.raises(SlideError, match=r"palette indices.*not an RGB scan"):
        open_slide(palette, mpp=0.5)
    # YCbCr samples stored uncompressed: tifffile gives them as they are (they had been read
    # as RGB, false colours); JPEG-compressed YCbCr decodes to RGB and is read
    ycc = tmp_path / "ycc.tif"
    rgb = np.full((64, 64, 3), (200, 100, 50), np.uint8)
    tifffile.imwrite(ycc, rgb, photometric="ycbcr", subsampling=(1, 1))
    with pytest.raises(SlideError, match=r"YCbCr stored without JPEG compression.*convert"):
        open_slide(ycc, mpp=0.5)
    jpeg = tmp_path / "ycc-jpeg.tif"
    tifffile.imwrite(jpeg, rgb, photometric="rgb", compression="jpeg", rowsperstrip=16)
    assert tifffile.TiffFile(jpeg).pages[0].photometric == 6  # JPEG stores YCbCr
    stripped = open_slide(jpeg, mpp=0.5)  # stripped: read by tifffile, not OpenSlide
    assert stripped.backend_name == "tiff"
    got = stripped.read(0, 0, 64, 64, 0.5)
    assert np.abs(got.astype(int) - rgb).max() < 8
    grey = tmp_path / "grey8.tif"  # an 8-bit grey scan is read as grey RGB
    tifffile.imwrite(grey, _pattern(64, 64)[..., 0], photometric="minisblack")
    s = open_slide(grey, mpp=0.5)
    np.testing.assert_array_equal(s.read(0, 0, 64, 64, 0.5)[..., 1], _pattern(64, 64)[..., 0])


@pytest.mark.parametrize(
    ("data", "kw", "words"),
    [
        (np.zeros((64, 64), np.uint16), {"photometric": "minisblack"}, "one uint16 grey"),
        (
            np.zeros((3, 64, 64), np.uint8),
            {"photometric": "minisblack", "planarconfig": "separate"},
            "3 channels of uint8 grey",
        ),
        (np.zeros((64, 64, 4), np.uint8), {"photometric": "separated"}, "CMYK"),
        (
            np.zeros((64, 64), np.uint8),
            {"photometric": "palette", "colormap": np.zeros((3, 256), np.uint16)},
            "palette indices",
        ),
    ],
    ids=["grey16", "channels", "cmyk", "palette"],
)
def test_tiled_tiffs_that_are_no_scan_are_refused(
    tmp_path: Path, data: np.ndarray, kw: dict, words: str
) -> None:
    """A tiled plain TIFF goes to OpenSlide, which reads any layout as RGB without complaint:
    12-bit fluorescence came out black and passed as tissue. The layout is checked first."""
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, data, tile=(32, 32), resolution=(2e4, 2e4), resolutionunit=3, **kw)
    with pytest.raises(SlideError, match=rf"'tiled'.*{words}"):
        open_slide(path)
    with pytest.raises(SlideError, match=words):
        describe_slide(path)


def test_plain_images_that_are_no_rgb_picture_are_refused(tmp_path: Path) -> None:
    """PIL converted a 16-bit grey PNG to RGB by clipping (0 or 255), and palettes and CMYK
    silently; they are refused by name as in TIFF, while 8-bit grey is read as grey RGB."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 30, 90)
    grey16 = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    images = {
        "grey16.png": (Image.fromarray(grey16), "16-bit grey"),
        "palette.png": (Image.fromarray(rgb).quantize(4), "palette indices"),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), "CMYK"),
        "bits.png": (Image.fromarray(rgb[..., 0] > 0), "one bit per pixel"),
    }  # fmt: skip
    for name, (im, words) in images.items():
        im.save(tmp_path / name)
        with pytest.raises(SlideError, match=rf"'{name.split('.')[0]}'.*{words}.*PIL mode"):
            open_slide(tmp_path / name, mpp=0.5)
        with pytest.raises(SlideError, match=words):
            describe_slide(tmp_path / name)
    Image.fromarray(_pattern(16, 16)[..., 0]).save(tmp_path / "grey8.png")
    got = open_slide(tmp_path / "grey8.png", mpp=0.5).read(0, 0, 16, 16, 0.5)
    np.testing.assert_array_equal(got[..., 2], _pattern(16, 16)[..., 0])


def test_a_one_strip_tiff_is_read_in_parts_or_refused(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A TIFF stored as one strip (ImageJ, some exporters): every read of a few pixels had
    decoded the whole image, in each reader thread. Uncompressed, it is memory-mapped; a
    compressed chunk too large to decode per read is refused with the fix."""
    import dsf.tiff_backend as readers

    rgb = _pattern(300, 200)
    raw = tmp_path / "raw.tif"
    tifffile.imwrite(raw, rgb, photometric="rgb", rowsperstrip=300)
    s = open_slide(raw, mpp=0.5)
    np.testing.assert_array_equal(s.read(50, 100, 16, 16, 0.5), rgb[100:116, 50:66])
    assert isinstance(s._backend._arrays()[0], np.memmap)
    lzw = tmp_path / "lzw.tif"
    tifffile.imwrite(lzw, rgb, photometric="rgb", rowsperstrip=300, compression="lzw")
    np.testing.assert_array_equal(
        open_slide(lzw, mpp=0.5).read(50, 100, 16, 16, 0.5), rgb[100:116, 50:66]
    )
    monkeypatch.setattr(readers, "MAX_CHUNK_BYTES", 100_000)  # the strip is 180,000 bytes
    with pytest.raises(SlideError, match=r"'lzw'.*compressed chunks.*300x200.*tiffsave"):
        open_slide(lzw, mpp=0.5)
    assert open_slide(raw, mpp=0.5).dimensions == (200, 300)  # mapped: no decoding


def test_a_fourth_sample_is_alpha_only_when_the_file_says(tmp_path: Path) -> None:
    rgbx = np.concatenate([_pattern(64, 64), np.zeros((64, 64, 1), np.uint8)], axis=2)
    path = tmp_path / "rgbx.tif"
    tifffile.imwrite(path, rgbx, photometric="rgb", extrasamples=[0])  # unspecified
    np.testing.assert_array_equal(open_slide(path, mpp=0.5).read(0, 0, 64, 64, 0.5), rgbx[..., :3])
    rgba = tmp_path / "rgba.tif"
    tifffile.imwrite(rgba, rgbx, photometric="rgb", extrasamples=[2])  # unassociated alpha 0
    assert (open_slide(rgba, mpp=0.5).read(0, 0, 64, 64, 0.5) == 255).all()


def test_a_pyramid_of_plain_pages_is_a_pyramid(tmp_path: Path) -> None:
    """Levels written as plain pages, not flagged as reduced (a script's own tifffile loop):
    OpenSlide and tifffile saw one level, so every coarse read decoded the full image. Pages
    that are downsamples of the first are its levels; a macro of another shape is not."""
    rgb = np.random.default_rng(0).integers(0, 255, (1000, 1500, 3), dtype=np.uint8)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tw:
        for k in (1, 2, 4):
            level = np.ascontiguousarray(rgb[::k, ::k])
            tw.write(level, tile=(256, 256), photometric="rgb", resolution=(2e4 / k, 2e4 / k),
                     resolutionunit="CENTIMETER")  # fmt: skip
        tw.write(np.zeros((300, 800, 3), np.uint8), photometric="rgb")  # a macro image
    s = open_slide(path)
    assert [(lv.width, lv.height) for lv in s.levels] == [(1500, 1000), (750, 500), (375, 250)]
    np.testing.assert_array_equal(s.read(0, 0, 375, 250, 2.0), rgb[::4, ::4])
    assert describe_slide(path).levels == 3


def test_pyramids_only_tifffile_sees_are_used(tmp_path: Path) -> None:
    """A plain TIFF with its levels in SubIFDs (`vips --subifd`): OpenSlide sees one level, so
    tifffile reads it; an OME file with one Image per level: the file's pages form the pyramid."""
    rgb = _pattern(512, 512)
    opts = {"tile": (64, 64), "photometric": "rgb"}
    sub = tmp_path / "subifds.tif"
    with tifffile.TiffWriter(sub) as tw:
        tw.write(rgb, subifds=2, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **opts)
        for k in (2, 4):
            tw.write(rgb[::k, ::k], subfiletype=1, **opts)
    assert len(openslide.OpenSlide(str(sub)).level_dimensions) == 1
    pages = tmp_path / "pages.ome.tif"  # older writers: one OME Image per level
    with tifffile.TiffWriter(pages, ome=True) as tw:
        for k in (1, 2, 4):
            tw.write(rgb[::k, ::k], metadata={"axes": "YXS", "PhysicalSizeX": 0.5 * k}, **opts)
    for path in (sub, pages):
        s = open_slide(path)
        assert s.backend_name == "tiff" and s.mpp == pytest.approx(0.5), path.name
        assert [lv.width for lv in s.levels] == [512, 256, 128], path.name
        assert s.best_level(2.0) == 2
        np.testing.assert_array_equal(s.read(64, 128, 32, 32, 2.0), rgb[::4, ::4][32:64, 16:48])


def test_files_are_read_by_what_they_hold_not_their_suffix(tmp_path: Path) -> None:
    rgb = _pattern(96, 128)
    png = tmp_path / "region.ome.tif"  # a PNG saved under a TIFF name
    Image.fromarray(rgb).save(png, format="PNG")
    s = open_slide(png, mpp=0.5)
    assert s.slide_id == "region" and s.backend_name == "image"  # `.ome.tif` whole, as scanned
    np.testing.assert_array_equal(s.read(0, 0, 128, 96, 0.5), rgb)
    tif = tmp_path / "tiles.png"  # a tiled TIFF under a PNG name is read in tiles, not whole
    tifffile.imwrite(tif, rgb, photometric="rgb", tile=(32, 32))
    s = open_slide(tif, mpp=0.5)
    assert s.backend_name in ("openslide", "tiff")
    np.testing.assert_array_equal(s.read(0, 0, 128, 96, 0.5), rgb)


def _read_in_child(blob: bytes, queue: mp.Queue) -> None:
    slide = pickle.loads(blob)
    queue.put(slide.read(500, 500, 32, 32, slide.mpp).tobytes())


def test_slide_is_safe_across_fork(real: Path) -> None:
    s = open_slide(real / "CMU-1-Small-Region.svs")
    expected = s.read(500, 500, 32, 32, s.mpp)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(pickle.dumps(s), queue))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert got == expected.tobytes()
    assert pickle.loads(pickle.dumps(s))._backend is None


def test_premultiplied_argb_over_background_matches_openslide_python() -> None:
    """The GIL-light conversion equals openslide-python's un-premultiply + alpha blend (within
    rounding) for partly transparent pixels, and is exact for opaque and empty ones."""
    from openslide.lowlevel import _load_image

    from dsf.slide_backend import composite
    from dsf.slide_readers import _premultiplied_to_rgb

    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, (40, 50), dtype=np.uint32)
    alpha[:10] = 255
    alpha[10:20] = 0
    colour = (rng.random((40, 50, 3)) * alpha[..., None]).astype(np.uint32)  # premultiplied
    argb = (alpha << 24) | (colour[..., 0] << 16) | (colour[..., 1] << 8) | colour[..., 2]
    bg = (240, 230, 250)
    got = _premultiplied_to_rgb(argb.view(np.uint8).reshape(40, 50, 4), bg)
    buf = (ctypes.c_uint32 * argb.size).from_buffer_copy(argb.astype(np.uint32).tobytes())
    ref = composite(np.asarray(_load_image(buf, (50, 40))), bg)
    assert got.shape == (40, 50, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:20], ref[:20])
    assert (got[10:20] == bg).all()
    assert np.abs(got.astype(int) - ref).max() <= 1
    opaque = _premultiplied_to_rgb(argb[:10].view(np.uint8).reshape(10, 50, 4), bg)
    np.testing.assert_array_equal(opaque, colour[:10].astype(np.uint8))


def test_openslide_python_fallback_reads_the_same_pixels(real: Path, monkeypatch) -> None:
    """Without openslide-python's ctypes entry point, reads go through `read_region` and
    give the same pixels, inside the slide and across its edge (background)."""
    import dsf.slide_readers

    s = open_slide(real / "CMU-1-Small-Region.svs")
    w, h = s.dimensions
    boxes = [(700, 900, 300, 200), (w - 50, h - 40, 120, 90)]
    direct = [s.read(*box, s.mpp) for box in boxes]
    monkeypatch.setattr(dsf.slide_readers, "_OPENSLIDE_READ", None)
    for box, ref in zip(boxes, direct, strict=True):
        np.testing.assert_array_equal(s.read(*box, s.mpp), ref)


def test_a_corrupt_tile_read_by_many_threads_fails_with_the_slides_name(
    real: Path, tmp_path: Path
) -> None:
    """A read that failed closed the OpenSlide handle while other reader threads were inside
    it: the process died of a C assertion (exit 134 or 139, no dsf message) in most runs of
    `dsf patches` and `dsf infer` with several threads. Run in a child process, which such an
    abort would kill, several times (the race needs threads reading at once)."""
    import subprocess
    import sys

    bad = tmp_path / "c.svs"
    shutil.copy(real / "CMU-1-Small-Region.svs", bad)
    with open(bad, "r+b") as fh:  # the tiles from byte 300,000 on no longer decode
        fh.seek(300_000)
        fh.write(b"\xff" * 100_000)
    child = (
        "import sys; from concurrent.futures import ThreadPoolExecutor\n"
        "from dsf.errors import SlideError\n"
        "from dsf.slide import open_slide\n"
        "s = open_slide(sys.argv[1])\n"
        "boxes = [(x, y) for y in range(0, 2900, 240) for x in range(0, 2200, 240)]\n"
        "try:\n"
        "    with ThreadPoolExecutor(8) as pool:\n"
        "        list(pool.map(lambda b: s.read(b[0], b[1], 240, 240, s.mpp), boxes))\n"
        "except SlideError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(2)\n"
        "finally:\n"
        "    s.close()\n"
    )
    for _ in range(4):
        done = subprocess.run(
            [sys.executable, "-c", child, str(bad)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr[-500:]
        assert "slide 'c': cannot decode pixels of" in done.stdout
        assert "(in the region read: level 0, x " in done.stdout and " x 240 px)" in done.stdout
        assert "re-export it or remove it (from the slide folder, or its row" in done.stdout


def test_openslide_reads_from_many_threads_are_exact(real: Path) -> None:
    """Each reader thread has its own scratch buffer: concurrent reads of different sizes
    return exactly what OpenSlide returns for each."""
    path = real / "CMU-1-Small-Region.svs"
    s = open_slide(path)
    osr = openslide.OpenSlide(str(path))
    boxes = [(i * 37, i * 53, 100 + i * 17, 80 + i * 11) for i in range(24)]

    def crop(box: tuple[int, int, int, int]) -> np.ndarray:
        return s.read(box[0], box[1], box[2], box[3], s.mpp)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(crop, boxes))
    for (x, y, w, h), got in zip(boxes, results, strict=True):
        ref = np.asarray(osr.read_region((x, y), 0, (w, h)))[..., :3]
        np.testing.assert_array_equal(got, ref)


def test_a_level_within_the_tolerance_is_resampled_unless_read_at_its_own_mpp(
    tmp_path: Path,
) -> None:
    """A read covers exactly width * mpp microns: a level at 0.2527 read for 0.25 (within the
    tolerance) is resampled, not read as it is (its pixels had covered 1% more per pixel, so a
    thumbnail or a painted label mask drifted from the positions its caller computed, up to
    about 20 px at the end of a 2,048 px chunk); read at its own mpp (`effective_mpp`) it is
    the level's pixels, unchanged."""
    from conftest import rgb_slide

    rgb = np.full((64, 2400, 3), 230, np.uint8)
    rgb[:, 2000:] = 40  # an edge at level-0 column 2000, 505.4 um at 0.2527 um/px
    slide = open_slide(rgb_slide(tmp_path / "s.tif", rgb, 0.2527), slide_id="s")
    assert slide.effective_mpp(0.25) == pytest.approx(0.2527)
    exact = slide.read(0, 0, 2300, 8, 0.25)
    edge = int(np.argmax(exact[4, :, 0] < 135))
    assert abs(edge - 2000 * 0.2527 / 0.25) <= 1  # 2021.6, not 2000
    as_is = slide.read(0, 0, 2300, 8, slide.effective_mpp(0.25))
    np.testing.assert_array_equal(as_is, rgb[:8, :2300])
    # a thumbnail at 8 um/px of a slide whose level is 8.03 um/px: in place over its width
    wide = np.full((32, 4000, 3), 230, np.uint8)
    wide[:, 3000:] = 40
    coarse = open_slide(rgb_slide(tmp_path / "c.tif", wide, 8.03), slide_id="c")
    thumb = coarse.thumbnail(8.0, chunk=512)
    assert thumb.shape[1] == round(4000 * 8.03 / 8.0)
    edge = int(np.argmax(thumb[16, :, 0] < 135))
    assert abs(edge - 3000 * 8.03 / 8.0) <= 1  # 3011.25; chunks had drifted and jumped back


def test_tifffile_pyramids_read_missing_tiles_as_background_and_associated_alpha(
    tmp_path: Path,
) -> None:
    """Through the tifffile reader (a SubIFD pyramid OpenSlide does not open): a tile a sparse
    file leaves out reads as the white background, not black (which the tissue rule takes
    for tissue); associated (premultiplied) alpha is composited as such, unassociated as
    straight alpha."""
    tile = np.full((256, 256, 3), (200, 100, 150), np.uint8)
    sparse = tmp_path / "sparse.tif"
    with tifffile.TiffWriter(sparse) as tw:
        tw.write((None if i == 1 else tile for i in range(4)), shape=(512, 512, 3),
                 dtype=np.uint8, photometric="rgb", tile=(256, 256), subifds=1,
                 resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
        tw.write(tile, photometric="rgb", tile=(256, 256), subfiletype=1)
    s = open_slide(sparse, slide_id="sparse")
    assert s.properties["dsf.backend"] == "tifffile"
    assert s.read(300, 10, 1, 1, 0.5)[0, 0].tolist() == [255, 255, 255]  # the missing tile
    assert s.read(10, 10, 1, 1, 0.5)[0, 0].tolist() == [200, 100, 150]
    for extra, px in ((2, (255, 0, 0, 128)), (1, (128, 0, 0, 128))):  # 50% red both ways
        path = tmp_path / f"rgba{extra}.tif"
        img = np.zeros((512, 512, 4), np.uint8)
        img[:] = px
        with tifffile.TiffWriter(path) as tw:
            tw.write(img, photometric="rgb", extrasamples=[extra], tile=(256, 256), subifds=1,
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
            tw.write(img[::2, ::2], photometric="rgb", extrasamples=[extra], tile=(128, 128),
                     subfiletype=1)  # fmt: skip
        rgb = open_slide(path, slide_id="a").read(10, 10, 1, 1, 0.5)[0, 0].tolist()
        assert rgb == pytest.approx([255, 127, 127], abs=1), f"extrasamples {extra}"


def test_upsampled_reads_in_pieces_equal_one_read(tmp_path: Path) -> None:
    """A slide at 0.5 um/px read at 0.25 (upsampled, bilinear) in strips gives the pixels of
    one read of the whole: each read takes a level pixel more on every side (strips had
    differed by up to 40 grey levels at their edges)."""
    from conftest import rgb_slide

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    s = open_slide(rgb_slide(tmp_path / "s.tif", rgb, 0.5), slide_id="s")
    whole = s.read(20, 20, 160, 160, 0.25)
    pieces = np.concatenate([s.read(20 + 20 * k, 20, 40, 160, 0.25) for k in range(4)], axis=1)
    np.testing.assert_array_equal(pieces, whole)


def test_a_stripped_slides_thumbnail_is_read_in_bands_of_whole_rows(tmp_path: Path) -> None:
    """A read of part of a stripped level decodes its strips whole: the thumbnail goes in
    bands of whole rows, each strip decoded about once (squares had decoded every strip once
    per square across, 4x the work at 32k px wide), and gives the tiled copy's pixels."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (300, 5000, 3), dtype=np.uint8)
    stripped, tiled = tmp_path / "strips.tif", tmp_path / "tiles.tif"
    res = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(stripped, rgb, photometric="rgb", compression="zlib", rowsperstrip=8, **res)
    tifffile.imwrite(tiled, rgb, photometric="rgb", compression="zlib", tile=(64, 64), **res)
    s = open_slide(stripped)
    backend = s._handle()
    assert backend.full_width(0) and not open_slide(tiled)._handle().full_width(0)
    reads, read_level = [], backend.read_level

    def counted(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        reads.append((x, w))
        return read_level(level, x, y, w, h)

    backend.read_level = counted  # type: ignore[method-assign]
    thumb = s.thumbnail(1.0, chunk=256)
    assert reads and all(x <= 0 and x + w >= 5000 for x, w in reads)
    np.testing.assert_array_equal(thumb, open_slide(tiled).thumbnail(1.0, chunk=256))


def test_an_upsampled_slides_edge_pixels_keep_their_colour(tmp_path: Path) -> None:
    """Upsampled, the slide's outermost pixels are not blended with the background past its
    edge (a uniform grey slide's first and last rows and columns had come out lighter, 139 for
    100); farther past the edge the read is background."""
    from conftest import rgb_slide

    s = open_slide(rgb_slide(tmp_path / "s.tif", np.full((64, 48, 3), 100, np.uint8), 0.5))
    got = s.read(-3, -3, 108, 140, 0.25)[..., 0]  # 3 level px past every edge
    inside = got[6:-6, 6:-6]
    assert inside.shape == (128, 96) and (inside == 100).all()
    # a level px past the edge the background begins (as a resize of the whole clamps)
    assert (got[:, :3] == 255).all() and (got[:, -3:] == 255).all()
    assert (got[:3] == 255).all() and (got[-3:] == 255).all()


@pytest.mark.parametrize(("x", "y", "mpp"), [(0, 0, 2.0), (13, 7, 2.0), (5, 3, 1.5)])
def test_a_coarse_read_of_a_single_level_slide_is_made_in_bounded_pieces(
    tmp_path: Path,
    monkeypatch,
    x: int,
    y: int,
    mpp: float,  # noqa: ANN001
) -> None:
    """A slide without the level a coarse read needs had been read whole, 64x the pixels at
    8x (4 GB for a patches band, and over the bound past that: a bare ValueError). Past
    READ_PIECE_PIXELS it is read in pieces of whole output pixels, giving the same pixels."""
    import dsf.slide as slide_mod

    from conftest import rgb_slide

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    s = open_slide(rgb_slide(tmp_path / "s.tif", rgb, 0.25), slide_id="s")
    whole = s.read(x, y, 50, 36, mpp)
    sizes: list[int] = []
    padded = s._read_padded

    def counted(level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        sizes.append(w * h)
        return padded(level, x0, y0, w, h)

    monkeypatch.setattr(slide_mod, "READ_PIECE_PIXELS", 2000)
    monkeypatch.setattr(s, "_read_padded", counted)
    pieces = s.read(x, y, 50, 36, mpp)
    assert len(sizes) > 4 and max(sizes) <= 2000
    assert np.abs(pieces.astype(int) - whole).max() <= 1  # PIL's fixed-point rounding


@pytest.mark.parametrize(
    ("kind", "top"),
    [
        ("full", 65535),
        ("max-sample-tag", 4095),
        ("ome-significant-bits", 4095),
        ("ome-plain-pyramid", 4095),
    ],
)
def test_sixteen_bit_rgb_reads_against_its_sample_range(
    tmp_path: Path, kind: str, top: int
) -> None:
    """16-bit RGB is read against its full intensity: MaxSampleValue, else the OME
    SignificantBits, else 65535. A camera's 12-bit data (0-4095) had been read against 65535:
    a scan nearly black, taken for tissue everywhere."""
    rgb8 = _pattern(64, 64)
    data = (rgb8.astype(np.uint32) * top // 255).astype(np.uint16)
    path = tmp_path / f"{kind}.tif"
    kw: dict = {"photometric": "rgb", "tile": (32, 32), "resolution": (20000, 20000)}
    kw["resolutionunit"] = "CENTIMETER"
    if kind == "max-sample-tag":
        kw["extratags"] = [(281, "H", 3, (top,) * 3, True)]
    if kind == "ome-significant-bits":
        path = tmp_path / f"{kind}.ome.tif"
        kw = {
            "photometric": "rgb",
            "tile": (32, 32),
            "ome": True,
            "metadata": {"SignificantBits": 12, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        }
    if kind == "ome-plain-pyramid":  # OME naming level 0 only, its pyramid as reduced pages:
        # read as plain TIFF, whose SignificantBits had been lost with the OME view
        path = tmp_path / f"{kind}.ome.tif"
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
            'Schemas/OME/2016-06"><Image ID="Image:0" Name="scan"><Pixels ID="Pixels:0" '
            'DimensionOrder="XYCZT" Type="uint16" SignificantBits="12" SizeX="64" SizeY="64" '
            'SizeC="3" SizeZ="1" SizeT="1" PhysicalSizeX="0.5" PhysicalSizeY="0.5"><Channel '
            'ID="Channel:0:0" SamplesPerPixel="3"/><TiffData IFD="0" PlaneCount="1"/></Pixels>'
            "</Image></OME>"
        )
        with tifffile.TiffWriter(path) as tw:
            tw.write(data, photometric="rgb", tile=(32, 32), description=xml, metadata=None)
            tw.write(data[::2, ::2], photometric="rgb", tile=(32, 32), subfiletype=1,
                     metadata=None)  # fmt: skip
    else:
        tifffile.imwrite(path, data, **kw)
    s = open_slide(path)
    if kind == "ome-plain-pyramid":
        assert len(s.levels) == 2
    got = s.read(0, 0, 64, 64, s.mpp).astype(int)
    assert np.abs(got - rgb8).max() <= 1
    assert got.mean() == pytest.approx(rgb8.mean(), abs=1)


def _marked(h: int = 256, w: int = 320) -> np.ndarray:
    """A gradient with a red block in one corner: flips, rotations and false colours show."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 128)], -1)
    rgb = rgb.astype(np.uint8)
    rgb[: h // 8, : w // 8] = (255, 0, 0)
    return rgb


_RES = {"resolution": (20000, 20000), "resolutionunit": "CENTIMETER"}


@pytest.mark.parametrize("layout", [{"tile": (128, 128)}, {"rowsperstrip": 32}])
def test_a_rotated_or_mirrored_tiff_is_refused(tmp_path: Path, layout: dict) -> None:
    """TIFF Orientation 3/6/8: OpenSlide turned each tile and left the tiles in place (a
    mosaic), tifffile gave the stored pixels: one slide read three ways, none of them right."""
    path = tmp_path / "turned.tif"
    tifffile.imwrite(path, _marked(), photometric="rgb", extratags=[(274, 3, 1, 6, True)],
                     **layout, **_RES)  # fmt: skip
    with pytest.raises(SlideError, match=r"'turned'.*TIFF Orientation 6.*vips autorot"):
        open_slide(path)
    if "tile" in layout:  # a vendor's format OpenSlide reads (Aperio) is read as before
        svs = tmp_path / "turned.svs"
        tifffile.imwrite(svs, _marked(), photometric="rgb", extratags=[(274, 3, 1, 6, True)],
                         description="Aperio Image Library v12.0.15 \r\n320x256 (128x128) "
                         "JPEG/RGB Q=70|AppMag = 20|MPP = 0.5", metadata=None,
                         **layout, **_RES)  # fmt: skip
        assert open_slide(svs).backend_name == "openslide"


@pytest.mark.parametrize("layout", [{"tile": (128, 128)}, {"rowsperstrip": 32}])
def test_a_fourth_sample_that_is_no_alpha_is_dropped(tmp_path: Path, layout: dict) -> None:
    """RGB plus a padding sample (ExtraSamples 0, unspecified): OpenSlide took it for alpha in
    tiled files, so a zero 4th sample read as a white slide (no tissue found)."""
    rgb = _marked()
    for pad in (0, 128):
        rgbx = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), pad, np.uint8)], -1)
        path = tmp_path / f"rgbx{pad}.tif"
        tifffile.imwrite(path, rgbx, photometric="rgb", extrasamples=[0], **layout, **_RES)
        s = open_slide(path)
        np.testing.assert_array_equal(s.read(0, 0, 320, 256, s.mpp), rgb)


def test_aperio_jpeg2000_ycbcr_tiles_read_in_their_colours(tmp_path: Path) -> None:
    """Aperio's JPEG 2000 tiles (compression 33003) hold YCbCr. Where OpenSlide does not read
    the file (its description rewritten, e.g. by de-identification) tifffile gave the Y, Cb, Cr
    samples as RGB: false colours. Read now as OpenSlide reads the original."""
    import imagecodecs

    rgb = _marked()
    f = rgb.astype(np.float64)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    ycc = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                    128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                    128 + 0.5 * r - 0.418688 * g - 0.081312 * b], -1)  # fmt: skip
    ycc = np.clip(np.rint(ycc), 0, 255).astype(np.uint8)

    def tiles():  # noqa: ANN202
        for j in range(0, 256, 128):
            for i in range(0, 320, 128):
                tile = np.zeros((128, 128, 3), np.uint8)  # edge tiles padded, as writers do
                part = ycc[j : j + 128, i : i + 128]
                tile[: part.shape[0], : part.shape[1]] = part
                yield imagecodecs.jpeg2k_encode(tile, level=0, codecformat="j2k", mct=False)

    aperio = (
        "Aperio Image Library v12.0.15 \r\n320x256 (64x128) J2K/YUV16 Q=70|AppMag = 20|MPP = 0.5"
    )
    reads = {}
    for name, desc in (("aperio", aperio), ("rewritten", "de-identified")):
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, tiles(), shape=rgb.shape, dtype=np.uint8, tile=(128, 128),
                         compression=33003, photometric="rgb", description=desc,
                         metadata=None, **_RES)  # fmt: skip
        s = open_slide(path)
        reads[name] = (s.backend_name, s.read(0, 0, 320, 256, s.mpp).astype(int))
    assert reads["aperio"][0] == "openslide" and reads["rewritten"][0] == "tiff"
    assert np.abs(reads["rewritten"][1] - reads["aperio"][1]).max() <= 2
    assert np.abs(reads["rewritten"][1] - rgb).mean() < 1.5
    assert tuple(reads["rewritten"][1][5, 5]) == pytest.approx((255, 0, 0), abs=3)


def test_a_resolution_stated_otherwise_is_read(tmp_path: Path) -> None:
    """The resolution in a stripped Aperio file's description (OpenSlide reads only tiled
    Aperio files), in ImageJ's `unit=micron` (Fiji writes ResolutionUnit none), and in
    X/YResolution without ResolutionUnit (TIFF's default, inch) had been 'no resolution';
    a default DPI is still refused as no scan's."""
    rgb = _marked()
    aperio = tmp_path / "aperio.tif"
    tifffile.imwrite(aperio, rgb, photometric="rgb", rowsperstrip=32,
                     description="Aperio Image Library v12.0.15 \r\n320x256 JPEG/RGB Q=70|"
                     "AppMag = 20|MPP = 0.4990")  # fmt: skip
    imagej = tmp_path / "fiji.tif"
    tifffile.imwrite(imagej, rgb, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "micron"})
    assert open_slide(aperio).mpp == pytest.approx(0.499)
    assert open_slide(imagej).mpp == pytest.approx(0.5)
    for dpi, mpp in ((50800, 0.5), (72, None)):
        path = tmp_path / f"nounit{dpi}.tif"
        tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=32,
                         resolution=(dpi, dpi), resolutionunit="NONE")  # fmt: skip
        with tifffile.TiffFile(path) as tf:  # drop the ResolutionUnit tag (tifffile writes 1)
            offset = tf.pages[0].tags["ResolutionUnit"].offset
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write((65000).to_bytes(2, "little"))  # an unknown tag's code: the tag is gone
        if mpp is not None:
            assert open_slide(path).mpp == pytest.approx(mpp)
        else:
            with pytest.raises(SlideError, match=r"coarser than any scan: a default DPI"):
                open_slide(path)


def test_a_region_smaller_than_its_macro_image_is_the_slide(tmp_path: Path) -> None:
    """A region's scan with the macro photo of the glass carried along (bfconvert converts
    every image of a file): the macro, larger, had been taken for the slide at 16 um/px."""
    rgb = _marked(400, 500)
    path = tmp_path / "region.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(rgb, photometric="rgb", tile=(128, 128), subifds=1,
                 metadata={"axes": "YXS", "Name": "scan", "PhysicalSizeX": 0.5,
                           "PhysicalSizeY": 0.5})  # fmt: skip
        tw.write(rgb[::2, ::2], photometric="rgb", tile=(128, 128), subfiletype=1)
        tw.write(np.full((431, 1280, 3), 90, np.uint8), photometric="rgb",
                 metadata={"axes": "YXS", "Name": "macro image", "PhysicalSizeX": 16.0,
                           "PhysicalSizeY": 16.0})  # fmt: skip
    s = open_slide(path)
    assert s.dimensions == (500, 400) and s.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(s.read(0, 0, 500, 400, 0.5), rgb)


def test_a_sparse_aperio_jpeg2000_file_reads_its_missing_tiles_white(tmp_path: Path) -> None:
    """A tile a sparse file leaves out reads as the fill (255 in every sample), which the
    YCbCr conversion had turned magenta: taken for tissue."""
    import imagecodecs

    ycc = np.full((128, 128, 3), (200, 100, 150), np.uint8)

    def tiles():  # noqa: ANN202
        for k in range(4):
            yield b"" if k == 1 else imagecodecs.jpeg2k_encode(ycc, level=0, codecformat="j2k",
                                                               mct=False)  # fmt: skip

    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, tiles(), shape=(256, 256, 3), dtype=np.uint8, tile=(128, 128),
                     compression=33003, photometric="rgb", metadata=None, **_RES)  # fmt: skip
    s = open_slide(path)
    got = s.read(0, 0, 256, 256, s.mpp)
    assert s.backend_name == "tiff" and (got[:128, 128:] == 255).all()
    assert tuple(got[10, 10]) == pytest.approx((231, 194, 150), abs=2)  # converted


@pytest.mark.parametrize(
    "kw",
    [{"tile": (32, 32)}, {}, {"planarconfig": "separate"}],
    ids=["tiled", "stripped", "planar"],
)
def test_an_8bit_grey_scan_with_alpha_is_read_as_grey_over_background(
    tmp_path: Path, kw: dict
) -> None:
    """One grey sample and an alpha sample (ImageJ's or GIMP's grey + alpha export) had been
    refused as a 2-channel fluorescence image; it is grey RGB, the transparent parts the
    background, as an RGBA scan's."""
    grey = np.tile((np.arange(64, dtype=np.uint8) * 4)[None, :], (64, 1))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :16] = 0
    alpha[:, 16:24] = 128
    data = np.stack([grey, alpha], axis=0 if kw.get("planarconfig") else -1)
    path = tmp_path / "grey-alpha.tif"
    tifffile.imwrite(
        path, data, photometric="minisblack", extrasamples=[2],
        resolution=(2e4, 2e4), resolutionunit=3, **kw,
    )  # fmt: skip
    s = open_slide(path)
    assert s.backend_name == "tiff"
    got = s.read(0, 0, 64, 64, s.mpp).astype(int)
    assert (got[:, :16] == 255).all()  # transparent: the background
    assert (got[:, 24:] == grey[:, 24:, None]).all()  # opaque: the grey in R, G and B
    half = got[0, 16:24, 0]  # half transparent: halfway between the grey and white
    want = grey[0, 16:24].astype(float) * 128 / 255 + 255 * 127 / 255
    assert np.abs(half - want).max() <= 2
