"""Self-supervised DSF-WSI pretraining of one fold (DESIGN sections 4-5, paper section III).

Trains the dual-branch model on the uint8 tiles of the fold's training slides (never a validation
slide of that fold), read by worker processes straight into shared, pinned memory
(`dsf.tile_loader`); augmentation runs on the training device (`dsf.augment`; on a GPU the next
batch's on a side stream while the current step runs), the model step under AMP (bf16 where
supported, else fp16 with a scaler; fp32 on the CPU), optionally channels_last and
`torch.compile`, on several GPUs through `torchrun` (DDP, SyncBatchNorm).

Artifacts in `--out-dir`: `encoders.pt` (the two encoders' state_dicts, for fine-tuning),
`checkpoint.pt` (full state: model, optimiser, scaler, epoch; written every `checkpoint_every`
epochs and at the end) and `log.tsv` (per epoch: the three group losses, throughput and the
collapse monitor; rank 0's losses and z_std under DDP, throughput over all ranks). `--resume`
continues from the checkpoint exactly: sampling is seeded per epoch, augmentation and the
model's own randomness per step, and a changed hyperparameter is an error (epochs, workers,
device, compile and checkpoint settings may change: `RESUME_FREE`). A checkpoint a stop
signal or the job's time limit wrote mid-epoch holds the steps done and that epoch's loss sums
so far, and the resumed run goes on from the next step.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch.utils.data import Sampler
from tqdm import tqdm

from dsf import __version__, checkpoints
from dsf.atomic import write_epochs
from dsf.config import add_section_arguments, section_from_args
from dsf.deadline import STOP_BEFORE_LIMIT_S, job_deadline
from dsf.devices import amp_dtype, use_device
from dsf.errors import ConfigError, DsfError
from dsf.folds import add_fold_arguments, check_fold_arguments, read_folds
from dsf.inits import check_mask_ratio, unread_pretrain_settings
from dsf.norm import check_settings as check_norm
from dsf.norm import computed_stats, given_stats
from dsf.runner import run, setup_logging
from dsf.stores import open_store, store_ids
from dsf.tile_loader import TileLoader
from dsf.tiles import TileDataset

if TYPE_CHECKING:
    from dsf.augment import Views

log = logging.getLogger(__name__)

#: What a finished run leaves (besides checkpoint.pt): an earlier run's go before a new one
RESULT_FILES = ("log.tsv", "log.running.tsv", "encoders.pt")

#: Settings that may differ on resume: speed, device and bookkeeping. Most leave the result as
#: it was; `gpus` changes how an epoch's tiles are split over ranks and seeded, and `device` the
#: random stream of augmentation, so a resume with another of these continues validly but not
#: bit for bit.
RESUME_FREE = {
    "epochs",
    "workers",
    "device",
    "compile",
    "compile_augment",
    "checkpoint_every",
    "methods",
    "scope",  # which stores: those are checked
    "gpus",
    "norm_tiles",  # what it changes, mean and std, are checked
}
CHECK_EVERY = 50  # steps between checks for a non-finite loss (each waits for the GPU)
#: share of an epoch spent waiting for tiles above which the log says to feed the step faster
WAIT_WARN = 0.2
LOG_COLUMNS = [
    "epoch",
    "loss",
    "context",
    "target",
    "fusion",
    "z_std",
    "samples_per_s",
    "seconds",
    "data_wait",
    "lr",
]


class TrainingError(DsfError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class StoppedError(TrainingError):
    """A signal ended the run (STOP_SIGNALS); a checkpoint of where it was is written."""


#: Signals that end a job early: SLURM's at the time limit or on preemption (SIGKILL follows
#: after its KillWait, 30 s by default), a stopped Snakemake's, Ctrl-C; USR1 for `sbatch
#: --signal` (the workflow asks SLURM for it 5 minutes before a pretraining job's time limit).
#: Pretraining then writes a checkpoint of the weights it has reached and stops, instead of
#: losing up to checkpoint_every epochs.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class _InterruptError(Exception):
    """Raised inside an epoch when a stop signal came, with the steps it had done (of the
    whole epoch), the epoch's loss sums so far, and its seconds and seconds waiting for tiles
    so far (log.tsv's `seconds` and `data_wait` of a resumed epoch count the whole epoch)."""

    def __init__(self, steps: int, sums: list[float], seconds: float, waited: float) -> None:
        super().__init__(steps)
        self.steps, self.sums, self.seconds, self.waited = steps, sums, seconds, waited


def step_seed(seed: int, epoch: int, step: int, rank: int, stream: int) -> int:
    """The seed of one step's draws (`stream` 0: its augmentation, 1: the model's own
    randomness, e.g. EfficientNet's stochastic depth): fixed by the step, so a run resumed
    mid-epoch draws what the straight run drew from there on."""
    key = f"{seed}/{epoch}/{step}/{rank}/{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch), sharded over DDP ranks.

    Deterministic in the epoch number, so a resumed run draws what the straight run drew.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of `epoch` next (the same on every rank, each taking its share)."""
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204 - Sampler protocol
        return iter(self.order(self.epoch))

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world
        return order[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()

    def __len__(self) -> int:
        return self.n // self.world


def training_stores(folds: pd.DataFrame, fold: int, stores: list[Path]) -> list[Path]:
    """Keep the stores of slides outside fold `fold`; a validation slide's store is an error."""
    fold_of = dict(zip(folds["slide"], folds["fold"], strict=True))
    kept = []
    for path in stores:
        sid = str(open_store(path).attrs["slide_id"])
        if sid not in fold_of:
            raise ConfigError(f"patch store {path}: slide {sid!r} is not in the folds table")
        if fold_of[sid] == fold:
            raise ConfigError(
                f"patch store {path} belongs to slide {sid!r} of validation fold {fold}: "
                "pretraining of a fold never sees its validation slides"
            )
        kept.append(path)
    return kept


def training_device(setting: str, key: str) -> torch.device:
    """The device a training run uses (`dsf.devices.use_device`: picked and made current), with
    cuDNN autotuning on a GPU: training's input shapes are fixed, so cuDNN times its algorithms
    once."""
    device = use_device(setting, key)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def optimise(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """One optimiser step on `loss`, scaled when the scaler is on (fp16), a plain step else."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def finite(total: torch.Tensor, world: int = 1) -> bool:
    """Whether `total` (losses summed on the device) is finite, on every DDP rank when `world`
    > 1 (so all ranks stop together). Waits for the device: call it every CHECK_EVERY steps."""
    bad = (~torch.isfinite(total)).to(torch.float32)
    if world > 1:
        torch.distributed.all_reduce(bad)
    return not bad.item()


def _augment_config(st: dict[str, Any], scale: int) -> Any:
    from dsf.augment import AugmentConfig

    return AugmentConfig(
        out_size=st["out_size"],
        scale=scale,
        crop_scale=tuple(st["crop_scale"]),
        jitter=tuple(st["jitter"]),
        jitter_p=st["jitter_p"],
        grayscale_p=st["grayscale_p"],
        blur_sharpen_p=st["blur_sharpen_p"],
        flip_p=st["flip_p"],
        mean=tuple(st["mean"]),
        std=tuple(st["std"]),
    )


class Trainer:
    """One pretraining run: model, optimiser, data, and the epoch loop with checkpoints."""

    def __init__(
        self,
        settings: dict[str, Any],
        stores: list[Path],
        out_dir: Path,
        meta: dict[str, Any] | None = None,
        progress: bool | None = None,
    ) -> None:
        """`progress`: a bar while the normalisation is computed here (None: on a terminal)."""
        from dsf.models.dsf import DSFModel

        if check_norm(settings):  # computed here only when not given (by hand, in tests)
            mean, std = computed_stats(stores, settings["norm_tiles"], settings["seed"], progress)
            settings = {**settings, "mean": mean, "std": std}
        self.st = settings
        self.out_dir = out_dir
        self.meta = meta or {}
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        if settings["batch_size"] % self.world:
            raise ConfigError(
                f"pretrain.batch_size {settings['batch_size']} does not split evenly over the "
                f"{self.world} training processes: make it a multiple of {self.world}"
            )
        # the training device (torchrun rank, CUDA_VISIBLE_DEVICES, SLURM's GPUs, else a GPU no
        # other local job holds; the CPU without CUDA), current before NCCL starts on it
        self.device = training_device(settings["device"], "pretrain.device")
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        self.data = TileDataset(stores)
        self.store_ids = store_ids(self.data.stores)  # what a checkpoint was trained on
        scale = int(open_store(stores[0]).attrs["scale"])
        self.n_blocks = scale * scale
        check_mask_ratio([settings["method"]], settings["mask_ratio"], scale)
        self.aug = _augment_config(settings, scale)
        # what both encoders start from (a local weights file): a checkpoint records it, so a
        # file replaced since restarts a finished run instead of re-exporting the old encoders
        self.weights_digest = (
            checkpoints.weights_digest(checkpoints.load(settings["weights"], "cpu"))
            if settings["weights"]
            else None
        )
        torch.manual_seed(settings["seed"])
        model = DSFModel(
            backbone=settings["backbone"],
            n_blocks=self.n_blocks,
            mask_ratio=settings["mask_ratio"],
            method=settings["method"],
            weights=settings["weights"],
        )
        self.channels_last = settings["channels_last"] and self.device.type == "cuda"
        if self.world > 1 and self.device.type == "cuda":  # SyncBatchNorm is GPU-only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.net: torch.nn.Module = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if settings["compile"]:
            if self.rank == 0:
                log.info("pretrain.compile: the first step compiles the model (minutes)")
            self.net = torch.compile(self.net)
        self.lr = settings["lr"] * math.sqrt(settings["batch_size"] / 32)
        # fused on a GPU: one kernel over all 123M parameters instead of several passes
        fused = self.device.type == "cuda"
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=self.lr, weight_decay=0.0, fused=fused
        )
        self.amp = amp_dtype(self.device, settings["amp"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.sampler = EpochSampler(len(self.data), settings["seed"], self.rank, self.world)
        per_rank = settings["batch_size"] // self.world
        if self.world > 1 and self.rank == 0:
            log.info("DDP: %d processes, %d tiles per process and step", self.world, per_rank)
        if len(self.sampler) < per_rank:
            raise ConfigError(
                f"only {len(self.data)} training tiles for pretrain.batch_size "
                f"{settings['batch_size']}: lower the batch size or add slides"
            )
        self.loader = TileLoader(
            self.data,
            self.sampler.order,
            per_rank,
            settings["workers"],
            steps_per_epoch=settings["steps_per_epoch"] or None,
            epochs=settings["epochs"],
            pin=self.device.type == "cuda",
        )
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self._epochs_run = 0  # in this process: the first includes the workers' start
        # a run resumed mid-epoch: the steps of that epoch done before, their loss sums, and
        # the seconds they took and waited for tiles
        self._resume_at: tuple[int, list[float], float, float] | None = None
        self._said_starved = False
        self._stop: int | None = None  # the stop signal received, if any
        self.deadline: float | None = None  # `time.time()` to stop at by itself (job_deadline)

    # -- state -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _hyper(self) -> dict[str, Any]:
        # not the settings the method does not read (mask_ratio but for the masking methods)
        free = RESUME_FREE | unread_pretrain_settings(self.st["method"])
        return {k: v for k, v in self.st.items() if k not in free}

    def save_checkpoint(self, interrupted: dict[str, Any] | None = None) -> None:
        """Write checkpoint.pt after `epoch` whole epochs; `interrupted` (epoch, steps, the
        epoch's loss sums, seconds and seconds waiting for tiles) marks one written by a stop
        mid-epoch: its weights are that epoch's so far, and a resume goes on from the next step.
        Non-finite weights are never written (every rank checks: DDP keeps them equal), so the
        last good checkpoint stays."""
        when = f"epoch {self.epoch + 1 if interrupted else self.epoch}"
        if why := checkpoints.nonfinite_weights(
            self.model, self.checkpoint_path, "pretrain", when, self.amp is not None
        ):
            raise TrainingError(why)
        if self.rank != 0:
            return
        checkpoints.save_training(
            self.checkpoint_path, self.model, self.opt, self.scaler, epoch=self.epoch,
            hyper=self._hyper(), stores=self.store_ids, history=self.history,
            settings=self.st, interrupted=interrupted, encoders=self.weights_digest,
        )  # fmt: skip

    def resume(self) -> bool:
        """Load the checkpoint if there is one; True when training continues from it."""
        if not self.checkpoint_path.exists():
            return False
        state = checkpoints.resume_training(
            self.checkpoint_path, self._hyper(), self.model, self.opt, self.scaler,
            stores=self.store_ids, encoders=self.weights_digest, restart_finished=True,
        )  # fmt: skip
        if state is None:  # a finished run's, under other settings or stores: start over
            return False
        self.epoch = int(state["epoch"])
        stopped = state.get("interrupted") or {}
        checkpoints.check_epochs(
            self.checkpoint_path,
            self.epoch,
            self.st["epochs"],
            "pretrain",
            steps=int(stopped.get("steps", 0)),
        )
        self.history = list(state["history"])
        if state.get("interrupted"):
            stop = state["interrupted"]
            # a checkpoint of an older dsf holds no loss sums (and drew otherwise): the
            # epoch runs again from the weights it had reached
            again = "sums" not in stop
            if not again:
                self._resume_at = (
                    int(stop["steps"]),
                    [float(v) for v in stop["sums"]],
                    float(stop.get("seconds", 0.0)),  # an older dsf's: the time after resuming
                    float(stop.get("waited", 0.0)),
                )
            log.info(
                "resumed from %s, written when epoch %d was stopped after %d steps: %s",
                self.checkpoint_path,
                stop["epoch"],
                stop["steps"],
                "that epoch runs again from the weights it had reached"
                if again
                else "it goes on from the next step",
            )
        else:
            log.info("resumed from %s after epoch %d", self.checkpoint_path, self.epoch)
        return True

    # -- training ----------------------------------------------------------------------------
    def batches(self, gen: torch.Generator, start: int = 0) -> Iterator[tuple[int, Views]]:
        """The epoch's batches as (tiles, augmented views on the device).

        The next batch's copy to the device and its augmentation are queued before a batch is
        handed out, so on a GPU they run on a side stream while this batch's step runs: they
        fill the gaps where the card waits for the host, and the copy no longer holds up the
        step. The step's stream waits for the views it takes, and they stay allocated until it
        is done with them. The draws come from `gen` in batch order either way, so the result
        does not depend on the overlap; on the CPU it is the same order without a side stream.
        """
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches = self.loader.epoch(self.epoch, start)
        step = start

        def prepare() -> tuple[int, Views, torch.cuda.Event | None] | None:
            nonlocal step
            got = next(batches, None)
            if got is None:
                return None
            slot, tiles = got
            gen.manual_seed(step_seed(self.st["seed"], self.epoch, step, self.rank, 0))
            step += 1
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                on_device = tiles.to(self.device, non_blocking=True)
                # the loader's slot is free again once the copy is (on the CPU, the views)
                copied = side.record_event() if side is not None else None
                views = self.views(on_device, gen)
            self.loader.release(slot, copied)
            return tiles.shape[0], views, side.record_event() if side is not None else None

        ahead = prepare()
        while ahead is not None:
            n, views, ready = ahead
            if ready is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(ready)
                for t in views:  # made on the side stream, freed only after the step's use
                    t.record_stream(main)
            ahead = prepare()
            yield n, views

    def views(self, tiles: torch.Tensor, gen: torch.Generator) -> Views:
        """The two augmented views of a uint8 tile batch on the device, in the memory format
        and dtype the model takes (the AMP dtype: the normalisation writes it directly), with
        a fresh jigsaw permutation per view and sample."""
        from dsf.augment import make_views

        perms = self.model.draw_perms(tiles.shape[0], gen, self.device)
        fused = self.st["compile_augment"] and self.device.type == "cuda"
        return make_views(
            tiles,
            perms,
            self.aug,
            gen,
            channels_last=self.channels_last,
            dtype=self.amp or torch.float32,
            fused=fused,
        )

    def update(self, views: Views) -> dict[str, torch.Tensor]:
        """One optimiser step on augmented `views`, under AMP; the model's outputs (losses and
        the collapse monitor) stay on the device."""
        with torch.autocast(
            self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        ):
            out = self.net(views.context, views.targets, views.perms)
        optimise(out["loss"], self.opt, self.scaler)
        return out

    def _check_finite(self, sums: torch.Tensor, steps: int) -> None:
        """Stop on a non-finite loss among the steps summed in `sums` (checked every
        CHECK_EVERY steps, not every step: each check waits for the GPU). The weights may be
        spoiled by then, but no checkpoint is written after them: the last good one stays. Under
        DDP every rank learns of a bad loss on any rank, so all stop together."""
        if not finite(sums[0], self.world):
            advice = checkpoints.restart_advice(
                self.checkpoint_path, "pretrain", self.amp is not None
            )
            raise TrainingError(
                f"non-finite pretraining loss within the first {steps} steps of epoch "
                f"{self.epoch + 1}. {advice}"
            )

    def train_epoch(self, progress: bool = True) -> dict[str, float]:
        """One epoch of DSF-WSI steps (paper III); its row of log.tsv (losses, z_std, speed)."""
        self.sampler.set_epoch(self.epoch)
        gen = torch.Generator(device=self.device)  # seeded per step (`batches`)
        self.net.train()
        keys = ("loss", "context", "target", "fusion", "z_std")
        # a run resumed mid-epoch goes on from the next step, with the epoch's sums, seconds
        # and seconds waiting for tiles so far
        start, done, before, waited_before = self._resume_at or (0, [0.0] * len(keys), 0.0, 0.0)
        self._resume_at = None
        sums = torch.tensor(done, device=self.device)  # on the device: no sync per step
        steps, samples = start, 0
        t0, waited = time.perf_counter(), self.loader.waited

        def stopped() -> _InterruptError:
            return _InterruptError(
                steps,
                sums.tolist(),
                before + time.perf_counter() - t0,
                waited_before + self.loader.waited - waited,
            )

        bar = tqdm(
            total=len(self.loader),
            initial=start,
            desc=f"epoch {self.epoch + 1}",
            disable=not progress or self.rank != 0,
            mininterval=5.0,
        )
        try:
            for n, views in self.batches(gen, start):
                # the model's own randomness (e.g. EfficientNet's stochastic depth), per step
                torch.manual_seed(step_seed(self.st["seed"], self.epoch, steps, self.rank, 1))
                out = self.update(views)
                sums += torch.stack([out[k].detach().float() for k in keys])
                steps += 1
                samples += n * self.world
                bar.update(1)
                if steps % CHECK_EVERY == 0:
                    self._check_finite(sums, steps)
                if self._stopping(steps):
                    raise stopped()
        except (_InterruptError, TrainingError):
            raise
        except Exception as exc:  # the loader failed (a worker killed) after a stop signal came
            if self._stop is not None:
                raise stopped() from exc
            raise
        finally:
            bar.close()
        self._check_finite(sums, steps)  # waits for the device: the epoch's time ends here
        dt = time.perf_counter() - t0
        self.epoch += 1
        row = {
            "epoch": self.epoch,
            **dict(zip(keys, (sums / steps).tolist(), strict=True)),
            "samples_per_s": samples / dt,  # of the steps since this run started or resumed
            "seconds": before + dt,
            "data_wait": (waited_before + self.loader.waited - waited) / (before + dt),
            "lr": self.lr,
        }
        self.history.append(row)
        self._epochs_run += 1
        if self._epochs_run > 1:  # the first epoch of a process starts the workers
            self._warn_if_starved(row["data_wait"])
        return row

    def _warn_if_starved(self, share: float) -> None:
        """Say once per run when the step waited for tiles for more than WAIT_WARN of an
        epoch (the `data_wait` column of log.tsv): the device then idles, and more tile loader
        workers (each decodes on one core) would feed it."""
        if share <= WAIT_WARN or self._said_starved or self.rank != 0:
            return
        self._said_starved = True
        workers = self.st["workers"]
        if workers:
            # the cores this job may use (a SLURM job's share), not the machine's
            now = f"{workers}; this job has {len(os.sched_getaffinity(0))} cores"
        else:
            now = "0: reading in the training process"
        log.warning(
            "pretraining waited for tiles %.0f%% of epoch %d: raise pretrain.workers (now %s), "
            "or put the patch stores on faster storage",
            share * 100,
            self.epoch,
            now,
        )

    def _stop_name(self) -> str:
        """What stopped the run: its signal, or the job's time limit."""
        if self._stop is None and self.deadline is not None:
            return "its job's coming time limit"
        return signal.Signals(self._stop or signal.SIGTERM).name

    def _stopping(self, steps: int) -> bool:
        """Whether to stop now for a signal or the time limit: at once in one process; under
        DDP every CHECK_EVERY steps (and with `steps` 0, at the end of every epoch), when all
        ranks learn together whether any received one (one rank stopping alone would leave
        the others waiting in a collective)."""
        due = self._stop is not None or (self.deadline is not None and time.time() >= self.deadline)
        if self.world == 1:
            return due
        if steps % CHECK_EVERY:
            return False
        flag = torch.tensor(float(due), device=self.device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item())

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Note a STOP_SIGNAL instead of dying of it, for the epoch loop to checkpoint and stop
        (only the main thread can take signals: elsewhere the defaults stay)."""

        def note(signum: int, frame: Any) -> None:
            self._stop = signum

        try:
            previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
        except ValueError:  # not the main thread
            previous = {}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def fit(self, progress: bool = True) -> None:
        """Train up to `epochs`; a stop signal checkpoints mid-epoch and raises StoppedError."""
        with self._stop_on_signals():
            self._fit(progress)

    def _fit(self, progress: bool) -> None:
        while self.epoch < self.st["epochs"]:
            try:
                row = self.train_epoch(progress)
            except _InterruptError as stop:
                at = {
                    "epoch": self.epoch + 1,
                    "steps": stop.steps,
                    "sums": stop.sums,
                    "seconds": stop.seconds,
                    "waited": stop.waited,
                }
                self.save_checkpoint(interrupted=at)
                raise StoppedError(
                    f"pretraining stopped by {self._stop_name()} in epoch {at['epoch']} after "
                    f"{at['steps']} steps; {self.checkpoint_path} holds where it was: rerun with "
                    "--resume (as the workflow does; without it the checkpoint is dropped) and "
                    "it goes on from the next step"
                ) from None
            if self.rank == 0:
                log.info(
                    "epoch %d/%d loss %.4f (context %.4f target %.4f fusion %.4f) "
                    "z_std %.4f, %.1f samples/s, %.0f%% waiting for tiles",
                    row["epoch"],
                    self.st["epochs"],
                    row["loss"],
                    row["context"],
                    row["target"],
                    row["fusion"],
                    row["z_std"],
                    row["samples_per_s"],
                    row["data_wait"] * 100,
                )
                self.write_log(final=False)
            saved = self.epoch % self.st["checkpoint_every"] == 0
            if saved or self.epoch == self.st["epochs"]:
                self.save_checkpoint()
            # under DDP the steps check only every CHECK_EVERY steps: an epoch of fewer (or
            # its last steps) had let a signal or the time limit pass unseen
            if self.epoch < self.st["epochs"] and self._stopping(0):
                if not saved:
                    self.save_checkpoint()
                raise StoppedError(
                    f"pretraining stopped by {self._stop_name()} after epoch {self.epoch}; "
                    f"{self.checkpoint_path} holds it: rerun with --resume (as the "
                    "workflow does; without it the checkpoint is dropped) and training goes on "
                    f"from epoch {self.epoch + 1}"
                )

    def close(self) -> None:
        """Stop the tile loader's worker processes and give back its shared memory now, not at
        the interpreter's exit (they may still be reading ahead)."""
        self.loader.close()

    def write_log(self, final: bool = True) -> None:
        """log.tsv: one row per epoch (atomically), written with encoders.pt; while the run
        goes on, the epochs so far are in log.running.tsv (an interrupted run left a log.tsv
        that looked finished)."""
        write_epochs(self.history, LOG_COLUMNS, self.out_dir / "log.tsv", final)

    def export_encoders(self) -> None:
        """encoders.pt: both encoders and what fine-tuning needs to know of them (rank 0);
        then log.tsv."""
        if self.rank != 0:
            return
        state = self.model.encoder_state() | {
            "method": self.st["method"],
            "settings": self.st,
            "epochs": self.epoch,
            "slides": sorted(set(self.data.slides)),
            "dsf_version": __version__,
            **self.meta,
        }
        checkpoints.save(state, self.out_dir / "encoders.pt")
        self.write_log()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stores", nargs="+", required=True, type=Path, help="patch stores (.zarr)")
    add_fold_arguments(p)
    p.add_argument("--out-dir", required=True, type=Path, help="folder for the artifacts")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.pt if any")
    p.add_argument(
        "--norm",
        type=Path,
        help="normalisation JSON of `dsf norm` (instead of --mean/--std; with neither, computed "
        "from the training stores)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="checkpoint and stop shortly (up to "
        f"{STOP_BEFORE_LIMIT_S / 60:.0f} min) before this many minutes from the start (default: "
        "in a SLURM job or allocation, before the time SLURM gives it; else never)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_section_arguments(p, "pretrain", skip=("methods", "scope"))
    return p


def _start_ranks(argv: list[str], gpus: int, out_dir: Path) -> None:
    """Start this command again as `gpus` processes through torchrun (DDP on this machine):
    `dsf pretrain --gpus N` does what the workflow's job does (this process becomes torchrun,
    so SLURM's signals reach it). torchrun is given TORCHRUN_SHUTDOWN_S to let its processes
    checkpoint after a signal, unless the environment sets it."""
    from dsf.cli import TORCHRUN_SHUTDOWN_S, torchrun_argv

    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_argv("dsf.pretrain", gpus, argv, out_dir)
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(TORCHRUN_SHUTDOWN_S)} | dict(os.environ)
    log.info("pretraining on %d GPUs: one process each, through torchrun", gpus)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)  # returns never: exec replaces this process


def main(argv: list[str] | None = None) -> int:
    """`dsf pretrain`: one fold's training stores -> encoders.pt, checkpoint.pt, log.tsv."""
    from dsf.cli import args_from_file

    argv = args_from_file(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    args = parser.parse_args(argv)
    check_fold_arguments(parser, args)
    setup_logging()

    def body() -> None:
        settings = section_from_args(args, "pretrain")
        gpus = settings.pop("gpus")  # how it is started; under torchrun, WORLD_SIZE says
        if gpus > 1 and "LOCAL_RANK" not in os.environ:  # not yet one of torchrun's processes
            _start_ranks(argv, gpus, args.out_dir)
        stores = list(args.stores)
        meta: dict[str, Any] = {"fold": args.fold}
        if args.folds is not None and args.fold is not None:
            stores = training_stores(read_folds(args.folds), args.fold, stores)
        given = given_stats(settings["mean"], settings["std"], args.norm)
        if given is not None:  # else the Trainer counts them from its stores
            settings["mean"], settings["std"] = given
        if missing := [str(s) for s in stores if not Path(s).is_dir()]:  # before any output
            raise ConfigError(f"patch stores {missing} not found; run the patches stage first")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            for name in ("checkpoint.pt", *RESULT_FILES):
                (args.out_dir / name).unlink(missing_ok=True)
        deadline = job_deadline(args.time_limit)
        trainer = Trainer(
            settings, stores, args.out_dir, meta, progress=False if args.no_progress else None
        )
        trainer.deadline = deadline
        if deadline is not None and trainer.rank == 0:
            log.info(
                "checkpoints and stops by itself at %s, before its time limit",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(deadline)),
            )
        if args.resume and not trainer.resume() and trainer.rank == 0:
            # training anew (a finished run's settings or stores changed): the earlier run's
            # results must not outlive this one stopped midway, looking like its own
            for name in RESULT_FILES:
                (args.out_dir / name).unlink(missing_ok=True)
        try:
            trainer.fit(progress=not args.no_progress)
        finally:
            trainer.close()
        trainer.export_encoders()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
