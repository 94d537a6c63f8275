"""When a pretraining job must stop by itself: before its SLURM time limit, or a limit given.

On clusters that track a job's processes by cgroup (SLURM's usual setting), SLURM's signals
before the time limit end Snakemake's job step, and the training with it, before the training
process can act on them; so pretraining asks SLURM how long its job has left (`squeue -o %L`)
and checkpoints and stops shortly before (`dsf.pretrain`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

#: A SLURM job's pretraining checkpoints and stops on its own this long before the job's time
#: limit (at most a tenth of the limit): on clusters that track a job's processes by cgroup,
#: SLURM's signals before the limit end Snakemake's job step, and the training with it, before
#: the training process can act on them.
STOP_BEFORE_LIMIT_S = 600.0


def job_deadline(
    time_limit_min: float | None,
    now: float | None = None,
    env: Mapping[str, str] | None = None,
    time_left: Callable[[str], float | None] | None = None,
) -> float | None:
    """When (`time.time()`) pretraining stops itself: STOP_BEFORE_LIMIT_S (at most a tenth of
    the time) before `time_limit_min` minutes from `now` (`--time-limit`, a run by hand), or
    in a SLURM job or allocation before the time SLURM says it has left (`squeue`; a job of
    the workflow's, or Snakemake run inside `sbatch`/`salloc`). None outside SLURM, or when
    SLURM cannot tell (then its signals are all there is)."""
    env = os.environ if env is None else env
    if time_limit_min is not None:
        limit: float | None = time_limit_min * 60.0
    elif "SLURM_JOB_ID" in env:
        limit = (time_left or slurm_time_left)(env["SLURM_JOB_ID"])
    else:
        return None
    if limit is None:
        return None
    return (time.time() if now is None else now) + limit - min(STOP_BEFORE_LIMIT_S, limit / 10)


def slurm_time_left(job_id: str) -> float | None:
    """Seconds SLURM gives job `job_id` still (`squeue -o %L`), or None: no limit, or squeue
    missing or silent."""
    import subprocess

    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot ask SLURM for the job's time left (%s): no stop before it", exc)
        return None
    return slurm_duration(done.stdout.strip()) if done.returncode == 0 else None


def slurm_duration(text: str) -> float | None:
    """Seconds of a SLURM duration (`[days-][hours:]minutes:seconds`); None for UNLIMITED,
    NOT_SET, INVALID or anything else."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not (1 <= len(parts) <= 3) or not all(p.isdigit() for p in parts):
        return None
    if days and not days.isdigit():
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + int(days or 0) * 86_400)
