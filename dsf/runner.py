"""Shared entry-point plumbing: logging set-up and turning user errors into exit codes."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsf.errors import DsfError

log = logging.getLogger("dsf")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (Snakemake's `log:` captures it) with timestamps."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr for long work: redrawn every second on a terminal, every 10 s in a
    job's log file (which keeps every redraw)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        mininterval=1.0 if sys.stderr.isatty() else 10.0,
    )


#: Errors of the machine, not of dsf: a full disk, a folder the job may not write, ...
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _stop_on_sigterm() -> None:
    """Make SIGTERM (a stopped Snakemake, SLURM's time limit or preemption) end the stage as
    Ctrl-C does, through an exception: `finally` blocks and `atomic_path` then remove their
    work files (the default action ends the process at once and leaves them). Processes forked
    from this one (loader workers) keep the default action."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return  # someone else's handler
    owner = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked child: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def run(fn: Callable[[], None]) -> int:
    """Run a stage body: a `DsfError`, or a full disk or a folder the job may not write, is
    logged as one clear line and exits with status 2 (the traceback of the latter at debug
    level: it is the machine's, not a bug). SIGTERM exits with 143 after cleaning up."""
    _stop_on_sigterm()
    try:
        fn()
    except DsfError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT:
            raise
        log.debug("traceback", exc_info=True)
        where, what, free = f" {exc.filename}", "that folder", ""
        if not exc.filename:  # a failed write() names no file: say what is free where it writes
            where, what = "", "the job's folders"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = f" (free: {free_space_note(sys.argv[1:])})"
        log.error(
            "cannot write or read%s: %s%s; check the free space and permissions of %s "
            "(or set `results` elsewhere, TMPDIR for temporary files) and rerun",
            where,
            exc.strerror or exc,
            free,
            what,
        )
        return 2
    return 0


#: Options whose value is a file or folder the stage writes (`--out`, `--out-dir`, ...).
_OUTPUT_OPTIONS = ("--out", "--mask", "--overlay", "--stats")


def free_space_note(argv: list[str]) -> str:
    """'results/patches 12 MB, /tmp 30 GB': the free space of each file system a
    job writes to (the folders of its output options, and the temporary folder), so that a
    full disk's error, which names no file when a write fails, says which disk is full."""
    folders: list[Path] = []
    for option, value in zip(argv, argv[1:], strict=False):
        if "=" not in option and option.startswith(_OUTPUT_OPTIONS):
            folders.append(Path(value).parent)
    for token in argv:  # the --option=value form
        name, _, value = token.partition("=")
        if value and name.startswith(_OUTPUT_OPTIONS):
            folders.append(Path(value).parent)
    folders.append(Path(tempfile.gettempdir()))  # last: an output folder on its disk is named
    seen: dict[int, str] = {}
    for folder in folders:
        existing = next((f for f in (folder, *folder.parents) if f.exists()), None)
        if existing is None:
            continue
        device = existing.stat().st_dev
        if device not in seen:
            seen[device] = f"{folder} {_size(shutil.disk_usage(existing).free)}"
    return ", ".join(seen.values())


def _size(n: int) -> str:
    """Bytes as the largest unit that keeps the number at least 1 ('12 MB')."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}"
        value /= 1000
    return f"{value:.0f} TB"


def check_writable(folder: Path, key: str, write: bool = True) -> None:
    """Write and remove a file in `folder` (config key `key`), or in the nearest folder above
    it that exists (where it would be made), before any job: a read-only place had failed the
    first job, in Snakemake's words, with no fix. Leaves nothing behind. Without `write` (a dry
    run) only that the place is a folder. Raises ConfigError naming the key and the folder."""
    from dsf.errors import ConfigError

    place = folder.absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        if not place.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{place} is a file")
        if write:
            with tempfile.NamedTemporaryFile(dir=place, prefix=".dsf-write-check-"):
                pass
    except OSError as exc:
        raise ConfigError(
            f"config key `{key}`: cannot write to {folder} ({exc.strerror or exc}); give a "
            "folder you can write to, or make this one writable"
        ) from exc
