"""Slides whose file was replaced since their tissue stage without Snakemake seeing it.

Snakemake reruns a job when an input is newer than its outputs. A slide replaced by a rescan
under the same name, but copied with its older file time (`cp -p`, `rsync -a`, an unpacked
archive), is older than its tissue mask, so nothing reruns and every result after it (masks,
stores, models, maps, scores) stays that of the earlier file. The tissue stage records the
file's size (`tissue/<slide>.json`): a different size now is another file.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from dsf.errors import some

#: Replaced slides whose files the advice names one by one; more go to a list file
TOUCH_LISTED = 20


def replaced_slides(slides: dict[str, str], tissue_dir: Path) -> dict[str, tuple[int, int]]:
    """Slide id -> (size recorded, size now) of the slides (id -> file) whose file's size
    differs from the one their tissue stats recorded while the file is not newer than those
    stats (a newer file reruns by itself). Folders (DICOM), files not there yet (the
    workflow's synthetic slides) and slides without stats are left out."""
    changed: dict[str, tuple[int, int]] = {}
    for sid, path in slides.items():
        stats = tissue_dir / f"{sid}.json"
        try:
            now = Path(path).stat()
            made = stats.stat()
        except OSError:
            continue
        if not Path(path).is_file() or now.st_mtime > made.st_mtime:
            continue
        try:
            recorded = json.loads(stats.read_text()).get("file_size")
        except (OSError, ValueError, AttributeError):
            continue  # a damaged stats file is the tissue stage's to report
        if isinstance(recorded, int) and recorded != now.st_size:
            changed[sid] = (recorded, now.st_size)
    return changed


def replaced_note(
    changed: dict[str, tuple[int, int]], slides: dict[str, str], list_file: Path
) -> str | None:
    """The warning naming the replaced slides (id -> their sizes, `slides` id -> file) and how
    to rerun them: `touch` their files, which Snakemake then sees as newer than their outputs,
    so those slides and what follows them rerun, nothing else. Past TOUCH_LISTED slides their
    files are written to `list_file` for `xargs`. None when nothing changed."""
    if not changed:
        return None
    sizes = [f"{sid} ({was:,} -> {now:,} bytes)" for sid, (was, now) in changed.items()]
    files = [slides[sid] for sid in changed]
    if len(files) <= TOUCH_LISTED:
        rerun = f"`touch {' '.join(shlex.quote(f) for f in files)}`"
    else:
        list_file.parent.mkdir(parents=True, exist_ok=True)
        list_file.write_text("".join(f"{f}\n" for f in files))
        rerun = (
            f"`xargs -d '\\n' touch < {shlex.quote(str(list_file))}` (their files, listed there)"
        )
    return (
        f"slides whose file was replaced since their tissue mask, with an older file time "
        f"(cp -p, rsync -a, an archive), which Snakemake does not see as new: {some(sizes)}. "
        "Their masks, stores, the models trained on them and their maps are of the earlier "
        f"file. Run {rerun} and then your command: Snakemake reruns them and what follows "
        "(or put the earlier files back)"
    )
