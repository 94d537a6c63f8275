"""Slides replaced under their name with an older file time (`dsf.rescans`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsf.rescans import TOUCH_LISTED, replaced_note, replaced_slides


def _project(tmp_path: Path, recorded: int) -> tuple[Path, Path]:
    slide = tmp_path / "slides" / "s2.tiff"
    slide.parent.mkdir(parents=True)
    slide.write_bytes(b"x" * 100)
    tissue = tmp_path / "results" / "tissue"
    tissue.mkdir(parents=True)
    (tissue / "s2.json").write_text(json.dumps({"slide_id": "s2", "file_size": recorded}))
    return slide, tissue


def test_a_rescan_with_an_older_file_time_is_named_with_its_rerun(tmp_path: Path) -> None:
    """The audit's case: a rescan copied with `cp -p` over the slide, older than its tissue
    stats; the dry run had said "Nothing to be done" and the maps stayed the old scan's."""
    slide, tissue = _project(tmp_path, recorded=60)
    made = (tissue / "s2.json").stat().st_mtime
    os.utime(slide, (made - 3600, made - 3600))
    changed = replaced_slides({"s2": str(slide), "s9": str(tmp_path / "gone.tiff")}, tissue)
    assert changed == {"s2": (60, 100)}
    listed = tmp_path / "list.txt"
    note = replaced_note(changed, {"s2": str(slide)}, listed)
    assert note is not None and "s2 (60 -> 100 bytes)" in note
    assert f"Run `touch {slide}` and then your command" in note and not listed.exists()
    # the advice does what it says: touched, the slide is newer than its stats, not named
    os.utime(slide)
    assert replaced_slides({"s2": str(slide)}, tissue) == {}
    many = {f"s{i}": (1, 2) for i in range(TOUCH_LISTED + 1)}
    paths = {sid: f"/data/{sid} scan.svs" for sid in many}
    said = str(replaced_note(many, paths, listed))
    assert f"xargs -d '\\n' touch < {listed}" in said
    assert listed.read_text().splitlines() == list(paths.values())
    assert replaced_note({}, {}, listed) is None


def test_a_newer_or_unchanged_file_and_a_folder_are_not_named(tmp_path: Path) -> None:
    """A newer file reruns by itself (Snakemake's file times), the same size is the same file,
    and a DICOM slide's folder has no size of its own."""
    slide, tissue = _project(tmp_path, recorded=60)
    made = (tissue / "s2.json").stat().st_mtime
    os.utime(slide, (made + 60, made + 60))
    assert replaced_slides({"s2": str(slide)}, tissue) == {}
    slide2, tissue2 = _project(tmp_path / "b", recorded=100)
    os.utime(slide2, (0, 0))
    assert replaced_slides({"s2": str(slide2)}, tissue2) == {}
    folder = tmp_path / "dicom"
    folder.mkdir()
    os.utime(folder, (0, 0))
    assert replaced_slides({"s2": str(folder)}, tissue) == {}
