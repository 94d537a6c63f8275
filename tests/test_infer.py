"""Whole-slide inference: exact stitching, map format, alignment, failure behaviour (issue 5)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
import zarr
from torch import nn

from dsf.chunk_reader import reduce_rgb, reduce_rows
from dsf.config import defaults
from dsf.errors import ConfigError, SlideError, TissueError
from dsf.infer import infer_slide
from dsf.metrics import confusion, scores
from dsf.predict import Predictor
from dsf.slide import open_slide
from dsf.tiff_backend import tiff_tag_mpp
from dsf.windows import make_grid, out_factor, tissue_windows

from conftest import DEVICE, rgb_slide

MPP = 0.5
NORM = ([0.6998, 0.4785, 0.6609], [0.2203, 0.2407, 0.1983])  # BCSS (config/presets/bcss.yaml)
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)  # class 1, 2, 3


def stripe_classes(h: int, w: int) -> np.ndarray:
    """Class 1..3 of each pixel: a diagonal pattern of 12 x 20 px cells (multiples of 4, so
    context pixels reduced by scale 4 stay pure)."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x // 12 + y // 20) % 3 + 1).astype(np.uint8)


def write_slide(path: Path, h: int, w: int) -> np.ndarray:
    """A tiled TIFF slide whose colours encode the stripe classes; returns the classes."""
    cls = stripe_classes(h, w)
    rgb = COLOURS[cls - 1]
    rgb_slide(path, rgb, MPP, tile=64)
    return cls


class ColourOracle(nn.Module):
    """Logits = one-hot of the class each pixel's colour encodes (from the normalised input).

    With `from_context`, the class comes from the context's centre (the target's field of
    view, upsampled), so the output is right only if context and target are concentric.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scale: int, from_context: bool):
        super().__init__()
        self.mean, self.std, self.scale, self.from_context = mean, std, scale, from_context

    def _classes(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.std + self.mean  # back to [0, 1]
        return rgb.argmax(1) + 1  # red -> 1, green -> 2, blue -> 3

    def forward(
        self, context: torch.Tensor, target: torch.Tensor, context_logits: bool = True
    ) -> tuple[torch.Tensor, None]:
        if self.from_context:
            b = context.shape[-1]
            c0 = (self.scale - 1) * b // (2 * self.scale)
            centre = context[:, :, c0 : c0 + b // self.scale, c0 : c0 + b // self.scale]
            cls = self._classes(torch.nn.functional.interpolate(centre, scale_factor=self.scale))
        else:
            cls = self._classes(target)
        return torch.nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).float() * 10, None


def oracle(block: int, scale: int = 4, from_context: bool = False) -> Predictor:
    mean = torch.tensor(NORM[0], device=DEVICE).view(1, 3, 1, 1)
    std = torch.tensor(NORM[1], device=DEVICE).view(1, 3, 1, 1)
    return Predictor(
        model=ColourOracle(mean, std, scale, from_context),
        init="random",
        classes=["ignore", "A", "B", "C"],
        scale=scale,
        block=block,
        target_mpp=MPP,
        mean=mean,
        std=std,
        device=torch.device(DEVICE),
        amp=None,
        meta={"fold": 0, "fraction": 1.0},
    )


def settings(**kw: object) -> dict:
    st = defaults("infer") | {"band_windows": 4, "batch_size": 16, "threads": 2, "tile": 64}
    st["mask_output"] = False
    st["overlay_px"] = 256
    return st | kw


def run_infer(tmp_path: Path, slide_path: Path, preds: list[Predictor], mask=None, **kw):
    slide = open_slide(slide_path)
    w, h = slide.dimensions
    if mask is None:
        mask = np.ones((h // 8 + 1, w // 8 + 1), bool)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    st = settings(**kw)
    meta = infer_slide(
        slide,
        mask,
        MPP * 8,
        preds,
        st,
        out / "map.tiff",
        out / "map.jpg",
        out / "map.json",
        out / "map.probs.zarr" if st["probabilities"] else None,
        progress=False,
    )
    return out, meta


def read_map(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].asarray()


@pytest.fixture(scope="module")
def stripes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("slide") / "stripes.tiff"
    return path, write_slide(path, 301, 427)  # odd sizes: edge windows hang over both edges


@pytest.mark.parametrize(
    ("block", "overlap", "band"),
    [(32, 0.25, 4), (32, 0.0, 3), (32, 0.5, 5), (64, 0.25, 2), (64, 0.4, 1)],
)
@pytest.mark.parametrize("from_context", [False, True])
def test_stitched_map_is_exact(tmp_path, stripes, block, overlap, band, from_context):
    path, cls = stripes
    out, meta = run_infer(
        tmp_path,
        path,
        [oracle(block, from_context=from_context)],
        overlap=overlap,
        band_windows=band,
    )
    got = read_map(out / "map.tiff")
    assert got.shape == cls.shape
    np.testing.assert_array_equal(got, cls)
    assert meta["windows"] > 0
    # the pixels of each class, counted as the map was written (dsf areas reads them)
    assert meta["class_pixels"] == np.bincount(cls.ravel(), minlength=4).tolist()


@pytest.mark.parametrize("factor", [2, 3, 4, 5, 8])
def test_device_context_reduction_equals_pil(factor):
    """`reduce_rows` (the GPU path's context) equals `reduce_rgb` (PIL, as `dsf patches` made
    the training contexts) to the bit, bright near-white rows included."""
    rng = np.random.default_rng(factor)
    rgb = rng.integers(0, 256, (factor * 24, factor * 40, 3), dtype=np.uint8)
    rgb[: factor * 6] = rng.integers(240, 256, (factor * 6, factor * 40, 3), dtype=np.uint8)
    got = reduce_rows(torch.from_numpy(rgb).to(DEVICE), factor).cpu().numpy()
    np.testing.assert_array_equal(got, reduce_rgb(rgb, factor))


def test_contexts_reduced_on_the_device_give_the_same_map(tmp_path, stripes, monkeypatch):
    """The GPU path's reader leaves the context reduction to the device; the context-driven
    oracle's map is still exact, so those contexts are concentric and equal to the host's."""
    import dsf.infer

    class DeviceContexts(dsf.infer.ChunkReader):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.contexts_on_device = True

        def _read(self, band, k):
            tgt, ctx = super()._read(band, k)
            assert ctx is None
            return tgt, ctx

    monkeypatch.setattr(dsf.infer, "ChunkReader", DeviceContexts)
    path, cls = stripes
    out, _ = run_infer(tmp_path, path, [oracle(32, from_context=True)], overlap=0.25)
    np.testing.assert_array_equal(read_map(out / "map.tiff"), cls)


def test_a_failed_map_leaves_no_probabilities(tmp_path, stripes, monkeypatch) -> None:  # noqa: ANN001
    """The probabilities are renamed last: a failure while the map TIFF is written leaves no
    store that looks complete beside no map (nor any partial one)."""

    def broken(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("dsf.infer.write_tiff", broken)
    with pytest.raises(OSError, match="disk full"):
        run_infer(tmp_path, stripes[0], [oracle(32)], probabilities=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_probabilities_have_no_seams(tmp_path, stripes):
    """The blended probabilities equal the oracle's everywhere: no window border shows."""
    path, cls = stripes
    out, _ = run_infer(tmp_path, path, [oracle(32)], probabilities=True, overlap=0.25)
    import zarr

    probs = np.asarray(zarr.open_group(str(out / "map.probs.zarr"), mode="r")["0"][:])
    assert probs.shape == (3, *cls.shape)
    expected = np.stack([(cls == k) * 255 for k in (1, 2, 3)])
    # softmax of one-hot * 10 puts ~0.99986 on the class: 255 after rounding everywhere
    np.testing.assert_array_equal(probs, expected.astype(np.uint8))
    attrs = zarr.open_group(str(out / "map.probs.zarr"), mode="r").attrs.asdict()
    assert attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0][
        "scale"
    ] == [1.0, MPP, MPP]


@pytest.mark.parametrize(("band", "in_memory"), [(3, True), (3, False), (5, False)])
def test_pyramid_levels_are_level0_subsampled(tmp_path, stripes, monkeypatch, band, in_memory):
    """Every reduced level, built while level 0 streams in band by band (kept in memory or in
    the tile spool; band widths not a multiple of 2**level), is level 0 sampled at the centre
    pixel (offset 2**i // 2) of each 2**i square, the last, short square at the edge pixel."""
    import dsf.class_tiff

    if not in_memory:
        monkeypatch.setattr(dsf.class_tiff, "MEMORY_LEVEL_PX", 0)
    path, cls = stripes
    out, _ = run_infer(tmp_path, path, [oracle(32)], band_windows=band, tile=16)
    with tifffile.TiffFile(out / "map.tiff") as tf:
        pages = [pg.asarray() for pg in tf.pages]
    assert len(pages) == 6  # 427 -> 214 -> 107 -> 54 -> 27 -> 14 px wide, 16 px tiles
    # (301 rows, 427 columns: level 1's last square is cut short on both axes)
    np.testing.assert_array_equal(pages[0], cls)
    for i, page in enumerate(pages[1:], start=1):
        f = 2**i
        rows = np.minimum(np.arange(page.shape[0]) * f + f // 2, cls.shape[0] - 1)
        cols = np.minimum(np.arange(page.shape[1]) * f + f // 2, cls.shape[1] - 1)
        np.testing.assert_array_equal(page, cls[np.ix_(rows, cols)], err_msg=f"level {i}")


def test_map_opens_in_openslide_with_scale_and_pyramid(tmp_path, stripes):
    path, cls = stripes
    out, meta = run_infer(tmp_path, path, [oracle(32)], out_mpp=2 * MPP)
    s = openslide.OpenSlide(out / "map.tiff")
    h, w = cls.shape
    assert s.dimensions == ((w + 1) // 2, (h + 1) // 2)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(2 * MPP)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(2 * MPP)
    assert s.level_count >= 3  # 64 px tiles: 214 -> 107 -> 54
    assert s.level_downsamples[1] == pytest.approx(2.0, rel=0.02)
    rgba = np.asarray(s.read_region((0, 0), 0, s.dimensions))
    got = read_map(out / "map.tiff")
    # palette colours: OpenSlide shows each class in its colour
    from dsf.colours import class_colours

    np.testing.assert_array_equal(rgba[..., :3], class_colours(4)[got])
    assert meta["mpp"] == pytest.approx(2 * MPP)
    assert json.loads((out / "map.json").read_text())["width"] == (w + 1) // 2
    s.close()
    # every pyramid level says its own scale, on both axes: level i is 2**i map px per px
    with tifffile.TiffFile(out / "map.tiff") as tf:
        tagged = [(tiff_tag_mpp(p, "X"), tiff_tag_mpp(p, "Y")) for p in tf.pages]
    assert len(tagged) >= 3
    for i, (x, y) in enumerate(tagged):
        assert x == pytest.approx(2 * MPP * 2**i, rel=1e-6), f"level {i}"
        assert y == pytest.approx(2 * MPP * 2**i, rel=1e-6), f"level {i}"


def test_map_lines_up_with_the_labels(tmp_path, stripes):
    """Downsampled map against labels read at the map's mpp: an oracle scores F1 = 1."""
    from dsf.annotations import RasterLabels

    path, cls = stripes
    lab_path = tmp_path / "labels.tiff"
    tifffile.imwrite(lab_path, cls)
    out, meta = run_infer(tmp_path, path, [oracle(32)], out_mpp=4 * MPP)
    got = read_map(out / "map.tiff")
    h, w = cls.shape
    labels = RasterLabels(
        lab_path, "stripes", (w, h), MPP, defaults("labels") | {"classes": ["i", "A", "B", "C"]}
    )
    truth = labels.read(0, 0, got.shape[1], got.shape[0], meta["mpp"])
    # map pixels average 4x4 target px; where all 16 share a class the map must equal it
    pure = np.zeros_like(got, bool)
    for y in range(got.shape[0]):
        for x in range(got.shape[1]):
            patch = cls[4 * y : 4 * y + 4, 4 * x : 4 * x + 4]
            pure[y, x] = (patch == patch.flat[0]).all()
    assert pure.mean() > 0.5
    sc = scores(confusion(got[pure], truth[pure], 3))
    assert sc["micro_f1"] == 1.0
    assert np.nanmin(sc["f1"]) == 1.0


def test_a_coarser_map_averages_only_the_slide_not_the_padding_past_its_edge(tmp_path, stripes):
    """At out_mpp 4x the target, the last map row and column cover 1 to 3 target px of slide
    and the rest padding: they take the slide's class (they were mostly the padding's)."""
    path, cls = stripes  # 301 x 427: the last output row holds slide row 300 only
    out, _ = run_infer(tmp_path, path, [oracle(32)], out_mpp=4 * MPP)
    # every 4 x 4 block of the stripes lies in one cell, so the map is the classes subsampled
    np.testing.assert_array_equal(read_map(out / "map.tiff"), cls[::4, ::4])


def test_a_coarser_map_pixel_is_the_class_most_of_its_pixels_hold(tmp_path) -> None:
    """At out_mpp 3x the target, each map pixel is the class of highest mean probability over
    its 3 x 3 target px, here (a sure oracle, random classes) the class most of them hold. Pooled
    as blending-weighted sums, pixels near a core's corner had counted less, and at borders the
    minority class won."""
    h, w, f = 96, 144, 3
    cls = np.random.default_rng(0).integers(1, 4, (h, w)).astype(np.uint8)
    rgb_slide(tmp_path / "noise.tiff", COLOURS[cls - 1], MPP, tile=16)
    out, _ = run_infer(tmp_path, tmp_path / "noise.tiff", [oracle(32)], out_mpp=f * MPP, tile=16)
    boxes = cls.reshape(h // f, f, w // f, f).transpose(0, 2, 1, 3).reshape(h // f, w // f, -1)
    counts = np.stack([(boxes == k).sum(-1) for k in (1, 2, 3)], -1)
    one_winner = (counts == counts.max(-1, keepdims=True)).sum(-1) == 1
    got = read_map(out / "map.tiff")
    np.testing.assert_array_equal(got[one_winner], counts.argmax(-1)[one_winner] + 1)


def test_a_scan_within_the_tolerance_is_mapped_in_its_own_pixels(tmp_path) -> None:
    """A 0.505 um/px scan for a model of 0.5 (within patches.mpp_tolerance) is read as its
    level is, as its tiles were cut: the map is at 0.505 um/px, pixel for pixel on the slide,
    across bands (a grid at the model's 0.5 drifted up to 18 um within each band)."""
    cls = stripe_classes(96, 1500)
    path = tmp_path / "scan.tiff"
    rgb_slide(path, COLOURS[cls - 1], 0.505, tile=64)
    slide = open_slide(path)
    out = tmp_path / "out"
    meta = infer_slide(slide, np.ones((13, 190), bool), 0.505 * 8, [oracle(32)],
                       settings(band_windows=2), out / "map.tiff", out / "map.jpg",
                       out / "map.json", progress=False)  # fmt: skip
    assert meta["mpp"] == pytest.approx(0.505) and meta["target_mpp"] == pytest.approx(0.505)
    np.testing.assert_array_equal(read_map(out / "map.tiff"), cls)


def test_a_slide_coarser_than_the_models_is_mapped_with_a_warning(tmp_path, caplog) -> None:
    """A 20x cohort under 40x models is upsampled for them: said in the log (a prediction run
    has no patches stage, whose warning a training run gets) and recorded in the map's JSON."""
    cls = stripe_classes(96, 300)
    path = tmp_path / "coarse.tiff"
    rgb_slide(path, COLOURS[cls - 1], 2 * MPP, tile=64)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="dsf.infer"):
        meta = infer_slide(open_slide(path), np.ones((13, 190), bool), MPP * 16, [oracle(32)],
                           settings(), out / "map.tiff", out / "map.jpg", out / "map.json",
                           progress=False)  # fmt: skip
    assert "finer than the slide's 1 um/px: the slide is upsampled" in caplog.text
    assert "5x/20x" not in caplog.text  # a 1 um/px scan: that geometry would upsample it too
    assert meta["slide_mpp"] == pytest.approx(2 * MPP) and meta["mpp"] == pytest.approx(MPP)
    assert json.loads((out / "map.json").read_text())["slide_mpp"] == pytest.approx(2 * MPP)
    caplog.clear()
    path = tmp_path / "same.tiff"
    rgb_slide(path, COLOURS[cls - 1], MPP, tile=64)
    with caplog.at_level(logging.WARNING, logger="dsf.infer"):
        infer_slide(open_slide(path), np.ones((13, 190), bool), MPP * 8, [oracle(32)],
                    settings(), out / "map.tiff", out / "map.jpg", out / "map.json",
                    progress=False)  # fmt: skip
    assert "upsampled" not in caplog.text


def test_a_failed_rerun_leaves_no_earlier_outputs_beside_it(tmp_path, stripes, monkeypatch):
    """A rerun removes the earlier map, overlay and JSON first: failing midway, it leaves none
    of them to be taken for one run's; a map and a JSON of different runs are refused."""
    from dsf.class_map import open_map

    out, _ = run_infer(tmp_path, stripes[0], [oracle(32)])
    meta = json.loads((out / "map.json").read_text())
    other = {"classes": ["ignore", "X", "Y", "Z"], "folds": [0], "routing": "given"}
    (out / "map.json").write_text(json.dumps(meta | other))
    with pytest.raises(ConfigError, match=r"holds classes \['ignore', 'A', 'B', 'C'\], its JSON"):
        open_map(out / "map.tiff")

    def broken(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("dsf.infer.render_overlay", broken)
    with pytest.raises(OSError, match="disk full"):
        run_infer(tmp_path, stripes[0], [oracle(32)])
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_map_without_probabilities_leaves_none_of_an_earlier_run(tmp_path, stripes) -> None:
    """Turning infer.probabilities off: the next map of the slide must not sit beside the
    probabilities of an earlier, different map."""
    out, _ = run_infer(tmp_path, stripes[0], [oracle(32)], probabilities=True)
    assert (out / "map.probs.zarr").is_dir()
    run_infer(tmp_path, stripes[0], [oracle(32)], probabilities=False)
    assert sorted(p.name for p in out.iterdir()) == ["map.jpg", "map.json", "map.tiff"]


def test_models_whose_mpp_differ_within_the_tolerance_are_one_geometry() -> None:
    """Models fine-tuned before they recorded the configured mpp hold their first store's
    actual one (0.2527 for 0.25): folds differing so are still ensembled; 0.5 is not. The
    tolerance is patches.mpp_tolerance, the one the stores were cut within."""
    from dsf.infer import _check_models

    a, b, c, d = oracle(32), oracle(32), oracle(32), oracle(32)
    a.target_mpp, b.target_mpp, c.target_mpp, d.target_mpp = 0.25, 0.2527, 0.5, 0.27
    _check_models([a, b], 0.05)
    with pytest.raises(ConfigError, match="differ in target_mpp"):
        _check_models([a, c], 0.05)
    with pytest.raises(ConfigError, match="differ in target_mpp"):
        _check_models([a, d], 0.05)
    _check_models([a, d], 0.1)  # a user who raised the tolerance


def test_tissue_mask_decides_windows_and_output(tmp_path, stripes):
    path, cls = stripes
    h, w = cls.shape
    mask = np.zeros((h // 8 + 1, w // 8 + 1), bool)
    mask[10:20, 5:30] = True  # target px rows 80-160, cols 40-240
    out, meta = run_infer(
        tmp_path, path, [oracle(32)], mask=mask, mask_output=True, probabilities=True
    )
    got = read_map(out / "map.tiff")
    inside = np.zeros_like(got, bool)
    inside[80:160, 40:240] = True
    np.testing.assert_array_equal(got[inside], cls[inside])
    assert (got[~inside] == 0).all()
    # counted after the mask: outside the tissue is background (index 0)
    assert meta["class_pixels"] == np.bincount(got.ravel(), minlength=4).tolist()
    assert meta["class_pixels"][0] == (~inside).sum()
    # the probabilities are the map's: none outside the tissue (they had been kept there)
    probs = np.asarray(zarr.open_group(out / "map.probs.zarr", mode="r")["0"][:])
    assert (probs[:, ~inside] == 0).all() and (probs.max(0)[inside] > 200).all()
    full = make_grid(w, h, 32, 4, 0.25, 1, 4)
    assert meta["windows"] < tissue_windows(full, np.ones_like(mask), MPP * 8, MPP).sum()


def test_a_band_of_sparse_windows_holds_few_rows_of_its_blend(tmp_path, stripes, monkeypatch):
    """A thin strip of tissue gives a band one window a row: its windows run once their blend
    would pass stitch.BLEND_BYTES (here none: MIN_SPAN window rows), short of a batch, so it
    holds a few core rows of the band's width, not a batch's worth (a batch of 64 had held 64
    of them, 1.85 GiB at the paper's geometry); the map is the same."""
    import dsf.stitch

    path, cls = stripes
    h, w = cls.shape
    mask = np.zeros((h // 8 + 1, w // 8 + 1), bool)
    mask[:, 20:22] = True  # target px columns 160-176: one 32 px window a row
    held, row = [0], dsf.stitch.BandAccumulator._row

    def counting(self, r):  # noqa: ANN001, ANN202
        out = row(self, r)
        held[0] = max(held[0], len(self.rows))
        return out

    monkeypatch.setattr(dsf.stitch.BandAccumulator, "_row", counting)
    monkeypatch.setattr(dsf.stitch, "BLEND_BYTES", 0)
    out, meta = run_infer(tmp_path, path, [oracle(32)], mask=mask, mask_output=True, batch_size=64)
    assert meta["windows"] > 3 * dsf.stitch.MIN_SPAN  # more rows than a span, fewer than a batch
    got = read_map(out / "map.tiff")
    inside = np.zeros_like(got, bool)
    inside[:, 160:176] = True
    np.testing.assert_array_equal(got[inside], cls[inside])
    assert (got[~inside] == 0).all()
    assert 0 < held[0] <= dsf.stitch.MIN_SPAN + 3  # and the rows a block spans past them


def test_a_mask_without_tissue_is_refused_and_leaves_no_map(tmp_path, stripes) -> None:  # noqa: ANN001
    """An empty mask (by hand, or another slide's) gave an all-background map that looked
    complete; DESIGN: no tissue is an error naming the slide, never an empty output."""
    path, cls = stripes
    h, w = cls.shape
    with pytest.raises(TissueError, match="has no tissue.*dsf tissue"):
        run_infer(tmp_path, path, [oracle(32)], mask=np.zeros((h // 8 + 1, w // 8 + 1), bool))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_windows_are_cut_from_only_the_columns_they_need(tmp_path, stripes, monkeypatch):
    """Each row chunk reads just the columns its tissue windows' contexts cover (the rest of
    the band is never decoded), and every window the model gets equals its target block and
    its context read straight from the slide (reduced by the scale), edges padded as the
    slide's background."""
    from dsf.slide import Slide
    from dsf.windows import plan_bands

    widths: list[tuple[int, int]] = []
    read = Slide.read

    def spy(self, x, y, width, height, mpp):
        widths.append((width, height))
        return read(self, x, y, width, height, mpp)

    seen: list[tuple[np.ndarray, np.ndarray]] = []
    probabilities = Predictor.probabilities

    def record(self, context, target):
        seen.append((context.cpu().numpy(), target.cpu().numpy()))
        return probabilities(self, context, target)

    monkeypatch.setattr(Slide, "read", spy)
    monkeypatch.setattr(Predictor, "probabilities", record)
    path, cls = stripes
    h, w = cls.shape
    mask = np.zeros((h // 8 + 1, w // 8 + 1), bool)
    mask[0:6, 3:6] = True  # two pieces of tissue far apart in one band, one at the top edge
    mask[28:38, 44:54] = True  # and one over the bottom right corner
    out, meta = run_infer(tmp_path, path, [oracle(32)], mask=mask, band_windows=20)
    grid = make_grid(w, h, 32, 4, 0.25, 1, 20)
    run = tissue_windows(grid, mask, MPP * 8, MPP)
    (band,) = plan_bands(grid, run)  # one band spans the slide ...
    chunk_reads = [wd for wd, ht in widths if ht == meta["stride"]]
    assert chunk_reads and max(chunk_reads) < band.width / 2  # ... but no chunk reads it all
    r0, _ = grid.windows_touching(0, grid.cores[0] - 1)
    c0, _ = grid.windows_touching(0, grid.cores[1] - 1)
    s, o, b = grid.stride, grid.offset, grid.block
    slide = open_slide(path)
    expected_ctx, expected_tgt = [], []
    for band in plan_bands(grid, run):
        wc0, wc1 = band.wcols
        for wr in band.wrows:
            for wc in np.flatnonzero(run[wr - r0, wc0 - c0 : wc1 - c0 + 1]) + wc0:
                x, y = wc * s - o, wr * s - o
                expected_tgt.append(read(slide, x, y, b, b, MPP))
                field = read(slide, x - grid.halo, y - grid.halo, 4 * b, 4 * b, MPP)
                expected_ctx.append(reduce_rgb(field, 4))
    contexts = np.concatenate([c for c, _ in seen])
    targets = np.concatenate([t for _, t in seen])
    assert len(targets) == meta["windows"] == len(expected_tgt) > 10
    np.testing.assert_array_equal(targets, np.stack(expected_tgt))
    np.testing.assert_array_equal(contexts, np.stack(expected_ctx))
    got = read_map(out / "map.tiff")
    assert (got > 0).sum() > 10 * 24 * 24


def test_hann_weights_are_the_floored_sine_squared_window() -> None:
    """The blending weights, written out: per axis sin^2(pi (k + 0.5) / b) floored at 1e-3
    (so a pixel only a window's edge covers keeps a weight), their outer product. The
    blending test computes its expectation with hann_weights itself, so it passes whatever
    the weights are, flat ones included."""
    from dsf.windows import hann_weights

    a = (2 - np.sqrt(2)) / 4  # sin^2(pi / 8); sin^2(3 pi / 8) = 1 - a
    w4 = np.array([a, 1 - a, 1 - a, a])
    np.testing.assert_allclose(hann_weights(4), np.outer(w4, w4), rtol=1e-6)
    w = hann_weights(64)
    assert w.shape == (64, 64) and w.dtype == np.float32
    edge = np.maximum(np.sin(np.pi * (np.arange(64) + 0.5) / 64) ** 2, 1e-3)
    np.testing.assert_allclose(w, np.outer(edge, edge), rtol=1e-6)
    # sin^2(pi / 128) = 6.0e-4 is below the floor: the corner is 1e-3 squared, never 0
    assert w[0, 0] == pytest.approx(1e-6, rel=1e-6) and w.min() > 0
    assert w[0, 32] == pytest.approx(1e-3 * np.sin(np.pi * 32.5 / 64) ** 2, rel=1e-6)
    # symmetric, highest at the centre, falling off towards every edge
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)
    assert w[31, 31] == pytest.approx(w.max()) and w.max() > 0.99
    assert w[31, 31] > w[16, 31] > w[4, 31] > w[0, 31]


@pytest.mark.parametrize(
    ("block", "overlap", "band"), [(32, 0.25, 3), (32, 0.0, 4), (32, 0.5, 2), (64, 0.4, 1)]
)
def test_blending_is_the_weighted_mean_of_the_windows(block, overlap, band):
    """The band accumulator's probabilities equal the Hann-weighted mean, over the windows
    covering each pixel, computed window by window (random windows disagree everywhere, so
    every piece of every overlap counts); never-covered pixels are class 0."""
    from dsf.stitch import BandAccumulator
    from dsf.windows import hann_weights, plan_bands

    rng = np.random.default_rng(block + band)
    h, w, n_fg = 150, 230, 3
    grid = make_grid(w, h, block, 4, overlap, 1, band)
    s, o, b = grid.stride, grid.offset, grid.block
    rows, cols = grid.cores
    r0, r1 = grid.windows_touching(0, rows - 1)
    c0, c1 = grid.windows_touching(0, cols - 1)
    run = rng.random((r1 - r0 + 1, c1 - c0 + 1)) < 0.7
    probs = rng.random((*run.shape, n_fg, b, b)).astype(np.float32) + 0.01
    hann = hann_weights(b)
    # the reference: every running window added onto a padded canvas, one at a time
    pad = 2 * b  # windows hang over the slide edges by up to a block and a stride
    acc = np.zeros((n_fg + 1, h + 2 * pad, w + 2 * pad))
    for i, j in zip(*np.nonzero(run), strict=True):
        y, x = (i + r0) * s - o + pad, (j + c0) * s - o + pad
        acc[:n_fg, y : y + b, x : x + b] += probs[i, j] * hann
        acc[n_fg, y : y + b, x : x + b] += hann
    acc = acc[:, pad : pad + h, pad : pad + w]
    covered = acc[n_fg] > 0
    expected = np.round(acc[:n_fg] / np.maximum(acc[:n_fg].sum(0), 1e-12) * 255)
    got_probs = np.zeros((n_fg, rows * s, cols * s))
    got_cls = np.zeros((rows * s, cols * s), np.uint8)
    for bd in plan_bands(grid, run):
        accumulator = BandAccumulator(grid, bd, n_fg, torch.device(DEVICE), want_probs=True)
        wc0, wc1 = bd.wcols
        for wr in bd.wrows:
            wcols = np.flatnonzero(run[wr - r0, wc0 - c0 : wc1 - c0 + 1]) + wc0
            cells = torch.from_numpy(wcols - wc0).to(DEVICE)
            accumulator.add(wr, cells, torch.from_numpy(probs[wr - r0, wcols - c0]).to(DEVICE))
        x = bd.cores[0] * s
        for r in range(rows):
            cls_row, prob_row = accumulator.pop(r)
            width = cls_row.shape[1]
            got_cls[r * s : (r + 1) * s, x : x + width] = cls_row.cpu().numpy()
            if prob_row is not None:
                got_probs[:, r * s : (r + 1) * s, x : x + width] = prob_row.cpu().numpy()
    got_probs, got_cls = got_probs[:, :h, :w], got_cls[:h, :w]
    assert covered.mean() > 0.5
    assert (got_cls[~covered] == 0).all()
    assert np.abs(got_probs - expected)[:, covered].max() <= 1
    top2 = np.sort(acc[:n_fg], axis=0)[-2:]
    clear = covered & (top2[1] - top2[0] > 1e-4 * acc[n_fg])
    np.testing.assert_array_equal(got_cls[clear], acc[:n_fg].argmax(0)[clear] + 1)


def test_ensemble_averages_models(tmp_path, stripes):
    path, cls = stripes
    out, meta = run_infer(tmp_path, path, [oracle(32), oracle(32, from_context=True)])
    np.testing.assert_array_equal(read_map(out / "map.tiff"), cls)
    # models of different label fractions (a whole results/finetune/<init> folder): refused,
    # since the map would be labelled with one fraction
    other = oracle(32, from_context=True)
    other.meta = {"fraction": 0.1}
    (tmp_path / "mixed").mkdir()
    with pytest.raises(ConfigError, match=r"different label fractions \[0\.1, 1\.0\]"):
        run_infer(tmp_path / "mixed", path, [oracle(32), other])
    assert not list((tmp_path / "mixed").rglob("*.tiff"))


def test_failure_leaves_no_complete_looking_output(tmp_path, stripes):
    path, _ = stripes

    class Boom(nn.Module):
        calls = 0

        def forward(self, context, target, context_logits=True):
            Boom.calls += 1
            if Boom.calls > 2:
                raise RuntimeError("device lost")
            return torch.zeros(target.shape[0], 4, *target.shape[-2:], device=target.device), None

    pred = oracle(32)
    pred.model = Boom()
    with pytest.raises(RuntimeError, match="device lost"):
        run_infer(tmp_path, path, [pred])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_writer_error_stops_the_run_and_leaves_no_map(tmp_path, stripes, monkeypatch):
    """The map is written on a thread of its own: its error (a full disk, say) stops the run
    with a message naming the slide and the map, the thread ends, and nothing that looks
    complete is left."""
    import threading

    import dsf.map_writer

    add_row = dsf.map_writer.MapWriter.add_row
    calls = []

    def failing(self, band, cls, probs):
        calls.append(band)
        if len(calls) > 3:
            raise OSError("No space left on device")
        add_row(self, band, cls, probs)

    monkeypatch.setattr(dsf.map_writer.MapWriter, "add_row", failing)
    path, _ = stripes
    with pytest.raises(SlideError, match=r"'stripes'.*map\.tiff.*No space left.*free disk"):
        run_infer(tmp_path, path, [oracle(32)])
    assert len(calls) == 4  # nothing more was written after the error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    assert "dsf-write" not in {t.name for t in threading.enumerate()}


def test_output_mpp_must_be_a_multiple(tmp_path, stripes):
    """A multiple of the mpp the map is made at, within patches.mpp_tolerance: a model that
    records its tiles' 0.505 um/px maps a 0.5 um/px slide at its 0.5, and out_mpp 1.0 is 2 of
    those (it had been refused, and 1.01 taken for 1.0)."""
    path, cls = stripes
    with pytest.raises(ConfigError, match="infer.out_mpp"):
        run_infer(tmp_path, path, [oracle(32)], out_mpp=0.75)
    pred = oracle(32)
    pred.target_mpp = 0.505
    _, meta = run_infer(tmp_path, path, [pred], out_mpp=1.0)
    assert meta["mpp"] == 1.0 and meta["target_mpp"] == 0.5
    assert read_map(tmp_path / "out" / "map.tiff").shape == tuple(-(-n // 2) for n in cls.shape)
    assert out_factor(2.0, 0.2527 * 2, 0.05) == 4
    with pytest.raises(ConfigError, match="within patches.mpp_tolerance 0.01"):
        out_factor(2.0, 0.2527 * 2, 0.01)


def test_a_map_tile_tiff_cannot_hold_is_refused_before_any_prediction() -> None:
    """TIFF tiles are multiples of 16: `infer.tile` 24 had passed the config and failed each
    slide's job only when writing its map, after the whole slide was predicted."""
    from dsf.config import validate

    with pytest.raises(ConfigError, match=r"infer\.tile: 24 is not a multiple of 16"):
        validate(defaults("infer") | {"tile": 24}, "infer")
    assert validate(defaults("infer") | {"tile": 48}, "infer")["tile"] == 48


def test_models_that_disagree_on_geometry_are_refused(tmp_path, stripes):
    path, _ = stripes
    with pytest.raises(ConfigError, match="block"):
        run_infer(tmp_path, path, [oracle(32), oracle(64)])


def test_grid_cores_tile_the_slide():
    g = make_grid(427, 301, 32, 4, 0.25, 1, 4)
    assert (g.stride, g.offset, g.halo) == (24, 4, 48)
    assert (g.offset + g.halo) % g.scale == 0
    assert g.cores == (13, 18)
    lo, hi = g.windows_touching(0, 0)
    # window -1 spans [-28, 4): it touches core 0 ([0, 24)); window 1 starts at 20 < 24
    assert (lo, hi) == (-1, 1)


def _hooknet_model_pt(path: Path, block: int = 64) -> Path:
    """A model.pt as `dsf finetune` writes it (random HookNet weights)."""
    from dsf.models.hooknet import HookNet

    torch.manual_seed(0)
    torch.save(
        {
            "state_dict": HookNet(4, scale=4, input_size=block).state_dict(),
            "init": "random",
            "classes": ["ignore", "A", "B", "C"],
            "scale": 4,
            "block": block,
            "target_mpp": MPP,
            "mean": NORM[0],
            "std": NORM[1],
            "fold": 1,
            "fraction": 1.0,
        },
        path,
    )
    return path


def test_predictor_runs_only_what_the_target_logits_need(tmp_path, exact_float32):
    """A loaded HookNet predicts without its context head (the context decoder stops at the
    hook), and its probabilities are the softmax of the full forward's target logits (both in
    float32: AMP's rounding would hide a difference)."""
    from dsf.predict import load_predictor

    pred = load_predictor(_hooknet_model_pt(tmp_path / "model.pt"), torch.device(DEVICE), amp=False)
    heads: list[str] = []
    pred.model.context_head.register_forward_hook(lambda *_: heads.append("context"))
    pred.model.target_head.register_forward_hook(lambda *_: heads.append("target"))
    gen = torch.Generator().manual_seed(0)
    ctx, tgt = (
        torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=gen) for _ in "ct"
    )
    probs = pred.probabilities(ctx.to(DEVICE), tgt.to(DEVICE))
    assert heads == ["target"]
    prep = [
        ((x.to(DEVICE).permute(0, 3, 1, 2).float() / 255 - pred.mean) / pred.std)
        for x in (ctx, tgt)
    ]
    with torch.no_grad():
        full = pred.model(*prep)[0].float()
    # over the foreground classes: class 0 (ignore) takes no share
    want = full[:, 1:].softmax(dim=1)
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)


def _cli(tmp_path: Path, slide: Path, model: Path) -> list[str]:
    import sys

    from dsf.tissue import write_mask

    mask = tmp_path / "mask.tiff"
    if not mask.exists():
        w, h = open_slide(slide).dimensions
        write_mask(mask, np.ones((h // 8 + 1, w // 8 + 1), bool), MPP * 8)
    out = tmp_path / "maps"
    return [
        sys.executable, "-m", "dsf", "infer", "--slide", str(slide), "--tissue-mask", str(mask),
        "--models", str(model), "--out-map", str(out / "s.tiff"), "--out-overlay",
        str(out / "s.jpg"), "--out-meta", str(out / "s.json"), "--device", "cpu",
        "--batch-size", "8", "--no-progress",
    ]  # fmt: skip


def test_cli_writes_map_overlay_and_meta(tmp_path, stripes):
    import subprocess

    path, cls = stripes
    model = _hooknet_model_pt(tmp_path / "model.pt")
    subprocess.run(_cli(tmp_path, path, model), check=True, capture_output=True)
    out = tmp_path / "maps"
    meta = json.loads((out / "s.json").read_text())
    assert meta["folds"] == [1] and meta["routing"] == "out_of_fold"
    assert meta["models"] == [str(model)]
    phases = meta["phase_seconds"]
    assert list(phases) == ["predict", "tiff", "overlay"]
    assert all(v >= 0 for v in phases.values())
    # each figure is rounded to ms: their sum may pass the rounded total by 0.5 ms each
    assert sum(phases.values()) <= meta["seconds"] + 0.0005 * (len(phases) + 1)
    got = read_map(out / "s.tiff")
    assert got.shape == cls.shape and got.min() >= 1 and got.max() <= 3
    # the file says what its values are without the JSON beside it
    with tifffile.TiffFile(out / "s.tiff") as tif:
        about = json.loads(tif.pages[0].description)
        palette = tif.pages[0].colormap
    assert about["classes"] == meta["classes"] and about["mpp"] == meta["mpp"]
    assert len(about["colours"]) == len(meta["classes"])
    # viewers draw the palette: the classes in their colours, the background white as glass
    from dsf.colours import class_colours

    assert about["colours"][0] == [255, 255, 255] and (palette[:, 0] == 65535).all()
    want = class_colours(len(meta["classes"]))[1:].astype(int).tolist()
    assert about["colours"][1:] == want
    assert (palette[:, 1 : len(want) + 1].T // 257).tolist() == want
    from PIL import Image

    with Image.open(out / "s.jpg") as im:
        assert im.format == "JPEG" and im.width > 100


class _FakeEvent:
    """Stands in for torch.cuda.Event: done once the test says so."""

    made: list[_FakeEvent] = []

    def __init__(self) -> None:
        self.done = False
        self.waited = False
        self.stream: object = None
        _FakeEvent.made.append(self)

    def record(self, stream: object = None) -> None:
        self.stream = stream

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_rows_reach_the_writer_in_order_once_their_copies_are_done() -> None:
    """The GPU path of the device-to-host queue, with stand-in events: a row is handed on only
    when its copy is done, in order, the oldest is waited for past the limit, flush empties."""
    from dsf.map_writer import RowsToHost

    class Writer:
        def __init__(self) -> None:
            self.rows: list[tuple[int, int]] = []

        def add_row(self, band: int, cls: np.ndarray, probs: np.ndarray | None) -> None:
            assert isinstance(cls, np.ndarray) and probs is None
            self.rows.append((band, int(cls[0, 0])))

    writer = Writer()
    q = RowsToHost(writer, torch.device("cpu"), limit=2)  # type: ignore[arg-type]
    q.gpu, q.new_event, q._host, q.stream = True, _FakeEvent, lambda t: t, "copy stream"
    _FakeEvent.made.clear()
    row = lambda v: torch.full((2, 3), v, dtype=torch.uint8)  # noqa: E731
    q.put(0, row(1), None)
    q.put(0, row(2), None)
    assert writer.rows == []  # copies still in flight
    _FakeEvent.made[1].done = True
    q.drain(block=False)
    assert writer.rows == []  # row 2 is done but row 1 is not: order is kept
    q.put(0, row(3), None)  # a third row in flight passes the limit: row 1 is waited for
    assert _FakeEvent.made[0].waited and writer.rows == [(0, 1), (0, 2)]
    q.put(1, row(4), None)
    q.flush()
    assert writer.rows == [(0, 1), (0, 2), (0, 3), (1, 4)] and not q.pending
    # each event marks the copy on the stream of the map's device (not the current card's)
    assert {e.stream for e in _FakeEvent.made} == {"copy stream"}


def test_tiff_tiles_are_the_spooled_tiles_copied(tmp_path, monkeypatch):
    """The spooled levels' tiles are compressed once, as the rows arrive: the TIFF holds their
    bytes unchanged. Rows that continue the previous write wait for the rest of their tile row;
    a tile written in pieces (a band edge through it, a band that ends inside it) is put
    together, one never written is all 0, and every level reads back equal to the image, edge
    tiles included."""
    from concurrent.futures import ThreadPoolExecutor

    import dsf.class_tiff
    import dsf.tilespool
    from dsf.tilespool import TileSpool

    tile, h, w = 32, 70, 100
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4, (h, w), dtype=np.uint8)
    data[:, :32] = 0  # tile column 0: never written
    with ThreadPoolExecutor(2) as pool:
        spool = TileSpool(tmp_path / "level0.tiles", (h, w), tile, pool)
        spool.write(0, 32, data[:64, 32:50])  # two bands meet inside tile column 1
        spool.write(0, 50, data[:64, 50:])
        spool.write(64, 32, data[64:67, 32:])  # a band ends 3 rows into tile row 2 ...
        spool.flush()
        spool.write(67, 32, data[67:, 32:])  # ... and the next one starts there
        spool.close()
        # rows that continue the previous write wait: a tile row in two writes is stored whole
        joined = TileSpool(tmp_path / "joined.tiles", (h, w), tile, pool)
        joined.write(0, 32, data[:20, 32:])
        assert not joined.index  # nothing stored yet: the rows wait for their tile row
        joined.write(20, 32, data[20:, 32:])
        joined.close()
    assert all(v[0][2:] == (0, 0, 32, 32) and len(v) == 1 for v in joined.index.values())
    np.testing.assert_array_equal(joined.asarray(), data)
    small = data[::2, ::2].copy()
    stored = {k: v for k, v in spool.index.items() if len(v) == 1 and v[0][2:] == (0, 0, 32, 32)}
    assert sorted(stored) == [(0, 2), (0, 3), (1, 2), (1, 3)]  # the whole tiles, stored as such

    # only the tiles in pieces are encoded when the TIFF is written
    encoded = []
    monkeypatch.setattr(dsf.tilespool, "_encode", lambda a: encoded.append(a.shape) or b"")
    tiles = list(spool.tiles())
    assert len(tiles) == 3 * 4 and len(encoded) == 3 * 4 - 4 - 3  # 4 whole, 3 never written
    monkeypatch.undo()
    dsf.class_tiff.write_tiff(tmp_path / "m.tiff", [spool, small], 0.5, 4, tile)
    with tifffile.TiffFile(tmp_path / "m.tiff") as tf:
        np.testing.assert_array_equal(tf.pages[0].asarray(), data)
        np.testing.assert_array_equal(tf.pages[1].asarray(), small)
        page = tf.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        fh = tf.filehandle
        with spool.path.open("rb") as f:
            for (ty, tx), ((off, n, *_),) in stored.items():
                k = ty * 4 + tx
                fh.seek(page.dataoffsets[k])
                f.seek(off)
                assert fh.read(page.databytecounts[k]) == f.read(n), f"tile {ty}, {tx}"
    np.testing.assert_array_equal(spool.asarray(), data)


def test_the_overlay_legend_names_every_class() -> None:
    """Many or long class names wrap onto more legend rows, each entry inside the picture,
    instead of running off its right edge; a few short ones take one row."""
    from dsf.map_writer import render_overlay

    thumb = np.full((300, 600, 3), 200, np.uint8)
    cls = np.zeros((30, 60), np.uint8)
    few = render_overlay(thumb, cls, ["ignore", "TUM", "STR"])
    names = ["ignore", *(f"tumour_associated_class_{i}" for i in range(10))]
    many = render_overlay(thumb, cls, names)
    row = few.shape[0] - 300  # one legend row and its padding
    assert many.shape[1] == 600 and many.shape[0] - 300 > 3 * (row - 10)
    legend = many[300:]
    ink = (legend < 128).all(axis=2)  # the black text and swatch outlines
    rows_with_ink = np.flatnonzero(ink.any(axis=1))
    assert rows_with_ink.max() - rows_with_ink.min() > 2 * (row - 10)  # several rows used
    assert not ink[:, -2:].any()  # nothing drawn up to the right edge: no entry cut off


def test_each_class_tint_keeps_its_legend_colours_hue_over_stained_tissue() -> None:
    """Over pink and purple H&E a plain blend shifted a tint's hue (STR's sky blue looked
    lavender, unlike its legend swatch): the tint goes over the tissue in grey, so each class
    keeps its swatch's hue, and the background is left as it was."""
    import colorsys

    from dsf.colours import class_colours
    from dsf.figures import overlay
    from dsf.map_writer import render_overlay

    names = ["ignore", "TUM", "STR", "LYM", "NEC", "OTR"]
    colours = class_colours(len(names))
    for stain in ((230, 150, 200), (120, 70, 160)):  # eosin pink, haematoxylin purple
        thumb = np.zeros((10, 60, 3), np.uint8) + np.array(stain, np.uint8)
        cls = np.repeat(np.arange(6, dtype=np.uint8), 10)[None].repeat(10, 0)
        for picture in (render_overlay(thumb, cls, names)[:10], overlay(thumb, cls, 6)):
            np.testing.assert_array_equal(picture[:, :10], thumb[:, :10])  # background
            for c in range(1, 6):
                got = colorsys.rgb_to_hsv(*(picture[5, 10 * c + 5] / 255))
                want = colorsys.rgb_to_hsv(*(colours[c] / 255))
                turn = abs(got[0] - want[0])
                assert min(turn, 1 - turn) < 0.02, (stain, names[c], got, want)


def test_a_grid_with_no_stride_says_which_setting_helps() -> None:
    """Too much overlap: lower it; a map pixel larger than a block: no overlap would help,
    the message says to lower infer.out_mpp instead."""
    with pytest.raises(ConfigError, match="lower infer.overlap"):
        make_grid(1000, 1000, 64, 4, 0.99, 2, 4)
    with pytest.raises(ConfigError, match="use a smaller infer.out_mpp") as e:
        make_grid(1000, 1000, 64, 4, 0.0, 128, 4)
    assert "lower infer.overlap" not in str(e.value)


def test_the_overlay_legend_gives_each_class_its_share_of_the_mapped_area(monkeypatch) -> None:  # noqa: ANN001
    """With the map's pixel counts the legend reads "TUM 25.0%" (of the pixels that got a
    class, the background left out); without them, the names alone."""
    import dsf.map_writer as mw

    seen: list[list[str]] = []
    monkeypatch.setattr(
        mw, "add_legend", lambda pic, keys, **kw: seen.append([k for _, k in keys]) or pic
    )
    thumb = np.full((30, 60, 3), 200, np.uint8)
    cls = np.zeros((30, 60), np.uint8)
    mw.render_overlay(thumb, cls, ["ignore", "TUM", "STR"], counts=np.array([500, 10, 30]))
    mw.render_overlay(thumb, cls, ["ignore", "TUM", "STR"])
    mw.render_overlay(thumb, cls, ["ignore", "TUM", "STR"], counts=np.array([500, 0, 0]))
    assert seen == [["TUM 25.0%", "STR 75.0%"], ["TUM", "STR"], ["TUM", "STR"]]


@pytest.mark.parametrize(
    ("block", "overlap", "ratio"), [(40, 0.3, 3.0), (32, 0.25, 8.0), (24, 0.5, 2.5)]
)
def test_window_planning_matches_its_definitions(block: int, overlap: float, ratio: float) -> None:
    """Brute force over every window: `tissue_windows` keeps exactly the windows whose block
    overlaps a tissue pixel of the mask (`ratio` target px per mask px, a block's edge often
    inside a mask pixel), and `final_rows` is the count of leading core rows whose every
    touching window row is done."""
    from dsf.windows import final_rows

    grid = make_grid(433, 389, block, 4, overlap, 1, 4)
    rng = np.random.default_rng(block)
    mh, mw = math.ceil(389 / ratio), math.ceil(433 / ratio)
    mask = rng.random((mh, mw)) < 0.03
    got = tissue_windows(grid, mask, MPP * ratio, MPP)
    r0, r1 = grid.windows_touching(0, grid.cores[0] - 1)
    c0, c1 = grid.windows_touching(0, grid.cores[1] - 1)
    want = np.zeros((r1 - r0 + 1, c1 - c0 + 1), bool)
    for i in range(r0, r1 + 1):
        for j in range(c0, c1 + 1):
            y, x = i * grid.stride - grid.offset, j * grid.stride - grid.offset
            ys = slice(max(0, math.floor(y / ratio)), max(0, math.ceil((y + block) / ratio)))
            xs = slice(max(0, math.floor(x / ratio)), max(0, math.ceil((x + block) / ratio)))
            want[i - r0, j - c0] = mask[ys, xs].any()
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < want.size
    for done in range(r0, r1 + 1):
        rows = next(r for r in range(10**4) if grid.windows_touching(r, r)[1] > done)
        assert final_rows(grid, done) == rows, done


def test_encoders_given_as_a_model_are_named_for_what_they_are(tmp_path: Path) -> None:
    """`dsf infer --models encoders.pt` had been told the file was of an older `dsf
    finetune`, to be rerun; it is pretraining's encoders (or a training checkpoint)."""
    from dsf.checkpoints import save
    from dsf.errors import ConfigError
    from dsf.predict import load_predictor

    for name, state in (
        ("encoders.pt", {"context": {}, "target": {}}),
        ("checkpoint.pt", {"model": {}, "optimizer": {}}),
    ):
        save(state, tmp_path / name)
        with pytest.raises(
            ConfigError, match=r"is not a fine-tuned model .*model\.pt of `dsf finetune`"
        ):
            load_predictor(tmp_path / name, torch.device("cpu"))
    save({"state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match=r"not written by this version of `dsf finetune`"):
        load_predictor(tmp_path / "old.pt", torch.device("cpu"))


def test_routing_by_hand_follows_the_models():
    """`dsf infer` without --routing records what its models are: several an ensemble, one that
    trained on the slide its fold's model, else out of fold (it had said out_of_fold always)."""
    from types import SimpleNamespace

    from dsf.infer import default_routing

    fold0 = SimpleNamespace(meta={"fold": 0, "fit_slides": ["a"], "select_slides": ["b"]})
    fold1 = SimpleNamespace(meta={"fold": 1, "fit_slides": ["c"], "select_slides": ["d"]})
    assert default_routing([fold0, fold1], "a") == "ensemble"
    assert default_routing([fold0], "c") == "out_of_fold"
    assert default_routing([fold0], "a") == "fold"
    assert default_routing([fold0], "b") == "fold"


def test_a_model_that_gives_nan_leaves_no_map(tmp_path, stripes):
    """NaN probabilities (NaN weights, or an fp16 overflow) took the first class everywhere,
    a whole slide of tumour without a word: the job stops, naming the cause, and writes no map."""
    from dsf.errors import SlideError

    path, _ = stripes
    pred = oracle(32)
    sure = pred.probabilities

    def some_nan(context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = sure(context, target)
        probs[0] = float("nan")  # one window of each batch
        return probs

    pred.probabilities = some_nan
    with pytest.raises(SlideError, match=r"NaN or infinite probabilities for some windows: "
                       r"their weights hold NaN\. Check the models"):  # fmt: skip
        run_infer(tmp_path, path, [pred])
    assert not any((tmp_path / "out").glob("map.*"))


def test_an_ensembles_models_count_alike_whatever_they_give_class_0():
    """Fine-tuning never scores class 0 (ignore), so the share a model gives it is arbitrary:
    taken into the softmax, it set how much each model counted in an averaged map, and a model
    giving it nearly all mapped foreground pixels as probability 0. Probabilities are over the
    foreground classes: each model's sum to 1 there."""
    from torch import nn

    class Fixed(nn.Module):
        def __init__(self, per_class: list[float]) -> None:
            super().__init__()
            self.per_class = torch.tensor(per_class)

        def forward(self, context, target, context_logits=False):  # noqa: ANN001, ANN201
            b, _, h, w = target.shape
            return (self.per_class.view(1, -1, 1, 1).expand(b, -1, h, w).to(target.device),)

    ctx = tgt = torch.zeros((2, 8, 8, 3), dtype=torch.uint8)
    mostly_ignore = oracle(8)
    mostly_ignore.model = Fixed([30.0, 0.0, 2.0, 0.0])
    sure = oracle(8)
    sure.model = Fixed([0.0, 5.0, 0.0, 0.0])
    p1, p2 = (m.probabilities(ctx.to(DEVICE), tgt.to(DEVICE)).cpu() for m in (mostly_ignore, sure))
    for p in (p1, p2):
        assert p.shape == (2, 3, 8, 8)  # the foreground classes only
        torch.testing.assert_close(p.sum(1), torch.ones(2, 8, 8))
    torch.testing.assert_close(p1[0, :, 0, 0], torch.tensor([0.0, 2.0, 0.0]).softmax(0))
