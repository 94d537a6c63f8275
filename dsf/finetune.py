"""HookNet fine-tuning of one init, label fraction and fold (DESIGN sections 4-5, paper IV-B).

Inputs per tile: the context (the whole tile at the context mpp) and the centre block at the
target mpp with its labels (`dsf.finetune_data`). Soft Dice over the foreground classes (or
cross-entropy), Adam, colour jitter and a horizontal flip shared by both branches. The model is
chosen on held-out training slides of the fold (never the validation fold) by macro F1; the
chosen epoch is stated in `model.pt` and every epoch in `history.tsv`. `--resume` continues
from `checkpoint.pt` exactly, like pretraining.
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
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
from torch.utils.data import DataLoader

from dsf import __version__, checkpoints
from dsf.atomic import atomic_path
from dsf.config import add_section_arguments, defaults, section_from_args
from dsf.errors import ConfigError
from dsf.finetune_data import LabelledTiles, selection_split
from dsf.folds import read_folds
from dsf.metrics import confusion, scores, soft_dice_loss
from dsf.pretrain import EpochSampler, TrainingError, _amp_dtype, _device
from dsf.runner import run, setup_logging
from dsf.tiles import open_store

log = logging.getLogger(__name__)

RESUME_FREE = {"epochs", "workers", "device", "inits", "fractions", "gpus"}
HISTORY_COLUMNS = ["epoch", "train_loss", "select_macro_f1", "select_accuracy", "seconds"]


def _shared_jitter_flip(
    ctx: torch.Tensor,
    tgt: torch.Tensor,
    lab: torch.Tensor,
    st: dict[str, Any],
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brightness, contrast and saturation jitter (pretraining strengths) with p `jitter_p`,
    then a horizontal flip with p `flip_p`; one draw per sample, shared by context, target and
    labels so the two branches stay concentric."""
    b = ctx.shape[0]
    dev = ctx.device
    strength = torch.tensor(defaults("pretrain")["jitter"][:3], device=dev)
    on = (torch.rand(b, generator=gen, device=dev) < st["jitter_p"]).float()
    f = 1 + (torch.rand(b, 3, generator=gen, device=dev) * 2 - 1) * strength * on[:, None]
    flip = torch.rand(b, generator=gen, device=dev) < st["flip_p"]

    def colour(x: torch.Tensor) -> torch.Tensor:
        x = x * f[:, 0, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * f[:, 1, None, None, None] + mean
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = (x - grey) * f[:, 2, None, None, None] + grey
        return x.clamp(0, 1)

    ctx, tgt = colour(ctx), colour(tgt)
    m = flip[:, None, None, None]
    ctx = torch.where(m, ctx.flip(-1), ctx)
    tgt = torch.where(m, tgt.flip(-1), tgt)
    lab = torch.where(flip[:, None, None], lab.flip(-1), lab)
    return ctx, tgt, lab


class FineTuner:
    """One fine-tuning run: data of the fold's fit slides, selection on its held-out slides."""

    def __init__(
        self,
        settings: dict[str, Any],
        fit_stores: list[Path],
        select_stores: list[Path],
        fraction: float,
        classes: list[str],
        out_dir: Path,
        encoders: Path | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        from dsf.models.hooknet import HookNet, UNet

        self.st, self.out_dir, self.meta = settings, out_dir, meta or {}
        self.device = _device(settings["device"])
        self.fraction = fraction
        self.classes = classes
        self.train = LabelledTiles(fit_stores, fraction, settings["seed"])
        self.select = LabelledTiles(select_stores, 1.0, settings["seed"])
        g = open_store(fit_stores[0])
        self.scale, self.block = int(g.attrs["scale"]), int(g.attrs["block"])
        pre = defaults("pretrain")
        self.mean = torch.tensor(pre["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["std"], device=self.device).view(1, 3, 1, 1)
        torch.manual_seed(settings["seed"])
        init = settings["init"]
        if init == "unet":
            model: torch.nn.Module = UNet(len(classes))
        else:
            model = HookNet(len(classes), scale=self.scale, input_size=self.block)
            if init != "random":
                if encoders is None:
                    raise ConfigError(f"finetune.init {init} needs --encoders (encoders.pt)")
                model.load_encoders(encoders)
        self.model = model.to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=settings["lr"])
        self.amp = _amp_dtype(self.device, settings["amp"])
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
        )
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"score": -1.0, "epoch": 0, "state": None}

    def _inputs(self, ctx: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def prep(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device).permute(0, 3, 1, 2).float() / 255.0

        return prep(ctx), prep(tgt)

    def _forward(self, ctx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        ctx, tgt = (ctx - self.mean) / self.std, (tgt - self.mean) / self.std
        with torch.autocast(
            self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        ):
            if self.st["init"] == "unet":
                return self.model(tgt)
            return self.model(ctx, tgt)[0]

    def _loss(self, logits: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        if self.st["loss"] == "dice":
            return soft_dice_loss(logits, lab)
        return F.cross_entropy(logits.float(), lab.long(), ignore_index=0)

    def train_epoch(self) -> float:
        self.sampler.set_epoch(self.epoch)
        gen = torch.Generator(device=self.device).manual_seed(self.st["seed"] * 7919 + self.epoch)
        torch.manual_seed(self.st["seed"] * 1_000_033 + self.epoch)
        self.model.train()
        total, steps = 0.0, 0
        cap = self.st["steps_per_epoch"] or len(self.loader)
        for ctx, tgt, lab in self.loader:
            ctx, tgt = self._inputs(ctx, tgt)
            ctx, tgt, lab = _shared_jitter_flip(ctx, tgt, lab.to(self.device), self.st, gen)
            loss = self._loss(self._forward(ctx, tgt), lab)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite fine-tuning loss in epoch {self.epoch + 1}; lower finetune.lr "
                    "or turn finetune.amp off, and rerun with --resume"
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach())
            steps += 1
            if steps >= cap:
                break
        return total / max(1, steps)

    @torch.no_grad()
    def evaluate(self, data: LabelledTiles) -> dict[str, Any]:
        """Macro F1 and accuracy over the foreground classes of `data` (argmax over 1..K)."""
        self.model.eval()
        k = len(self.classes) - 1
        cm = np.zeros((k, k + 1), np.int64)
        for ctx, tgt, lab in DataLoader(data, batch_size=self.st["batch_size"]):
            logits = self._forward(*self._inputs(ctx, tgt))
            pred = logits[:, 1:].argmax(1).cpu().numpy() + 1
            cm += confusion(pred, lab.numpy(), k)
        return scores(cm)

    def fit(self) -> None:
        while self.epoch < self.st["epochs"]:
            t0 = time.perf_counter()
            loss = self.train_epoch()
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
            if score > self.best["score"]:
                self.best = {
                    "score": score,
                    "epoch": self.epoch,
                    "state": copy.deepcopy(self.model.state_dict()),
                }
            log.info(
                "epoch %d/%d loss %.4f selection macro F1 %.4f (best %.4f @ %d)",
                self.epoch,
                self.st["epochs"],
                loss,
                sel["macro_f1"],
                self.best["score"],
                self.best["epoch"],
            )
            self.save_checkpoint()
            with atomic_path(self.out_dir / "history.tsv") as tmp:
                pd.DataFrame(self.history, columns=HISTORY_COLUMNS).to_csv(
                    tmp, sep="\t", index=False
                )

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _hyper(self) -> dict[str, Any]:
        return {k: v for k, v in self.st.items() if k not in RESUME_FREE} | {
            "fraction": self.fraction
        }

    def save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "epoch": self.epoch,
            "best": self.best,
            "history": self.history,
            "hyper": self._hyper(),
        }
        checkpoints.save(state, self.checkpoint_path)

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = checkpoints.load_for_resume(self.checkpoint_path, self._hyper(), self.device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch, self.best = int(state["epoch"]), state["best"]
        self.history = list(state["history"])
        return True

    def export(self) -> None:
        out = {
            "state_dict": self.best["state"],
            "epoch": self.best["epoch"],
            "select_macro_f1": self.best["score"],
            "init": self.st["init"],
            "fraction": self.fraction,
            "classes": self.classes,
            "scale": self.scale,
            "block": self.block,
            "settings": self.st,
            "dsf_version": __version__,
            "train_tiles": len(self.train),
            **self.meta,
        }
        checkpoints.save(out, self.out_dir / "model.pt")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stores", nargs="+", required=True, type=Path, help="patch stores (.zarr)")
    p.add_argument("--folds", required=True, type=Path, help="folds.tsv")
    p.add_argument("--fold", required=True, type=int, help="validation fold (never read)")
    p.add_argument("--fraction", type=float, default=1.0, help="label fraction")
    p.add_argument("--encoders", type=Path, help="encoders.pt of this fold's pretraining")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--resume", action="store_true")
    add_section_arguments(p, "finetune")
    add_section_arguments(p, "labels")
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf finetune`: one init x fraction x fold -> model.pt, history.tsv."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        st = section_from_args(args, "finetune")
        classes = section_from_args(args, "labels")["classes"]
        folds = read_folds(args.folds)
        by_slide = {str(open_store(s).attrs["slide_id"]): s for s in args.stores}
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
        args.out_dir.mkdir(parents=True, exist_ok=True)
        tuner = FineTuner(
            st,
            [by_slide[s] for s in fit],
            [by_slide[s] for s in sel],
            args.fraction,
            classes,
            args.out_dir,
            args.encoders,
            {"fold": args.fold, "fit_slides": fit, "select_slides": sel},
        )
        if args.resume:
            tuner.resume()
        tuner.fit()
        tuner.export()
        # model.pt and history.tsv hold the result; the full state (about 12x the model with
        # Adam's moments) only served an interrupted run
        tuner.checkpoint_path.unlink(missing_ok=True)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
