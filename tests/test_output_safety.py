"""Outputs never destroy what the user holds: a stage deletes an earlier output only when it is
a file or a Zarr store (dsf's folder outputs), refuses an output that is one of its inputs, and
checks this before it reads or deletes anything. Options that set one schema setting are
checked against the schema like the config is."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from dsf import labels, norm, patches, sheet, tissue

from conftest import rgb_slide


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder of the user's, given by mistake where a file output belongs."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    return mine


def _tissue(slide: Path, mask: Path, tmp_path: Path) -> int:
    out = tmp_path / "t"
    return tissue.main(["--slide", str(slide), "--mask", str(mask), "--overlay",
                        str(out / "o.jpg"), "--stats", str(out / "s.json")])  # fmt: skip


def test_a_folder_given_for_an_output_is_refused_not_deleted(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = rgb_slide(tmp_path / "s.tif", np.full((256, 256, 3), 200, np.uint8), 0.5)
    # before: the folder went (recursively), even though the slide was then found missing
    assert _tissue(tmp_path / "missing.svs", folder, tmp_path) == 2
    assert (folder / "keep.txt").read_text() == "the user's"
    assert "is an existing folder that dsf did not write" in capsys.readouterr().err
    assert _tissue(slide, folder, tmp_path) == 2  # and with a slide that opens
    assert (folder / "keep.txt").exists() and not (tmp_path / "t" / "o.jpg").exists()
    mask = tmp_path / "t" / "m.tiff"
    args = ["--slide", str(slide), "--tissue-mask", str(mask), "--out", str(folder)]
    assert patches.main([*args, "--target-mpp", "2", "--block", "64"]) == 2
    assert (folder / "keep.txt").exists()
    # `dsf sheet FOLDER --out FOLDER` had replaced the slide folder by the sheet
    shutil.copy(slide, folder / "a.tif")
    assert sheet.main([str(folder), "--out", str(folder)]) == 2
    assert (folder / "a.tif").exists() and (folder / "keep.txt").exists()


def test_an_output_that_is_an_input_is_refused(tmp_path: Path) -> None:
    slide = rgb_slide(tmp_path / "s.tif", np.full((256, 256, 3), 200, np.uint8), 0.5)
    before = slide.read_bytes()
    assert _tissue(slide, slide, tmp_path) == 2  # the slide had been deleted, then not found
    assert slide.read_bytes() == before
    label_args = ["--slide", str(slide), "--annotation", str(slide), "--out", str(slide)]
    assert labels.main([*label_args, "--classes", "ignore", "TUM"]) == 2
    assert slide.read_bytes() == before


def test_a_failed_patches_rerun_leaves_no_earlier_store(tmp_path: Path) -> None:
    """The earlier store of the slide goes when the rerun starts, as other stages' outputs do:
    a failed rerun must not leave it looking current."""
    old = tmp_path / "s.zarr"
    zarr.open_group(str(old), mode="w", zarr_format=3)
    args = ["--slide", str(tmp_path / "missing.svs"), "--tissue-mask", str(tmp_path / "m.tiff")]
    assert patches.main([*args, "--out", str(old)]) == 2
    assert not old.exists()


@pytest.mark.parametrize(
    ("module", "args", "words"),
    [
        (norm, ["--stores", "x.zarr", "--out", "n.json", "--seed", "-1"], "pretrain.seed"),
        (labels, ["--rgb-max", "999", "0", "0"], "tissue.rgb_max"),
        (tissue, ["--mpp-tolerance", "nan"], "patches.mpp_tolerance"),
        (labels, ["--threads", "0"], "patches.threads"),
    ],
)
def test_options_of_one_setting_are_checked_by_the_schema(
    module: object, args: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--seed -1` had ended in numpy's traceback, `--rgb-max 999` in an OverflowError, and
    `--mpp-tolerance nan` or `--threads 0` had been accepted."""
    base = ["--slide", "s.tif", "--out", "o.tiff", "--annotation", "a.geojson"]
    if module is tissue:
        base = ["--slide", "s.tif", "--mask", "m.tiff", "--overlay", "o.jpg", "--stats", "s.json"]
    with pytest.raises(SystemExit) as stop:
        module.main(args if module is norm else [*base, *args])  # type: ignore[attr-defined]
    assert stop.value.code == 2
    assert f"config key {words}" in capsys.readouterr().err


def test_an_overlay_is_written_in_the_format_its_name_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--overlay o.png` is a PNG (it had been JPEG data under a .png name); a suffix that is
    no picture format is refused before any work, naming the option."""
    from PIL import Image

    slide = rgb_slide(tmp_path / "s.tif", np.full((256, 256, 3), 200, np.uint8), 0.5)
    out = tmp_path / "t"
    common = ["--slide", str(slide), "--mask", str(out / "m.tiff"), "--stats", str(out / "s.json")]
    assert tissue.main([*common, "--overlay", str(out / "o.png")]) == 0
    with Image.open(out / "o.png") as im:
        assert im.format == "PNG"
    assert tissue.main([*common, "--overlay", str(out / "o.gif")]) == 2
    assert "--overlay" in capsys.readouterr().err and not (out / "o.gif").exists()


def test_a_file_output_is_replaced_in_one_step(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The earlier file stays until the new one takes its name: a kill between removing it and
    the rename had left only `<name>.partial`, so a rerun found no checkpoint and trained from
    epoch 0. A folder output (a Zarr store) is still replaced by removing it first."""
    from dsf import atomic
    from dsf.atomic import atomic_path

    out = tmp_path / "checkpoint.pt"
    with atomic_path(out) as tmp:
        tmp.write_text("epoch 10")

    def killed(src: object, dst: object) -> None:
        raise SystemExit("killed")  # SLURM's SIGKILL while the new checkpoint is renamed

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", killed)
        with pytest.raises(SystemExit), atomic_path(out) as tmp:
            tmp.write_text("epoch 11")
    assert out.read_text() == "epoch 10"  # the earlier checkpoint, whole
    with atomic_path(out) as tmp:  # the rerun writes over it
        tmp.write_text("epoch 11")
    assert out.read_text() == "epoch 11" and not (tmp_path / "checkpoint.pt.partial").exists()
