"""`dsf labels`: per-class binary masks (PAIP's whole and viable tumour) into one label mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from dsf.annotations import open_labels
from dsf.config import defaults
from dsf.config import validate as validate_config
from dsf.errors import ConfigError
from dsf.label_settings import check_label_settings
from dsf.labels import main
from dsf.sheet import main as sheet_main

from conftest import rgb_slide

PAIP = ["ignore", "tissue", "whole_tumour", "viable_tumour"]
H, W = 800, 1200


def _slide(path: Path) -> Path:
    """A 1200 x 800 slide at 0.5 um/px: background on the left third, tissue colour elsewhere."""
    rgb = np.full((H, W, 3), (180, 100, 180), np.uint8)
    rgb[:, :400] = 245  # brighter than rgb_max (235, 210, 235): not tissue
    return rgb_slide(path, rgb, 0.5)


def _masks(folder: Path) -> tuple[Path, Path]:
    whole = np.zeros((H, W), np.uint8)  # full size, 0/1 as PAIP stores them, in strips
    whole[200:600, 300:1100] = 1
    tifffile.imwrite(folder / "s_whole.tif", whole, rowsperstrip=16, compression="lzw")
    viable = np.zeros((H // 2, W // 2), np.uint8)  # another downsample, 0/255
    viable[150:250, 300:400] = 255
    tifffile.imwrite(folder / "s_viable.tif", viable, tile=(64, 64))
    return folder / "s_whole.tif", folder / "s_viable.tif"


def _expected() -> np.ndarray:
    out = np.zeros((H, W), np.uint8)
    out[:, 400:] = 1  # tissue by the rule, outside the masks
    out[200:600, 300:1100] = 2  # whole tumour, also over background pixels it covers
    out[300:500, 600:800] = 3  # viable tumour over whole tumour
    return out


def _run(tmp_path: Path, *extra: str) -> int:
    slide = _slide(tmp_path / "s.tif")
    whole, viable = _masks(tmp_path)
    args = ["--slide", str(slide), "--slide-id", "s", "--mask", f"viable_tumour={viable}"]
    args += ["--mask", f"whole_tumour={whole}", "--classes", *PAIP, "--no-progress"]
    return main([*args, *extra])


def test_masks_are_painted_in_class_order_over_the_tissue_rule(tmp_path: Path) -> None:
    out = tmp_path / "s.labels.tiff"
    assert _run(tmp_path, "--mpp", "0.5", "--base", "tissue", "--out", str(out)) == 0
    with tifffile.TiffFile(out) as tf:
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(800, 1200), (400, 600), (200, 300)]
        assert tf.pages[0].photometric == tifffile.PHOTOMETRIC.PALETTE
        np.testing.assert_array_equal(levels[0].asarray(), _expected())
        np.testing.assert_array_equal(levels[1].asarray(), _expected()[1::2, 1::2])
    with openslide.OpenSlide(out) as osr:  # viewers open it at the slide's scale
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    # the other stages read it like any label mask
    labels = open_labels(out, "s", (W, H), 0.5, {**_settings(), "classes": PAIP})
    np.testing.assert_array_equal(labels.read(0, 0, W, H, 0.5), _expected())
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("dsf-labels-*"))


def test_a_mask_painted_over_entirely_is_told_from_an_empty_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With whole tumour after viable in labels.classes, whole paints over every viable pixel:
    the warning says so and points at the class order (it had called the mask empty)."""
    slide = _slide(tmp_path / "s.tif")
    whole, viable = _masks(tmp_path)
    classes = ["ignore", "tissue", "viable_tumour", "whole_tumour"]
    args = ["--slide", str(slide), "--slide-id", "s", "--mask", f"viable_tumour={viable}"]
    args += ["--mask", f"whole_tumour={whole}", "--classes", *classes, "--no-progress"]
    assert main([*args, "--mpp", "2", "--out", str(tmp_path / "o.tiff")]) == 0
    said = capsys.readouterr().err
    assert "every pixel the viable_tumour mask marks is painted over by whole_tumour" in said
    assert "marks no pixel" not in said


@pytest.mark.parametrize("cols", [100, 333])
def test_bands_painted_in_column_blocks_equal_the_whole(
    tmp_path: Path, cols: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Masks, the annotation and the tissue rule are read a column block at a time (whole
    bands had grown memory a dozen bytes per slide column): blocks that do not divide the
    slide paint what the whole band does, for masks and for an annotation over the base."""
    import dsf.labels

    monkeypatch.setattr(dsf.labels, "READ_COLS", cols)
    out = tmp_path / "s.labels.tiff"
    assert _run(tmp_path, "--mpp", "0.5", "--base", "tissue", "--out", str(out)) == 0
    np.testing.assert_array_equal(tifffile.imread(out, level=0), _expected())
    slide = _slide(tmp_path / "c.tif")
    assert main(_camelyon_args(slide, tmp_path, tmp_path / "c.tiff")) == 0
    monkeypatch.setattr(dsf.labels, "READ_COLS", 4096)
    assert main(_camelyon_args(slide, tmp_path, tmp_path / "whole.tiff")) == 0
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "c.tiff", level=0),
        tifffile.imread(tmp_path / "whole.tiff", level=0),
    )


def _settings() -> dict:
    return {"class_map": {}, "other_class": 0, "geojson_names": {}}


def test_without_a_base_class_only_the_masks_label_and_coarser_output_halves(
    tmp_path: Path,
) -> None:
    out = tmp_path / "coarse.tiff"
    assert _run(tmp_path, "--mpp", "1.0", "--out", str(out)) == 0
    expected = _expected()
    expected[expected == 1] = 0
    np.testing.assert_array_equal(tifffile.imread(out, level=0), expected[::2, ::2])


def test_the_older_key_masks_base_is_still_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "old.tiff"
    assert _run(tmp_path, "--mpp", "0.5", "--masks-base", "tissue", "--out", str(out)) == 0
    np.testing.assert_array_equal(tifffile.imread(out, level=0), _expected())
    assert "labels.masks_base is the older name of labels.base" in capsys.readouterr().err


def test_bad_masks_and_classes_stop_with_the_slide_or_key_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.tiff"
    assert _run(tmp_path, "--base", "stroma", "--out", str(out)) == 2
    assert "labels.base: 'stroma' is not a class" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "wrong.tif", np.ones((100, 900), np.uint8))
    slide = _slide(tmp_path / "s.tif")
    code = main(
        ["--slide", str(slide), "--slide-id", "s", "--mask", f"tissue={tmp_path / 'wrong.tif'}",
         "--classes", *PAIP, "--out", str(out), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "slide 's'" in err and "does not cover the slide" in err
    code = main(
        ["--slide", str(slide), "--mask", f"tumour={tmp_path / 's_whole.tif'}",
         "--classes", *PAIP, "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 2 and "'tumour' is not a class of labels.classes" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


CAMELYON = ["ignore", "normal", "tumour"]


def _camelyon_xml(path: Path) -> Path:
    """ASAP XML as CAMELYON16 draws a lesion: tumour group _0, an exclusion _2 inside it."""

    def annotation(group: str, x0: int, y0: int, x1: int, y1: int) -> str:
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        coords = "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(corners)
        )
        return (f'<Annotation Name="a" Type="Polygon" PartOfGroup="{group}">'
                f"<Coordinates>{coords}</Coordinates></Annotation>")  # fmt: skip

    groups = "".join(f'<Group Name="{g}" PartOfGroup="None"/>' for g in ("_0", "_1", "_2"))
    path.write_text(
        "<ASAP_Annotations><Annotations>"
        + annotation("_2", 600, 300, 800, 500)
        + annotation("_0", 300, 200, 1100, 600)
        + f"</Annotations><AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>"
    )
    return path


def _camelyon_args(slide: Path, folder: Path, out: Path) -> list[str]:
    """`dsf labels` arguments painting `_camelyon_xml` over base class normal."""
    return ["--slide", str(slide), "--slide-id", "s", "--annotation", str(_camelyon_xml(
        folder / "s.xml")), "--classes", *CAMELYON, "--names", '{"_0": 2, "_1": 2, "_2": 0}',
        "--base", "normal", "--mpp", "0.5", "--out", str(out), "--no-progress"]  # fmt: skip


def test_an_annotation_is_painted_over_the_base_class(tmp_path: Path) -> None:
    """CAMELYON: tumour polygons drawn, the rest of the tissue normal (`labels.base`); the
    exclusion group, mapped to 0, is normal tissue too."""
    slide = _slide(tmp_path / "s.tif")
    out = tmp_path / "s.labels.tiff"
    args = _camelyon_args(slide, tmp_path, out)
    assert main(args) == 0
    lab = tifffile.imread(out, level=0)
    expected = np.zeros((H, W), np.uint8)
    expected[:, 400:] = 1  # normal: tissue by the rule
    expected[200:600, 300:1100] = 2  # the tumour polygon, over background pixels too
    expected[300:500, 600:800] = 1  # the exclusion inside it: normal tissue
    np.testing.assert_array_equal(lab, expected)
    with pytest.raises(SystemExit) as stop:  # masks or an annotation, not both
        main([*args[:4], "--mask", f"tumour={out}", *args[4:]])
    assert stop.value.code == 2


def test_black_no_data_is_never_the_base_class(tmp_path: Path) -> None:
    """Black scanner fill passes the RGB rule's upper bounds: it had been painted `normal`
    tissue (the tissue masks never took it for tissue)."""
    rgb = np.full((H, W, 3), (180, 100, 180), np.uint8)
    rgb[:, 1150:] = (5, 5, 8)  # no data, outside the annotation
    slide = rgb_slide(tmp_path / "s.tif", rgb, 0.5)
    out = tmp_path / "s.labels.tiff"
    assert main(_camelyon_args(slide, tmp_path, out)) == 0
    lab = tifffile.imread(out, level=0)
    assert (lab[:, 1150:] == 0).all() and (lab[:, :300] == 1).all()


def test_labels_base_paints_every_annotated_slide(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With labels.base the workflow sends annotated slides of any format through `labels`;
    without it, only slides with per-class masks. `dsf sheet` says how to run the sheet it
    wrote, with the schema's settings or a preset's."""
    import yaml
    from test_workflow import job_counts, smk

    root = tmp_path / "camelyon"
    (root / "lesion_annotations").mkdir(parents=True)
    for name in ("tumor_001", "tumor_002", "normal_001"):
        _slide(root / f"{name}.tif")
    for name in ("tumor_001", "tumor_002"):
        _camelyon_xml(root / "lesion_annotations" / f"{name}.xml")
    sheet = tmp_path / "sheet.tsv"
    assert sheet_main([str(root), "--labels", str(root / "lesion_annotations"),
                       "--out", str(sheet)]) == 0  # fmt: skip
    said = capsys.readouterr().err
    assert f"add `slides={sheet.resolve()}` to your usual command's --config" in said
    assert f"`--config slides={sheet.resolve()}` at its end" in said
    assert "config/presets/bcss.yaml" in said, said
    cfg = {
        "slides": str(sheet),
        "results": str(tmp_path / "res"),
        "labels": {"classes": CAMELYON, "names": {"_0": 2, "_1": 2, "_2": 0}, "base": "normal"},
        "patches": {"target_mpp": 1.0, "block": 16, "stride": 32},
        "folds": {"k": 2},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    plan = smk("-n", "--cores", "2", "--configfile", str(tmp_path / "cfg.yaml"), cwd=tmp_path)
    counts = job_counts(plan.stdout)
    assert counts["labels"] == 2 and counts["patches"] == 3
    assert "--annotation" in plan.stdout or "lesion_annotations" in plan.stdout
    del cfg["labels"]["base"]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    plan = smk("-n", "--cores", "2", "--configfile", str(tmp_path / "cfg.yaml"), cwd=tmp_path)
    assert "labels" not in job_counts(plan.stdout)


def test_the_paip_preset_runs_on_a_paip_folder(tmp_path: Path) -> None:
    """The PAIP download as it comes (masks beside one slide, in folders of their own for the
    other): two slides, each painted into one label mask, whose classes reach the patch
    stores where the masks and the tissue rule put them."""
    import yaml
    import zarr
    from test_workflow import job_counts, smk

    root = tmp_path / "paip"
    (root / "WholeMask").mkdir(parents=True)
    (root / "ViableMask").mkdir()
    # p1's masks beside it; p2's in WholeMask/ and ViableMask/
    for name, whole_dir, viable_dir in (("p1", ".", "."), ("p2", "WholeMask", "ViableMask")):
        _slide(root / f"{name}.tif")
        whole, viable = _masks(root)
        whole.rename(root / whole_dir / f"{name}_whole.tif")
        viable.rename(root / viable_dir / f"{name}_viable.tif")
    small = {
        "patches": {"target_mpp": 1.0, "block": 16, "stride": 32, "min_tissue": 0.5},
        "folds": {"k": 2},
    }
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    preset = Path(__file__).resolve().parents[1] / "config" / "presets" / "paip.yaml"
    done = smk(
        "data", "--cores", "2", "--configfile", str(preset), str(tmp_path / "small.yaml"),
        "--config", f"slides={root}", f"results={tmp_path / 'res'}", cwd=tmp_path,
    )  # fmt: skip
    counts = job_counts(done.stdout + done.stderr)
    assert counts["tissue"] == 2 and counts["labels"] == 2 and counts["patches"] == 2
    assert counts["tile_labels"] == 2
    expected = _expected()
    for name in ("p1", "p2"):
        lab = tifffile.imread(tmp_path / "res" / "labels" / f"{name}.tiff", level=0)
        assert lab.shape == (400, 600)  # at patches.target_mpp, 1 um/px
        np.testing.assert_array_equal(lab, expected[::2, ::2])
        g = zarr.open_group(str(tmp_path / "res" / "patches" / f"{name}.zarr"), mode="r")
        lab = zarr.open_group(str(tmp_path / "res" / "patches" / f"{name}.labels.zarr"), mode="r")
        coords, labels = g["coords"][:][lab["index"][:]], lab["labels"][:]
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and {2, 3} <= set(np.unique(labels))
        for (x, y), tile in zip(coords, labels, strict=True):
            ref = expected[y : y + 128 : 2, x : x + 128 : 2]
            np.testing.assert_array_equal(tile, ref)
    folds = (tmp_path / "res" / "folds.tsv").read_text()
    assert "p1" in folds and "p2" in folds and "_whole" not in folds
    # masks swapped between the classes: the same files (no input changed), other labels
    swapped = {"whole_tumour": "{slide}_viable.tif", "viable_tumour": "{slide}_whole.tif"}
    (tmp_path / "swap.yaml").write_text(yaml.safe_dump({"labels": {"masks": swapped}}))
    plan = smk(
        "data", "-n", "-p", "--cores", "2", "--configfile", str(preset),
        str(tmp_path / "small.yaml"), str(tmp_path / "swap.yaml"), "--config", f"slides={root}",
        f"results={tmp_path / 'res'}", cwd=tmp_path,
    ).stdout  # fmt: skip
    assert job_counts(plan)["labels"] == 2 and "Params have changed" in plan
    cmds = [ln for ln in plan.splitlines() if "dsf labels " in ln]
    assert len(cmds) == 2 and all("--mpp-tolerance" in c for c in cmds)  # read as patches do
    # slide folders under the working folder are named relative to it (one path per file)
    named = root.relative_to(tmp_path)
    assert any(f"--mask whole_tumour={named}/p1_viable.tif" in c for c in cmds), cmds


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        (["ignore", "TUM", "tum"], r"'TUM' and 'tum' are one class name"),
        (["ignore", "tissue", "BG"], r"'BG' is reserved.*predicted as background"),
        (["ignore", "TUM", "mapped"], r"'mapped' is reserved \(areas.tsv's column"),
        (["ignore", "a", "a_b", "b_c", "c"], r"\('a', 'b_c'\) and \('a_b', 'c'\).*cm_a_b_c"),
    ],
)
def test_class_names_that_would_merge_score_columns_are_refused(
    classes: list[str], words: str
) -> None:
    """Each class's scores are columns named after it (f1_<class>, cm_<true>_<pred>, `bg` for
    background): names that read alike would merge two classes' pixels without a word."""
    settings = validate_config({"labels": {"classes": classes}})["labels"]
    with pytest.raises(ConfigError, match=words):
        check_label_settings(settings)
    paip = validate_config({"labels": {"classes": ["ignore", "tissue", "whole_tumour", "bg_x"]}})
    check_label_settings(paip["labels"])  # underscores alone are fine


def test_a_painted_label_mask_is_read_as_class_indices_never_mapped_again(
    tmp_path: Path,
) -> None:
    """A raster annotation of codes mapped by labels.class_map (tumour = 200) painted over the
    base class: the label mask holds class indices, which tile-labels and the scores read as
    they are, not through class_map once more (which sent them all to other_class); for
    classes in another order by the names the mask gives them, and a class the run lacks is
    refused."""
    from dsf.annotations import AnnotationError

    slide = _slide(tmp_path / "s.tif")
    codes = np.zeros((H, W), np.uint8)
    codes[200:600, 500:1100] = 200
    tifffile.imwrite(tmp_path / "s_codes.tif", codes, tile=(64, 64))
    out = tmp_path / "s.labels.tiff"
    classes = ["ignore", "normal", "tumour"]
    opts = ["--classes", *classes, "--class-map", '{"200": 2}', "--other-class", "0"]
    assert main(["--slide", str(slide), "--slide-id", "s", "--annotation",
                 str(tmp_path / "s_codes.tif"), *opts, "--base", "normal", "--mpp", "0.5",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    painted = tifffile.imread(out, level=0)
    assert set(np.unique(painted)) == {0, 1, 2}
    settings = validate_config({"labels": {"classes": classes, "class_map": {"200": 2}}})
    src = open_labels(out, "s", (W, H), 0.5, settings["labels"])
    np.testing.assert_array_equal(src.read(0, 0, W, H, 0.5), painted)
    # the codes file itself still goes through the class map
    raw = open_labels(tmp_path / "s_codes.tif", "s", (W, H), 0.5, settings["labels"])
    assert set(np.unique(raw.read(0, 0, W, H, 0.5))) == {0, 2}
    # read for classes in another order, each value is mapped by the name the mask gives it
    other = validate_config({"labels": {"classes": ["ignore", "tumour", "normal"]}})
    swapped = open_labels(out, "s", (W, H), 0.5, other["labels"]).read(0, 0, W, H, 0.5)
    np.testing.assert_array_equal(swapped, np.array([0, 2, 1], np.uint8)[painted])
    fewer = validate_config({"labels": {"classes": ["ignore", "tumour"]}})
    with pytest.raises(AnnotationError, match=r"holds class 'normal' \(value 1\)"):
        open_labels(out, "s", (W, H), 0.5, fewer["labels"])


def test_a_coarser_read_of_a_painted_mask_matches_level_0_read_at_that_scale(
    tmp_path: Path,
) -> None:
    """Scores at infer.out_mpp 2x or 4x the mask's read its reduced levels: they sample each
    square's centre pixel, as a nearest read of level 0 at pixel centres does, so class
    borders at odd rows and columns land where level 0 puts them (top-left sampling had
    shifted them by a pixel)."""
    slide = _slide(tmp_path / "s.tif")
    codes = np.zeros((H, W), np.uint8)
    codes[201:599, 503:1101] = 1  # borders off the 2 x 2 and 4 x 4 grids
    codes[301:333, 601:705] = 2
    tifffile.imwrite(tmp_path / "s_codes.tif", codes, tile=(64, 64))
    out = tmp_path / "s.labels.tiff"
    classes = ["ignore", "normal", "tumour"]
    assert main(["--slide", str(slide), "--slide-id", "s", "--annotation",
                 str(tmp_path / "s_codes.tif"), "--classes", *classes, "--mpp", "0.5",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    painted = tifffile.imread(out, level=0)
    np.testing.assert_array_equal(painted, codes)
    settings = validate_config({"labels": {"classes": classes}})["labels"]
    src = open_labels(out, "s", (W, H), 0.5, settings)
    for f in (2, 4):
        got = src.read(0, 0, W // f, H // f, 0.5 * f)
        np.testing.assert_array_equal(got, painted[f // 2 :: f, f // 2 :: f], err_msg=f"{f}x")


def test_a_slide_a_little_finer_than_the_target_gets_a_mask_of_its_own_size(
    tmp_path: Path,
) -> None:
    """A 0.486 um/px scan (within patches.mpp_tolerance of a 0.5 target) has its patches cut
    at 0.486: its label mask is painted there too, so it is the slide's own size. Painted at
    0.5 it was 97% of it, which the labels stores and evaluation then refused (a mask is the
    slide's size or a whole downsample)."""
    rgb = np.full((H, W, 3), (180, 100, 180), np.uint8)
    slide = rgb_slide(tmp_path / "s.tif", rgb, 0.486)
    out = tmp_path / "s.labels.tiff"
    args = _camelyon_args(slide, tmp_path, out)
    assert main(args) == 0
    lab = tifffile.imread(out, level=0)
    assert lab.shape == (H, W)
    settings = defaults("labels") | {"classes": CAMELYON, "base": "normal"}
    src = open_labels(out, "s", (W, H), 0.486, settings)
    np.testing.assert_array_equal(src.read(0, 0, W, H, 0.486), lab)
