"""Copies of one scan under several names are found at the start of a run (`dsf.copies`)."""

from __future__ import annotations

from pathlib import Path

from dsf.copies import ENDS, copies_note, find_copies


def test_copies_are_found_by_size_and_both_ends(tmp_path: Path) -> None:
    """A copy, a link and two rows naming one file are copies; files of equal size that
    differ at either end, and folders, are not."""
    body = bytes(range(256)) * (3 * ENDS // 256)
    (tmp_path / "a.svs").write_bytes(body)
    (tmp_path / "a (1).svs").write_bytes(body)
    (tmp_path / "link.svs").symlink_to(tmp_path / "a.svs")
    head = bytearray(body)
    head[0] ^= 1
    (tmp_path / "head.svs").write_bytes(bytes(head))
    tail = bytearray(body)
    tail[-1] ^= 1
    (tmp_path / "tail.svs").write_bytes(bytes(tail))
    (tmp_path / "dicom").mkdir()
    paths = {p.stem: p for p in tmp_path.iterdir()} | {"again": tmp_path / "a.svs"}
    assert find_copies(paths) == [["a", "a (1)", "again", "link"]]
    note = copies_note(paths)
    assert note is not None and "4 slides are copies" in note and "a = a (1) = again" in note
    assert copies_note({"head": tmp_path / "head.svs", "tail": tmp_path / "tail.svs"}) is None


def test_mirax_slides_are_told_apart_by_their_slidedat(tmp_path: Path) -> None:
    """A MIRAX slide's `.mrxs` file can be alike for every slide of a scanner: its data
    folder's Slidedat.ini (which names the slide) is compared instead."""
    for name, slide_id in (("a", "ID-A"), ("b", "ID-B"), ("c", "ID-A")):
        (tmp_path / f"{name}.mrxs").write_bytes(b"\x00" * 64)
        (tmp_path / name).mkdir()
        (tmp_path / name / "Slidedat.ini").write_text(f"[GENERAL]\nSLIDE_ID = {slide_id}\n")
    paths = {s: tmp_path / f"{s}.mrxs" for s in "abc"}
    assert find_copies(paths) == [["a", "c"]]
