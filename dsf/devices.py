"""Which device a training process uses: the CPU, or one GPU that no other local job holds.

Snakemake counts the `gpu` resource (`--resources gpu=N`) but does not say which card a job
gets. `pick_device` decides, in this order:

1. `torchrun` (`LOCAL_RANK` set) with cards assigned (`CUDA_VISIBLE_DEVICES`, or SLURM's):
   the rank's own card, `cuda:LOCAL_RANK` (`cuda:0` when the launcher shows each rank only its
   own card). With none assigned (a local multi-GPU run beside other GPU jobs), each rank locks
   a card as in 5, so no rank takes a card another job holds; none free is an error, since DDP
   ranks cannot share a card.
2. `CUDA_VISIBLE_DEVICES` set (by the user or by SLURM for a job that asked for GPUs): the job
   was given its card(s); it uses the first visible one, `cuda:0`.
3. A SLURM job whose GPUs SLURM names without restricting visibility (`SLURM_STEP_GPUS`,
   `SLURM_JOB_GPUS`): the first GPU SLURM named.
4. One visible GPU: that one.
5. Several visible GPUs: the first one whose lock file (`gpu<i>.lock` under `$DSF_GPU_LOCK_DIR`,
   default `/tmp/dsf-gpu-locks`) this process can lock exclusively. The lock is held until the
   process exits (the kernel drops it even after a crash), so concurrent local jobs get
   different cards. When every card is locked, jobs share one (with a warning).

No GPU: `auto` runs on the CPU; `cuda` is a ConfigError naming the config key.

`use_device` picks and then makes the card the process's current one, so that streams, events
and anything else that follows torch's current device is on the job's card, not on GPU 0;
`amp_dtype` chooses the mixed-precision type the card runs natively.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from dsf.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "DSF_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = Path("/tmp/dsf-gpu-locks")
CHOICES = ("auto", "cpu", "cuda")


@dataclass
class GpuLock:
    """An exclusive lock on one GPU index; held while `handle` stays open."""

    index: int
    path: Path
    handle: IO[bytes]

    def release(self) -> None:
        """Unlock (closing the file drops the lock)."""
        self.handle.close()


# The GPU lock this process holds, per lock directory: kept open (so locked) until exit.
_HELD: dict[str, GpuLock] = {}


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """The folder of the per-GPU lock files: `$DSF_GPU_LOCK_DIR` or /tmp/dsf-gpu-locks."""
    env = os.environ if env is None else env
    return Path(env.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)


def claim_gpu(count: int, folder: Path) -> GpuLock | None:
    """Lock the first of GPUs 0..count-1 that nobody holds; None when all are held.

    flock locks belong to the open file, so two claims conflict even inside one process.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:  # several users share /tmp/dsf-gpu-locks: world-writable with the sticky bit
        if folder.stat().st_uid == os.geteuid():
            folder.chmod(0o1777)
    except OSError:
        pass
    for index in range(count):
        path = folder / f"gpu{index}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            log.warning("cannot open GPU lock %s (%s); skipping that GPU", path, err)
            continue
        handle = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        return GpuLock(index, path, handle)
    return None


def _slurm_gpu(env: Mapping[str, str]) -> int | None:
    """The first GPU index SLURM assigned to this job or step, if it named any."""
    if "SLURM_JOB_ID" not in env:
        return None
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        first = env.get(var, "").split(",")[0].strip()
        if first.isdigit():
            return int(first)
    return None


def _rank_lock(rank: int, count: int, folder: Path) -> int:
    """The card a DDP rank locks (the first no other job or rank holds): the workflow's other
    GPU jobs lock theirs too, so a multi-GPU pretraining never lands on a card they use."""
    held = _HELD.get(str(folder))
    if held is not None and held.index < count:
        return held.index
    claimed = claim_gpu(count, folder)
    if claimed is None:
        raise ConfigError(
            f"pretraining rank {rank} found all {count} GPUs locked by other jobs ({folder}): "
            "DDP ranks cannot share a card; run at most as many GPU jobs as GPUs (snakemake "
            "--resources gpu=N counts pretrain.gpus for this run), or give the run its cards "
            "with CUDA_VISIBLE_DEVICES"
        )
    _HELD[str(folder)] = claimed
    log.info("rank %d using GPU %d of %d (lock %s)", rank, claimed.index, count, claimed.path)
    return claimed.index


def gpu_index(count: int, env: Mapping[str, str] | None = None, folder: Path | None = None) -> int:
    """Which of `count` (>= 1) visible GPUs this process uses; see the module docstring."""
    env = os.environ if env is None else env
    if env.get("LOCAL_RANK", "").isdigit():
        rank = int(env["LOCAL_RANK"])
        assigned = env.get("CUDA_VISIBLE_DEVICES", "").strip() or _slurm_gpu(env) is not None
        if rank < count and not assigned and count > 1:
            return _rank_lock(rank, count, lock_dir(env) if folder is None else folder)
        if rank < count:
            return rank
        if count == 1:  # the launcher shows each rank its own card only
            return 0
        raise ConfigError(
            f"LOCAL_RANK is {rank} but only {count} GPUs are visible: start at most {count} "
            "processes per node (torchrun --nproc-per-node), or show each rank its own card"
        )
    if env.get("CUDA_VISIBLE_DEVICES", "").strip():
        return 0
    slurm = _slurm_gpu(env)
    if slurm is not None and slurm < count:
        return slurm
    if count == 1:
        return 0
    folder = lock_dir(env) if folder is None else folder
    held = _HELD.get(str(folder))
    if held is not None and held.index < count:
        return held.index
    claimed = claim_gpu(count, folder)
    if claimed is None:
        index = os.getpid() % count
        log.warning(
            "all %d GPUs are locked by other jobs (%s); sharing GPU %d. Run at most as many "
            "GPU jobs as GPUs: snakemake --resources gpu=%d",
            count,
            folder,
            index,
            count,
        )
        return index
    _HELD[str(folder)] = claimed
    log.info("using GPU %d of %d (lock %s)", claimed.index, count, claimed.path)
    return claimed.index


def pick_device(
    requested: str,
    key: str = "device",
    *,
    gpu_count: int | None = None,
    env: Mapping[str, str] | None = None,
    folder: Path | None = None,
) -> torch.device:
    """The device for `requested` ("auto", "cpu" or "cuda"), a config value under `key`.

    `gpu_count` overrides torch's count of visible GPUs, `env` the environment and `folder`
    the lock directory (tests pick on a CPU-only machine with them).
    """
    if requested not in CHOICES:
        raise ConfigError(f"{key} must be one of {', '.join(CHOICES)}, not {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if count < 1:
        if requested == "cuda":
            raise ConfigError(
                f"{key} is cuda but no GPU is visible (CUDA_VISIBLE_DEVICES="
                f"{(os.environ if env is None else env).get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                "use auto or cpu"
            )
        return torch.device("cpu")
    return torch.device("cuda", gpu_index(count, env, folder))


def use_device(requested: str, key: str = "device") -> torch.device:
    """`pick_device`, then make a picked GPU the current CUDA device of this process (streams,
    events and caches that follow the current device would otherwise be on GPU 0, a card
    another job may hold)."""
    device = pick_device(requested, key)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast type on `device`: bf16 on cards with native bf16 (compute capability 8.0+:
    A100, H100, H200), fp16 on older ones (V100, T4; `torch.cuda.is_bf16_supported()` would say
    yes there too, for a slow emulated bf16), None on the CPU or when AMP is off (fp32)."""
    if not enabled or device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16
