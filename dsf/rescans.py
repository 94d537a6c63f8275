"""Slides whose file was replaced since their tissue stage without Snakemake seeing it.

Snakemake reruns a job when an input is newer than its outputs. A slide replaced by a rescan
under the same name, but copied with its older file time (`cp -p`, `rsync -a`, an unpacked
archive), is older than its tissue mask, so nothing reruns and every result after it (masks,
stores, models, maps, scores) stays that of the earlier file. The tissue stage records the
file's size (`tissue/<slide>.json`): a different size now is another file.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsf.errors import some

#: Slides named one by one in the `--forcerun` advice; more are told to rerun the tissue rule
FORCERUN_LISTED = 20


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


def replaced_note(changed: dict[str, tuple[int, int]], tissue_dir: Path) -> str | None:
    """The warning naming the replaced slides and how to rerun them, or None."""
    if not changed:
        return None
    sizes = [f"{sid} ({was:,} -> {now:,} bytes)" for sid, (was, now) in changed.items()]
    if len(changed) <= FORCERUN_LISTED:
        targets = " ".join(str(tissue_dir / f"{sid}.json") for sid in changed)
        rerun = f"add `--forcerun {targets}` to your command"
    else:
        rerun = "add `--forcerun tissue` to your command (every slide's tissue stage)"
    return (
        f"slides whose file was replaced since their tissue mask, with an older file time "
        f"(cp -p, rsync -a, an archive), which Snakemake does not see as new: {some(sizes)}. "
        "Their masks, stores, the models trained on them and their maps are of the earlier "
        f"file. Unless this run reruns them already, {rerun}: what follows reruns too (or put "
        "the earlier file back)"
    )
