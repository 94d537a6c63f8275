"""The warnings of a run's job logs, listed when it ends (dsf.job_warnings)."""

import os
from pathlib import Path

from dsf.job_warnings import job_warnings, summary

STAMP = "2026-12-07 10:00:00,123"


def _log(path: Path, lines: list[str], mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, (mtime, mtime))
    return path


def test_only_warnings_of_logs_written_since_the_start_are_found(tmp_path: Path) -> None:
    new = _log(
        tmp_path / "tissue" / "a.log",
        [
            f"{STAMP} INFO dsf.tissue: a: 3 objects",
            f"{STAMP} WARNING dsf.slide: a: sheet mpp 0.53 overrides the file's 0.499 um/px",
            "tissue a: 100%|#####| 4/4\r" + f"{STAMP} WARNING dsf.tissue: a: faint",
            f"{STAMP} WARNING dsf.slide: a: sheet mpp 0.53 overrides the file's 0.499 um/px",
            f"{STAMP} ERROR dsf: a: broken",
            "a WARNING in free text",
        ],
        2000.0,
    )
    _log(tmp_path / "tissue" / "old.log", [f"{STAMP} WARNING dsf.tissue: old: faint"], 1000.0)
    found = job_warnings(tmp_path, 1500.0)
    assert [(w.log, w.message) for w in found] == [
        (new, "a: sheet mpp 0.53 overrides the file's 0.499 um/px"),  # repeated: listed once
        (new, "a: faint"),  # after a progress bar's carriage return
    ]
    assert job_warnings(tmp_path / "missing", 0.0) == []


def test_the_summary_names_each_log_and_counts_what_it_leaves_out(tmp_path: Path) -> None:
    assert summary([], tmp_path) == ""
    for i in range(5):
        _log(tmp_path / "patches" / f"s{i}.log", [f"{STAMP} WARNING dsf.patches: s{i}: x"], 9.0)
    text = summary(job_warnings(tmp_path, 0.0), tmp_path, shown=3)
    lines = text.splitlines()
    assert lines[0] == f"5 warnings in 5 job logs of this run (under {tmp_path}):"
    assert lines[1:4] == [f"  patches/s{i}.log: s{i}: x" for i in range(3)]
    assert lines[4] == f"  ... and 2 more: grep -r WARNING {tmp_path} lists them all"
    one = summary(job_warnings(tmp_path / "patches", 0.0)[:1], tmp_path / "patches")
    assert one.splitlines()[0].startswith("1 warning in 1 job log of this run")
