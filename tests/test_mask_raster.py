"""Masks up to the slide's full size are sampled without loading them (dsf.mask_raster)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dsf.annotations import RasterLabels
from dsf.errors import AnnotationError
from dsf.mask_raster import MaskRaster


def _reference(mask: np.ndarray, ds: float, x: float, y: float, w: int, h: int, f: float):
    """Nearest samples of an in-memory mask, 0 outside it."""
    cols = np.floor((x + (np.arange(w) + 0.5) * f) / ds).astype(int)
    rows = np.floor((y + (np.arange(h) + 0.5) * f) / ds).astype(int)
    out = np.zeros((h, w), np.uint8)
    vr, vc = (rows >= 0) & (rows < mask.shape[0]), (cols >= 0) & (cols < mask.shape[1])
    out[np.ix_(vr, vc)] = mask[np.ix_(rows[vr], cols[vc])]
    return out


def _labels(classes: int = 4) -> dict:
    return {
        "classes": [f"c{i}" for i in range(classes)],
        "class_map": {},
        "other_class": 0,
        "geojson_names": {},
    }


@pytest.mark.parametrize("layout", ["tiled", "strips", "png"])
def test_reads_equal_the_mask_sampled_in_memory(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, (300, 200), dtype=np.uint8)
    path = tmp_path / ("m.png" if layout == "png" else "m.tif")
    if layout == "png":
        Image.fromarray(mask).save(path)
    elif layout == "tiled":
        tifffile.imwrite(path, mask, tile=(64, 64), compression="zlib")
    else:
        tifffile.imwrite(path, mask, rowsperstrip=7, compression="lzw")
    raster = MaskRaster(path, "s", (800, 1200), "label mask")  # a 4x downsample
    for x, y, w, h, f in [(0, 0, 50, 40, 4.0), (333.3, 517.9, 97, 61, 1.5), (-40, 1100, 30, 80, 9)]:
        np.testing.assert_array_equal(
            raster.read(x, y, w, h, f), _reference(mask, 4.0, x, y, w, h, f)
        )


def test_past_the_masks_edges_nothing_is_labelled_whatever_code_0_maps_to(
    tmp_path: Path,
) -> None:
    """A class map without code 0 sends it to labels.other_class, as a pixel of the mask: but
    a read past the mask's edge (a coarse map's last column reaching past the slide) reads no
    pixel of it, and is unlabelled (it had been scored as other_class)."""
    path = tmp_path / "m.tif"
    mask = np.full((64, 64), 7, np.uint8)
    mask[:, :8] = 0  # code 0 on the mask: other_class, as the schema says
    tifffile.imwrite(path, mask)
    st = _labels(3) | {"class_map": {"7": 1}, "other_class": 2}
    labels = RasterLabels(path, "s", (64, 64), 0.5, st)
    got = labels.read(-4, -4, 18, 18, 2.0)  # 4 slide px per read px, one past each edge
    want = np.zeros((18, 18), np.uint8)
    want[1:17, 1:17] = 1
    want[1:17, 1:3] = 2
    np.testing.assert_array_equal(got, want)


def test_a_full_size_tiled_mask_is_read_by_the_window_not_whole(tmp_path: Path) -> None:
    """A 12,000 x 9,000 mask (108 MB as pixels) answers a 256 px region and a coarse overview
    within a few MB: the reader fetches the tiles it needs, never the whole level."""
    mask = np.zeros((9000, 12000), np.uint8)
    mask[1000:5000, 2000:9000] = 2
    mask[3000:3500, 4000:4600] = 3
    path = tmp_path / "full.tif"
    tifffile.imwrite(path, mask, tile=(512, 512), compression="zlib")
    del mask
    tracemalloc.start()
    try:
        labels = RasterLabels(path, "big", (12000, 9000), 0.5, _labels())
        region = labels.read(3900, 2900, 256, 256, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12e6, f"peak {peak / 1e6:.0f} MB"
    assert region[0, 0] == 2 and region[150, 150] == 3 and region[255, 255] == 3
    # an overview of the whole slide, read row blocks at a time
    over = labels.read(0, 0, 120, 90, 50.0)
    assert over.shape == (90, 120) and set(np.unique(over)) == {0, 2, 3}


def test_the_coarsest_level_that_is_fine_enough_is_read(tmp_path: Path) -> None:
    """A pyramid's level 1 is chosen for a request at least 2x coarser than level 0; finer
    requests read level 0 (the levels here differ on purpose, to tell them apart). Its levels
    are read as a mask dsf wrote says what it holds."""
    path = tmp_path / "pyr.tif"
    about = json.dumps({"dsf": "class map", "classes": ["ignore", "a", "b"]})
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.full((512, 512), 1, np.uint8), tile=(128, 128), subifds=1, description=about)
        tw.write(np.full((256, 256), 2, np.uint8), tile=(128, 128), subfiletype=1)
    raster = MaskRaster(path, "s", (1024, 1024), "label mask")
    assert len(raster.levels) == 2
    assert (raster.read(0, 0, 10, 10, 2.0) == 1).all()  # 1 mask px per output px: level 0
    assert (raster.read(0, 0, 10, 10, 4.0) == 2).all()  # 2 mask px per output px: level 1


def test_bad_codes_outside_the_checked_overview_stop_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mask = np.zeros((200, 200), np.uint8)
    mask[150:, 150:] = 9
    tifffile.imwrite(tmp_path / "m.tif", mask)
    with pytest.raises(AnnotationError, match=r"'s'.*codes \[9\]"):
        RasterLabels(tmp_path / "m.tif", "s", (200, 200), 0.5, _labels())
    monkeypatch.setattr(RasterLabels, "CHECK_PX", 0)  # as if the mask were too large to check
    labels = RasterLabels(tmp_path / "m.tif", "s", (200, 200), 0.5, _labels())
    assert (labels.read(0, 0, 100, 100, 0.5) == 0).all()
    with pytest.raises(AnnotationError, match=r"'s'.*codes \[9\].*labels.class_map"):
        labels.read(100, 100, 100, 100, 0.5)


def test_unreadable_and_multichannel_masks_name_the_slide(tmp_path: Path) -> None:
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(AnnotationError, match="'s'.*cannot read label mask"):
        MaskRaster(tmp_path / "junk.tif", "s", (100, 100), "label mask")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((10, 10), np.float32))
    with pytest.raises(AnnotationError, match="'s'.*not integers"):
        MaskRaster(tmp_path / "float.tif", "s", (100, 100), "label mask")
    tifffile.imwrite(tmp_path / "rgb.tif", np.full((10, 10, 3), 2, np.uint8))
    assert (MaskRaster(tmp_path / "rgb.tif", "s", (100, 100), "m").read(0, 0, 5, 5, 10) == 2).all()


@pytest.mark.parametrize("fmt", ["tif", "png"])
def test_rgb_masks_read_their_codes_and_colour_coded_ones_are_refused(
    tmp_path: Path, fmt: str
) -> None:
    """An RGB mask holds its codes in every channel (grey saved as RGB) or in red alone
    (PANDA); a colour-coded one, green and blue classes, would read as all unlabelled: refused,
    naming the file and a colour it holds."""
    codes = np.zeros((40, 40), np.uint8)
    codes[10:30, 5:20], codes[10:30, 20:35] = 1, 2

    def write(name: str, rgb: np.ndarray) -> Path:
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "png":
            Image.fromarray(rgb).save(path)
        else:
            tifffile.imwrite(path, rgb, photometric="rgb")
        return path

    grey = write("grey", np.repeat(codes[..., None], 3, axis=2))
    panda = write("panda", np.stack([codes, 0 * codes, 0 * codes], axis=2))
    for path in (grey, panda):
        np.testing.assert_array_equal(
            MaskRaster(path, "s", (40, 40), "m").read(0, 0, 40, 40, 1), codes
        )
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[codes == 1] = (0, 255, 0)
    colour[codes == 2] = (0, 0, 255)
    path = write("colour", colour)
    with pytest.raises(AnnotationError, match=r"'s'.*colour\.\w+ is a colour image.*\(0, 255, 0\)"):
        MaskRaster(path, "s", (40, 40), "label mask").read(0, 0, 40, 40, 1)


@pytest.mark.parametrize("size", [100, 101])
def test_a_mask_at_a_whole_downsample_rounded_either_way_is_read_at_that_factor(
    tmp_path: Path, size: int
) -> None:
    """A mask at downsample 64 of a 6401 px slide is 100 px (rounded down) or 101 (up, as
    pyramid levels often are): both start class 1 at level-0 x 3200, mask column 50. Read at
    size / size (63.4 for 101 px), a rounded-up mask had been stretched, its edge at 3150."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, 50:] = 1
    tifffile.imwrite(tmp_path / "m.tif", mask)
    raster = MaskRaster(tmp_path / "m.tif", "s", (6401, 6401), "mask")
    assert raster.ds_x == raster.ds_y == 64.0
    row = raster.read(0, 0, 6401, 1, 1.0)[0]
    assert int(np.argmax(row > 0)) == 3200
    raster.close()
    # not a whole downsample (a 1/3.9 mask): the sizes' ratio, as before
    tifffile.imwrite(tmp_path / "n.tif", np.zeros((1641, 1641), np.uint8))
    raster = MaskRaster(tmp_path / "n.tif", "s", (6401, 6401), "mask")
    assert raster.ds_x == pytest.approx(6401 / 1641)
    raster.close()


def test_another_tools_averaged_pyramid_levels_are_not_read(tmp_path: Path) -> None:
    """A label mask whose reduced level averages codes (libvips' default): 1 beside 3 had read
    2, a class drawn nowhere. Only a mask dsf wrote (centre-sampled levels) is read from its
    reduced levels; another's from its full resolution."""
    l0 = np.ones((64, 64), np.uint8)
    l0[:, 33:] = 3
    l1 = l0.reshape(32, 2, 32, 2).mean((1, 3)).round().astype(np.uint8)
    with tifffile.TiffWriter(tmp_path / "pyr.tif") as tw:
        tw.write(l0, tile=(16, 16), subifds=1)
        tw.write(l1, tile=(16, 16), subfiletype=1)
    raster = MaskRaster(tmp_path / "pyr.tif", "s", (64, 64), "mask")
    assert len(raster.levels) == 1
    np.testing.assert_array_equal(raster.read(0, 0, 32, 32, 2.0), l0[::2, 1::2])
    raster.close()


def test_a_mask_near_the_slides_size_but_not_its_own_is_refused(tmp_path: Path) -> None:
    """Another slide's full-size mask (2% smaller, about square) had been stretched over the
    slide silently, as had one larger than the slide; one within rounding of the slide's size
    (or written at a nominal 0.25 um/px for a 0.2527 scan), or a 1.5x or coarser downsample, is
    read."""
    for w, h, ok in (
        (3008, 2976, False),  # another slide's mask
        (3400, 3400, False),  # larger than the slide
        (2400, 2400, False),  # 1.28x: neither its size nor a downsample
        (3072, 3072, True),
        (3105, 3105, True),  # 0.2527 / 0.25 um/px
        (3073, 3071, True),  # an exporter's rounding
        (2048, 2048, True),  # 1.5x
        (768, 768, True),
    ):
        path = tmp_path / f"m{w}x{h}.tif"
        tifffile.imwrite(path, np.zeros((h, w), np.uint8))
        if ok:
            MaskRaster(path, "s", (3072, 3072), "mask").close()
            continue
        with pytest.raises(AnnotationError, match=rf"slide 's'.*{w}x{h} px, .*this slide's mask"):
            MaskRaster(path, "s", (3072, 3072), "mask")


def test_jpeg_masks_are_refused_and_a_mask_at_another_resolution_is_named(
    tmp_path: Path,
) -> None:
    """A JPEG mask (a file, or a JPEG-compressed TIFF as pyramid tools write) had been read
    with the compression's noise as codes: borders mislabelled, classes no one drew. A mask
    1.1x smaller than the slide is refused naming the other resolution it may be at."""
    codes = np.zeros((300, 400), np.uint8)
    codes[50:150, 60:200] = 1
    codes[180:260, 220:380] = 2
    jpg = tmp_path / "m.jpg"
    Image.fromarray(codes * 100).save(jpg, quality=95)
    tif = tmp_path / "m.tif"
    tifffile.imwrite(tif, codes * 100, compression="jpeg", tile=(128, 128))
    for path in (jpg, tif):
        with pytest.raises(AnnotationError, match=r"slide 's'.*JPEG.*lossy compression.*PNG"):
            MaskRaster(path, "s", (1600, 1200), "label mask")
    png = tmp_path / "m.png"
    Image.fromarray(codes).save(png)
    MaskRaster(png, "s", (1600, 1200), "label mask").close()
    with pytest.raises(AnnotationError, match=r"another resolution \(1\.10\dx coarser"):
        MaskRaster(png, "s", (442, 331), "label mask")
