"""The warnings a run's jobs logged, listed when the run ends.

A stage warns in its job's log (`results/logs/<rule>/<slide>.log`): an annotation that misses
its slide's tissue, a sheet mpp far from the file's, a slide upsampled for the models. With
hundreds of jobs nobody opens every log, and Snakemake shows a log only when its job fails, so
the workflow's `onsuccess`/`onerror` hooks list the warnings of the logs this run wrote (those
changed since it started), one line each, naming the log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: A warning line of `dsf.runner.setup_logging`'s format: time, level, logger, message.
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING [\w.]+: (?P<msg>.*)$")
#: At most this many lines are listed; the rest are counted, with where to find them.
SHOWN = 20


@dataclass(frozen=True)
class JobWarning:
    """One warning line of one job's log."""

    log: Path
    message: str


def job_warnings(logs: Path, since: float) -> list[JobWarning]:
    """The warnings in the `*.log` files under `logs` written at or after `since` (seconds
    since the epoch), in path order; a message repeated in one log is listed once."""
    if not logs.is_dir():
        return []
    found: list[JobWarning] = []
    for path in sorted(logs.rglob("*.log")):
        try:
            if path.stat().st_mtime < since:
                continue
            text = path.read_text(errors="replace")
        except OSError:  # removed or unreadable meanwhile: nothing of this run to list
            continue
        seen: set[str] = set()
        for line in text.splitlines():
            m = LINE.match(line.split("\r")[-1])
            if m and m["msg"] not in seen:
                seen.add(m["msg"])
                found.append(JobWarning(path, m["msg"]))
    return found


def summary(found: list[JobWarning], logs: Path, shown: int = SHOWN) -> str:
    """The text listing `found` (empty when there is none): each log relative to `logs`."""
    if not found:
        return ""
    n_logs = len({w.log for w in found})
    lines = [
        f"{len(found)} warning{'s' * (len(found) != 1)} in {n_logs} job "
        f"log{'s' * (n_logs != 1)} of this run (under {logs}):"
    ]
    for w in found[:shown]:
        lines.append(f"  {w.log.relative_to(logs)}: {w.message}")
    if len(found) > shown:
        lines.append(f"  ... and {len(found) - shown} more: grep -r WARNING {logs} lists them all")
    return "\n".join(lines)
