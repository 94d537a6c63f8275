"""Slides that are one scan under several names (a browser's `s1 (1).svs`, a copy kept beside
the original): folds split slides by name, so such copies can land in different folds, and a
model is then validated on a slide it was trained on."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from dsf.errors import some

#: Bytes hashed at each end of two files of equal size: a scan's header and its last tiles
#: differ between any two scans, and reading whole slides at every start would take minutes.
ENDS = 1 << 20


def _ends_digest(path: Path, size: int) -> str:
    """SHA-256 of a file's first and last ENDS bytes (the whole file when smaller)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(ENDS))
        if size > ENDS:
            fh.seek(max(ENDS, size - ENDS))
            h.update(fh.read(ENDS))
    return h.hexdigest()


def _compared_file(path: Path) -> Path:
    """The file that tells one scan from another: a MIRAX slide's `Slidedat.ini` (its slide id
    and layout), not its `.mrxs` file, which can be alike for every slide of a scanner."""
    if path.suffix.lower() == ".mrxs":
        ini = path.parent / path.stem / "Slidedat.ini"
        if ini.is_file():
            return ini
    return path


def find_copies(paths: dict[str, str | os.PathLike[str]]) -> list[list[str]]:
    """Groups of slide ids (slide id -> file) whose files are one file (a link, or one path
    in two sheet rows) or copies: equal sizes and equal bytes at both ends. Only files of
    equal size are read, so a cohort of distinct scans costs one `stat` per slide; folders
    (DICOM, MIRAX data) and files not there yet are left out."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for sid, name in paths.items():
        path = _compared_file(Path(name))
        if path.is_file():
            by_size[path.stat().st_size].append((sid, path))
    groups: list[list[str]] = []
    for size, members in by_size.items():
        if len(members) < 2:
            continue
        same: dict[str, list[str]] = defaultdict(list)
        for sid, path in members:
            try:
                same[_ends_digest(path, size)].append(sid)
            except OSError:  # unreadable: the start's slide check names it
                continue
        groups += [sorted(ids) for ids in same.values() if len(ids) > 1]
    return sorted(groups)


def copies_note(paths: dict[str, str | os.PathLike[str]]) -> str | None:
    """What to say, at the start of a run, of slides that are copies of one another; None
    when there are none."""
    groups = find_copies(paths)
    if not groups:
        return None
    named = some([" = ".join(g) for g in groups], 5)
    return (
        f"{sum(len(g) for g in groups)} slides are copies of one another ({named}: the same "
        "file, or files of equal size and bytes): each copy is scored as a slide of its own, "
        "and copies in different folds are validated on slides they were trained on. Remove "
        "the copies from the slides folder (or their rows from the sheet), or give them one "
        "`group` in the sheet to keep them in one fold"
    )
