"""HookNet fine-tuning of one init, label fraction and fold (DESIGN sections 4-5, paper IV-B).

Inputs per tile: the context (the whole tile at the context mpp) and the centre block at the
target mpp with its labels (`dsf.finetune_data`). Soft Dice over the foreground classes (or
cross-entropy) on the target output, Adam, colour jitter and a horizontal flip shared by both
branches. The model is chosen on held-out training slides of the fold (never the validation fold)
by macro F1; the chosen epoch is stated in `model.pt` and every epoch in `history.tsv`.
`--resume` continues from `checkpoint.pt` exactly, like pretraining.

Inits: `random` (HookNet from scratch), `unet` (the target-only U-Net baseline), `imagenet`
(HookNet whose encoders load the local torchvision file `finetune.weights`; paper Table V), or a
pretraining method (both encoders from that method's `encoders.pt` of the fold).

Variants beyond the paper, off by default: `context_weight` w > 0 adds w x the same loss on the
context output against the tile's labels on the context grid (the paper's HookNet lambda = 1 is
w = 0; lambda corresponds to 1 / (1 + w)); `target_block: random` trains the U-Net on a
block-sized window at a random offset of the tile each epoch. HookNet keeps the centre block:
its hook assumes the target is the centre of the context, and the store's only context is the
whole tile, so no off-centre block has a concentric context (see `dsf.finetune_data`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
from torch.utils.data import DataLoader
from tqdm import tqdm

from dsf import __version__, checkpoints
from dsf.atomic import write_epochs
from dsf.config import (
    add_section_arguments,
    defaults,
    given,
    section_from_args,
    section_schema,
)
from dsf.devices import amp_dtype
from dsf.errors import ConfigError
from dsf.finetune_data import LabelledTiles, selection_split
from dsf.folds import read_folds
from dsf.inits import BASELINE_INITS, unread_settings
from dsf.metrics import confusion, scores, soft_dice_loss
from dsf.norm import computed_stats, encoder_stats, given_stats, log_stats
from dsf.pretrain import (
    CHECK_EVERY,
    EpochSampler,
    TrainingError,
    finite,
    optimise,
    training_device,
)
from dsf.runner import run, setup_logging
from dsf.stores import SameGeometry
from dsf.tile_labels import (
    LabelledStore,
    labelled_store_ids,
    labels_store_classes,
    pair_stores,
)
from dsf.tiles import loader_worker_init

log = logging.getLogger(__name__)

#: What a finished run leaves (besides checkpoint.pt): an earlier run's go before a new one
RESULT_FILES = ("history.tsv", "history.running.tsv", "model.pt")

RESUME_FREE = {"epochs", "workers", "device", "inits", "fractions", "gpus"}
HISTORY_COLUMNS = ["epoch", "train_loss", "select_macro_f1", "select_accuracy", "seconds"]


def _shared_jitter_flip(
    ctx: torch.Tensor,
    tgt: torch.Tensor,
    lab: torch.Tensor,
    clab: torch.Tensor,
    st: dict[str, Any],
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brightness, contrast and saturation jitter (strengths `jitter`) with p `jitter_p`,
    then a horizontal flip with p `flip_p`; one draw per sample, shared by context, target and
    both label maps so the two branches stay concentric (DESIGN section 5). As torchvision's
    ColorJitter the three ops run in a random order (drawn per sample), each clamps to [0, 1]
    and contrast blends with the mean grey, here the whole tile's (the context's, as it stands
    at the contrast step) for both inputs, so the target block, part of that tile, is
    transformed exactly as its pixels in the context are."""
    b = ctx.shape[0]
    dev = ctx.device
    strength = torch.tensor(st["jitter"], device=dev)
    on = (torch.rand(b, generator=gen, device=dev) < st["jitter_p"]).float()
    # factors from [max(0, 1 - s), 1 + s], as torchvision's (a strength over 1 had drawn
    # negative factors, blacking out a quarter of the tiles at 2); up to 1 computed as before,
    # so that a run resumed from an earlier release's checkpoint draws the same numbers
    u = torch.rand(b, 3, generator=gen, device=dev)
    lo, hi = (1 - strength).clamp(min=0), 1 + strength
    drawn = torch.where(strength <= 1, 1 + (u * 2 - 1) * strength, lo + (hi - lo) * u)
    f = torch.where(on[:, None] > 0, drawn, torch.ones_like(drawn))
    order = torch.rand(b, 3, generator=gen, device=dev).argsort(dim=1)  # op at each step
    flip = torch.rand(b, generator=gen, device=dev) < st["flip_p"]

    def grey(x: torch.Tensor) -> torch.Tensor:
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

    def op(k: int, x: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
        a = f[:, k, None, None, None]
        if k == 0:  # brightness
            return (x * a).clamp(0, 1)
        if k == 1:  # contrast, about the tile's mean grey
            return ((x - pivot) * a + pivot).clamp(0, 1)
        g = grey(x)  # saturation
        return ((x - g) * a + g).clamp(0, 1)

    for step in range(3):
        # the contrast pivot: the context's mean grey before this step, shared by the target
        pivot = grey(ctx).mean(dim=(1, 2, 3), keepdim=True)
        pick = [(order[:, step] == k)[:, None, None, None] for k in range(3)]
        c, t = ctx, tgt
        for k in range(3):
            c = torch.where(pick[k], op(k, ctx, pivot), c)
            t = torch.where(pick[k], op(k, tgt, pivot), t)
        ctx, tgt = c, t
    m = flip[:, None, None, None]
    ctx = torch.where(m, ctx.flip(-1), ctx)
    tgt = torch.where(m, tgt.flip(-1), tgt)
    lab = torch.where(flip[:, None, None], lab.flip(-1), lab)
    clab = torch.where(flip[:, None, None], clab.flip(-1), clab)
    return ctx, tgt, lab, clab


def imagenet_weights_url(backbone: str) -> str:
    """torchvision's ImageNet weights URL of `backbone`, for messages only (nothing is fetched)."""
    from torchvision.models import get_model_weights

    from dsf.models.encoders import BACKBONES

    return str(get_model_weights(BACKBONES[backbone][0]).DEFAULT.url)


def _imagenet_weights(settings: dict[str, Any]) -> Path:
    """The local weights file of init imagenet, or a ConfigError naming `finetune.weights`."""
    url = imagenet_weights_url(settings["backbone"])
    fix = (
        f"download torchvision's {settings['backbone']} ImageNet weights once "
        f"({url.rsplit('/', 1)[-1]} from {url}) and set finetune.weights to that file"
    )
    if settings.get("weights") is None:
        raise ConfigError(f"finetune.init imagenet needs finetune.weights: {fix}")
    path = Path(settings["weights"])
    if not path.is_file():
        raise ConfigError(f"finetune.weights {path} is not a file: {fix}")
    return path


class FineTuner:
    """One fine-tuning run: data of the fold's fit slides, selection on its held-out slides."""

    def __init__(
        self,
        settings: dict[str, Any],
        fit_stores: list[LabelledStore],
        select_stores: list[LabelledStore],
        fraction: float,
        classes: list[str],
        out_dir: Path,
        encoders: Path | None = None,
        meta: dict[str, Any] | None = None,
        norm: tuple[list[float], list[float]] | None = None,
        progress: bool | None = None,
    ) -> None:
        """`norm` = (mean, std) of the input normalisation; by default the statistics the
        encoders were pretrained with (recorded in `encoders.pt`), else computed from the fit
        stores (`dsf.norm`), with a bar as `progress` says (None: only on a terminal)."""
        from dsf.hook_geometry import check_hook, check_unet
        from dsf.models.hooknet import HookNet, UNet

        self.st, self.out_dir, self.meta = settings, out_dir, meta or {}
        self.device = training_device(settings["device"], "finetune.device")
        self.fraction = fraction
        self.classes = classes
        init, backbone = settings["init"], settings["backbone"]
        if settings["target_block"] == "random" and init != "unet":
            raise ConfigError(
                f"finetune.target_block random is for init unet only, not {init!r}: HookNet's "
                "hook needs the target block at the centre of the context (the whole tile); set "
                "finetune.target_block to centre, or finetune.inits to [unet]"
            )
        if init == "unet" and settings["context_weight"] > 0:
            log.warning("finetune.context_weight is not used by init unet (no context output)")
        # a tile whose target block holds no label trains nothing, unless a context loss
        # reads its context labels; selection scores target blocks only
        context_loss = init != "unet" and settings["context_weight"] > 0
        # one geometry for the fit and the selection stores, checked as each set opens them
        geometry = SameGeometry()
        self.train = LabelledTiles(
            fit_stores,
            fraction,
            settings["seed"],
            settings["target_block"],
            labelled_target=not context_loss,
            geometry=geometry,
        )
        # no selection slides (finetune.held_out 0): the last epoch is kept
        self.select = (
            LabelledTiles(
                select_stores, 1.0, settings["seed"], labelled_target=True, geometry=geometry
            )
            if select_stores
            else None
        )
        # its mpp as configured (patches.target_mpp): each slide's store holds what its level
        # delivered (0.2527 for 0.25), which differs between slides and folds
        self.scale, self.block, self.target_mpp = geometry.geometry
        # the stores a checkpoint records (`dsf.checkpoints.check_stores`)
        selected = self.select.stores if self.select is not None else []
        self.store_ids = labelled_store_ids([*self.train.stores, *selected])
        # encoders.pt read once: for its weights and the statistics they were pretrained with
        pretrained = None
        if encoders is not None and init not in BASELINE_INITS:
            pretrained = checkpoints.load(encoders)
            check_encoders_fold(pretrained, self.meta.get("fold"), encoders)
        # what a checkpoint started from: resumed only from the same pretrained weights
        self.encoders_digest = (
            checkpoints.weights_digest(pretrained) if pretrained is not None else None
        )
        mean, std = self._norm(norm, pretrained, encoders, fit_stores, progress)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        torch.manual_seed(settings["seed"])
        if init != "unet":
            check_hook(self.block, self.scale)
        else:
            check_unet(self.block)
        if init == "unet":
            model: torch.nn.Module = UNet(len(classes), backbone=backbone)
        elif init == "imagenet":
            weights = _imagenet_weights(settings)
            try:
                model = HookNet(len(classes), backbone, self.scale, self.block, weights=weights)
            except ValueError as exc:
                raise ConfigError(f"finetune.weights: {exc}") from exc
            log.info("HookNet encoders from ImageNet weights %s", weights)
            # its contents too: a file replaced under the same name is no resume
            self.encoders_digest = checkpoints.file_digest(weights)
        else:
            model = HookNet(len(classes), backbone, self.scale, self.block)
            if init not in BASELINE_INITS:
                if encoders is None:
                    raise ConfigError(f"finetune.init {init} needs --encoders (encoders.pt)")
                try:
                    model.load_encoders(pretrained or encoders)
                except ValueError as exc:
                    raise ConfigError(
                        f"{encoders}: {exc}; finetune.backbone must equal the pretraining's "
                        "pretrain.backbone"
                    ) from exc
        self.model = model.to(self.device)
        fused = self.device.type == "cuda"  # one optimiser kernel per step on a GPU
        self.opt = torch.optim.Adam(self.model.parameters(), lr=settings["lr"], fused=fused)
        self.amp = amp_dtype(self.device, settings["amp"])
        # fp16 (cards without bf16) needs loss scaling against gradient underflow
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.sampler = EpochSampler(len(self.train), settings["seed"])
        if len(self.train) < settings["batch_size"]:
            log.warning(
                "only %d labelled tiles for batch %d: batches are smaller",
                len(self.train),
                settings["batch_size"],
            )
        self.loader = DataLoader(
            self.train,
            batch_size=min(settings["batch_size"], len(self.train)),
            sampler=self.sampler,
            drop_last=True,
            num_workers=settings["workers"],
            worker_init_fn=loader_worker_init,
            pin_memory=self.device.type == "cuda",
        )
        self.epoch = 0
        self.checkpointed = 0  # the epoch checkpoint.pt holds (0: none of this run)
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"score": -1.0, "epoch": 0, "state": None}

    def _norm(
        self,
        norm: tuple[list[float], list[float]] | None,
        encoder_state: dict[str, Any] | None,
        encoders: Path | None,
        fit_stores: list[LabelledStore],
        progress: bool | None,
    ) -> tuple[list[float], list[float]]:
        """The given (mean, std), else the encoders' own, else computed from the fit stores; a
        given one that differs from the encoders' is logged (their features expect theirs)."""
        pretrained = encoder_stats(encoder_state) if encoder_state is not None else None
        if norm is None and pretrained is not None:
            norm = pretrained
            log_stats(norm, f"of the encoders {encoders}")
        elif norm is None:
            tiles = [pair.tiles for pair in fit_stores]
            norm = computed_stats(
                tiles, defaults("pretrain")["norm_tiles"], self.st["seed"], progress
            )
        elif pretrained is not None and not np.allclose(norm, pretrained, atol=1e-6):
            log.warning(
                "fine-tuning normalises with mean %s, std %s, but %s was pretrained with mean "
                "%s, std %s: give the same pretrain.mean/std to both stages",
                *norm,
                encoders,
                *pretrained,
            )
        return list(norm[0]), list(norm[1])

    def _inputs(self, ctx: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def prep(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0

        return prep(ctx), prep(tgt)

    def _forward(
        self, ctx: torch.Tensor, tgt: torch.Tensor, context_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(target logits, context logits); the context logits only when asked for (forward
        work no loss reads otherwise: about 1% of a training step, bench/finetune_step.py),
        None for the U-Net."""
        ctx, tgt = (ctx - self.mean) / self.std, (tgt - self.mean) / self.std
        with torch.autocast(
            self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        ):
            if self.st["init"] == "unet":
                return self.model(tgt), None
            return self.model(ctx, tgt, context_logits=context_logits)

    def _loss(self, logits: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """Soft Dice over the foreground classes, or cross-entropy ignoring class 0 (0 with a
        graph when nothing is labelled, where the mean would be NaN)."""
        if self.st["loss"] == "dice":
            return soft_dice_loss(logits, lab)
        # the mean over labelled pixels, 0 (with a graph) when none, without asking the GPU
        total = F.cross_entropy(logits.float(), lab.long(), ignore_index=0, reduction="sum")
        return total / (lab > 0).sum().clamp_min(1)

    def batch_loss(
        self, ctx: torch.Tensor, tgt: torch.Tensor, lab: torch.Tensor, clab: torch.Tensor
    ) -> torch.Tensor:
        """Loss on the target output plus `context_weight` x the loss on the context output
        against the context labels (DESIGN 5; weight 0 = the paper's lambda 1)."""
        w = float(self.st["context_weight"])
        t_logits, c_logits = self._forward(ctx, tgt, context_logits=w > 0)
        loss = self._loss(t_logits, lab)
        if w > 0 and c_logits is not None:
            loss = loss + w * self._loss(c_logits, clab)
        return loss

    def train_epoch(self, progress: bool | None = None) -> float:
        """One epoch over the sampled labelled tiles (paper IV-C); the mean training loss.
        `progress`: a bar (None: only on a terminal, not in a job's log)."""
        self.sampler.set_epoch(self.epoch)
        self.train.set_epoch(self.epoch)
        gen = torch.Generator(device=self.device).manual_seed(self.st["seed"] * 7919 + self.epoch)
        torch.manual_seed(self.st["seed"] * 1_000_033 + self.epoch)
        self.model.train()
        total, steps = torch.zeros((), device=self.device), 0  # summed on the device: no sync
        cap = self.st["steps_per_epoch"] or len(self.loader)
        bar = tqdm(
            total=min(cap, len(self.loader)),
            desc=f"epoch {self.epoch + 1}",
            disable=None if progress is None else not progress,
            mininterval=5.0,
        )
        for ctx, tgt, lab, clab in self.loader:
            ctx, tgt = self._inputs(ctx, tgt)
            ctx, tgt, lab, clab = _shared_jitter_flip(
                ctx,
                tgt,
                lab.to(self.device, non_blocking=True),
                clab.to(self.device, non_blocking=True),
                self.st,
                gen,
            )
            loss = self.batch_loss(ctx, tgt, lab, clab)
            optimise(loss, self.opt, self.scaler)
            total += loss.detach().float()
            steps += 1
            bar.update(1)
            if steps % CHECK_EVERY == 0:
                self._check_finite(total, steps)
            if steps >= cap:
                break
        bar.close()
        self._check_finite(total, steps)
        return float(total) / max(1, steps)

    def _check_finite(self, total: torch.Tensor, steps: int) -> None:
        """Stop on a non-finite loss among the epoch's first `steps` steps (checked every
        CHECK_EVERY steps, as in pretraining: each check waits for the GPU). No selection and no
        checkpoint follow a bad epoch, so the last good checkpoint stays."""
        if not finite(total):
            advice = checkpoints.restart_advice(
                self.checkpoint_path, "finetune", self.amp is not None
            )
            raise TrainingError(
                f"non-finite fine-tuning loss within the first {steps} steps of epoch "
                f"{self.epoch + 1}. {advice}"
            )

    @torch.no_grad()
    def evaluate(self, data: LabelledTiles) -> dict[str, Any]:
        """Macro F1 and accuracy over the foreground classes of `data` (argmax over 1..K)."""
        self.model.eval()
        k = len(self.classes) - 1
        cm = np.zeros((k, k + 1), np.int64)
        for ctx, tgt, lab, _ in DataLoader(data, batch_size=self.st["batch_size"]):
            logits = self._forward(*self._inputs(ctx, tgt))[0]
            pred = logits[:, 1:].argmax(1).cpu().numpy() + 1
            cm += confusion(pred, lab.numpy(), k)
        return scores(cm)

    def fit(self, progress: bool | None = None) -> None:
        """Train up to `epochs`, scoring the selection slides after each epoch and keeping the
        best state by macro F1 (without selection slides, the last epoch); checkpointed every
        epoch. `progress`: a bar per epoch (None: only on a terminal). A stop (Ctrl-C, or the
        SIGTERM of a stopped Snakemake or a time limit) logs where it stood and what a rerun
        does before it ends the run."""
        try:
            self._fit(progress)
        except (KeyboardInterrupt, SystemExit):
            if self.checkpointed:
                after = (
                    f"{self.checkpoint_path} holds epoch {self.checkpointed}: rerun with --resume "
                    "(as the workflow does; without it the checkpoint is dropped) and training "
                    f"goes on from epoch {self.checkpointed + 1}"
                )
            else:
                after = "no epoch had finished: a rerun starts anew"
            log.warning(
                "fine-tuning stopped before the end of epoch %d of %d; %s",
                self.checkpointed + 1,
                self.st["epochs"],
                after,
            )
            raise

    def _fit(self, progress: bool | None) -> None:
        while self.epoch < self.st["epochs"]:
            t0 = time.perf_counter()
            loss = self.train_epoch(progress)
            if self.select is None:
                sel = {"macro_f1": float("nan"), "accuracy": float("nan")}
            else:
                sel = self.evaluate(self.select)
            self.epoch += 1
            score = sel["macro_f1"] if np.isfinite(sel["macro_f1"]) else 0.0
            self.history.append(
                {
                    "epoch": self.epoch,
                    "train_loss": loss,
                    "select_macro_f1": sel["macro_f1"],
                    "select_accuracy": sel["accuracy"],
                    "seconds": time.perf_counter() - t0,
                }
            )
            if self.select is None or score > self.best["score"]:
                self.best = {
                    "score": score if self.select is not None else float("nan"),
                    "epoch": self.epoch,
                    "state": copy.deepcopy(self.model.state_dict()),
                }
            chosen = (
                "(no selection slides, finetune.held_out 0: the last epoch is kept)"
                if self.select is None
                else f"selection macro F1 {sel['macro_f1']:.4f} "
                f"(best {self.best['score']:.4f} @ {self.best['epoch']})"
            )
            log.info("epoch %d/%d loss %.4f %s", self.epoch, self.st["epochs"], loss, chosen)
            self.save_checkpoint()
            self.write_history(final=False)

    def write_history(self, final: bool = True) -> None:
        """history.tsv: loss and selection scores per epoch (atomically), written with
        model.pt; while the run goes on, the epochs so far are in history.running.tsv (an
        interrupted run left a history.tsv that looked finished)."""
        write_epochs(self.history, HISTORY_COLUMNS, self.out_dir / "history.tsv", final)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _hyper(self) -> dict[str, Any]:
        # the normalisation too: it may come from the encoders or the stores, not the settings;
        # not the settings this init does not read (the workflow writes them at their defaults)
        free = RESUME_FREE | unread_settings(self.st["init"])
        return {k: v for k, v in self.st.items() if k not in free} | {
            "fraction": self.fraction,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    def save_checkpoint(self) -> None:
        """checkpoint.pt: the full training state, for a resume after a kill (never of
        non-finite weights: the last good checkpoint stays)."""
        when = f"fine-tuning epoch {self.epoch}"
        if why := checkpoints.nonfinite_weights(
            self.model, self.checkpoint_path, "finetune", when, self.amp is not None
        ):
            raise TrainingError(why)
        checkpoints.save_training(
            self.checkpoint_path, self.model, self.opt, self.scaler, epoch=self.epoch,
            best=self.best, history=self.history, hyper=self._hyper(),
            stores=self.store_ids, encoders=self.encoders_digest, settings=self.st,
        )  # fmt: skip
        self.checkpointed = self.epoch

    def resume(self) -> bool:
        """Load the checkpoint if there is one (refused if trained otherwise); True if loaded."""
        if not self.checkpoint_path.exists():
            return False
        state = checkpoints.resume_training(
            self.checkpoint_path, self._hyper(), self.model, self.opt, self.scaler,
            stores=self.store_ids, encoders=self.encoders_digest,
        )  # fmt: skip
        assert state is not None  # only pretraining restarts a finished run
        self.epoch, self.best = int(state["epoch"]), state["best"]
        self.checkpointed = self.epoch
        checkpoints.check_epochs(self.checkpoint_path, self.epoch, self.st["epochs"], "finetune")
        self.history = list(state["history"])
        log.info("resumed from %s after epoch %d", self.checkpoint_path, self.epoch)
        return True

    def export(self) -> None:
        """model.pt: the best epoch's weights with everything inference and scoring need; then
        history.tsv."""
        out = {
            "state_dict": self.best["state"],
            "epoch": self.best["epoch"],
            "select_macro_f1": self.best["score"],
            "init": self.st["init"],
            "backbone": self.st["backbone"],
            "target_block": self.st["target_block"],
            "context_weight": float(self.st["context_weight"]),
            "fraction": self.fraction,
            "classes": self.classes,
            "scale": self.scale,
            "block": self.block,
            "target_mpp": self.target_mpp,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "settings": self.st,
            "dsf_version": __version__,
            "train_tiles": len(self.train),
            **self.meta,
        }
        checkpoints.save(out, self.out_dir / "model.pt")
        self.write_history()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--stores", nargs="*", required=True, type=Path, help="annotated training stores (.zarr)"
    )
    p.add_argument(
        "--label-stores",
        nargs="*",
        required=True,
        type=Path,
        help="their labels stores (.labels.zarr of `dsf tile-labels`)",
    )
    p.add_argument("--folds", required=True, type=Path, help="folds.tsv")
    p.add_argument("--fold", required=True, type=int, help="validation fold (never read)")
    p.add_argument(
        "--fraction",
        type=float,
        default=defaults("finetune")["fractions"][0],
        help="label fraction of this run (default: the first of finetune.fractions, %(default)s)",
    )
    p.add_argument("--encoders", type=Path, help="encoders.pt of this fold's pretraining")
    p.add_argument(
        "--out-dir",
        required=True,
        type=Path,
        help="folder for model.pt, history.tsv and, while it runs, checkpoint.pt",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the folder's checkpoint.pt (of a killed run) with the same settings",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (without it: a bar per epoch on a terminal, none in a log file)",
    )
    for stat, meta in (("mean", "M"), ("std", "S")):
        p.add_argument(
            f"--norm-{stat}",
            f"--{stat}",  # dsf pretrain's name for it
            dest=f"norm_{stat}",
            nargs=3,
            type=float,
            metavar=meta,
            help=f"input normalisation {stat} (the workflow passes pretrain.{stat} when set)",
        )
    p.add_argument(
        "--norm",
        type=Path,
        help="normalisation JSON of `dsf norm` (the workflow's results/norm/); with neither it "
        "nor --norm-mean/--norm-std: the encoders' own, else computed from the stores",
    )
    add_section_arguments(p, "finetune", skip=("inits", "fractions", "gpus"))
    # of the labels settings only the classes: the tiles are labelled already
    others = tuple(k for k in section_schema("labels")["properties"] if k != "classes")
    add_section_arguments(p, "labels", skip=others)
    return p


def check_encoders_fold(pretrained: dict[str, Any], fold: int | None, path: Path) -> None:
    """Refuse encoders pretrained for another fold: they saw this fold's validation slides
    (DESIGN section 4: no validation tile in pretraining). Encoders of `pretrain.scope all`
    (no fold) were pretrained on every slide by choice and pass."""
    own = pretrained.get("fold")
    if fold is None or own is None or int(own) == int(fold):
        return
    raise ConfigError(
        f"{path} was pretrained for fold {own}, on slides that include fold {fold}'s "
        f"validation slides: fine-tune fold {fold} from the encoders of fold {fold} "
        f"(results/pretrain/<init>/fold{fold}/encoders.pt), or pretrain once on every slide "
        "(pretrain.scope all)"
    )


def main(argv: list[str] | None = None) -> int:
    """`dsf finetune`: one init x fraction x fold -> model.pt, history.tsv."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        st = section_from_args(args, "finetune")
        classes = section_from_args(args, "labels")["classes"]
        if not given(args, "labels", "classes") and args.label_stores:
            # by hand without --classes: the labels stores' classes, not the schema's
            classes = labels_store_classes(args.label_stores[0])
        if not args.stores:
            raise ConfigError(
                f"fold {args.fold} has no annotated training slide to fine-tune on: fill the "
                "sheet's `labels` column for slides of more patients"
            )
        folds = read_folds(args.folds)
        if args.fold not in set(folds["fold"]):
            raise ConfigError(
                f"--fold {args.fold} is not a fold of {args.folds} (folds "
                f"{sorted(int(f) for f in set(folds['fold']))}); give one of them"
            )
        pairs = pair_stores(args.stores, args.label_stores, classes)
        by_slide = {p.slide: p for p in pairs}
        unknown = sorted(set(by_slide) - set(folds["slide"]))
        if unknown:  # the split below would leave them out, silently
            raise ConfigError(
                f"stores of slides {unknown} were given, but {args.folds} has no fold for "
                "them: give the folds table of these slides (the workflow's results/folds.tsv)"
            )
        val = set(folds.loc[folds["fold"] == args.fold, "slide"])
        if val & set(by_slide):
            raise ConfigError(
                f"stores of validation slides {sorted(val & set(by_slide))} "
                f"were given for fold {args.fold}: fine-tuning never reads them"
            )
        # the split is over the labelled training slides given (the stores)
        fit, sel = selection_split(
            folds[folds["slide"].isin(by_slide)], args.fold, st["held_out"], st["seed"]
        )
        norm = given_stats(args.norm_mean, args.norm_std, args.norm)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:  # a new run: an earlier one's results must not outlive a kill
            for name in ("checkpoint.pt", *RESULT_FILES):
                (args.out_dir / name).unlink(missing_ok=True)
        tuner = FineTuner(
            st,
            [by_slide[s] for s in fit],
            [by_slide[s] for s in sel],
            args.fraction,
            classes,
            args.out_dir,
            args.encoders,
            {"fold": args.fold, "fit_slides": fit, "select_slides": sel},
            norm=norm,
            progress=False if args.no_progress else None,
        )
        if args.resume and not tuner.resume():
            # training anew: an earlier run's results must not outlive this one stopped
            # midway, looking like its own (as pretraining)
            for name in RESULT_FILES:
                (args.out_dir / name).unlink(missing_ok=True)
        tuner.fit(progress=False if args.no_progress else None)
        tuner.export()
        # model.pt and history.tsv hold the result; the full state (about 12x the model with
        # Adam's moments) only served an interrupted run
        tuner.checkpoint_path.unlink(missing_ok=True)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
