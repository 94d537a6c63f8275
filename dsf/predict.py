"""Fine-tuned models as predictors: load `model.pt`, turn uint8 context/target blocks into class
probabilities (DESIGN section 5: HookNet's target output; the U-Net baseline sees the target).

Shared by the tile-level evaluation and whole-slide inference so both feed the model exactly as
fine-tuning did (same normalisation, same geometry, same class channels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dsf import checkpoints
from dsf.devices import amp_dtype
from dsf.errors import ConfigError
from dsf.model_sets import LEGACY_BACKBONE

REQUIRED = ("state_dict", "init", "classes", "scale", "block", "target_mpp")


@dataclass
class Predictor:
    """A fine-tuned model with what it needs to be fed: geometry, classes, normalisation."""

    model: nn.Module
    init: str
    classes: list[str]
    scale: int
    block: int
    target_mpp: float
    mean: Tensor
    std: Tensor
    device: torch.device
    amp: torch.dtype | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_context(self) -> bool:
        return self.init != "unet"

    def probabilities(self, context: Tensor, target: Tensor) -> Tensor:
        """Softmax over the foreground classes, (B, C - 1, block, block) float32 on the
        device: channel k is class k + 1 (class 0, ignore, is no model's to predict).

        `context` and `target` are uint8 (B, block, block, 3), the context the whole
        scale*block tile reduced by `scale`, concentric with the target block.
        """

        # (x / 255 - mean) / std as one multiply-add; the NHWC input viewed as NCHW is already
        # in channels_last, which the float conversion and the multiply-add keep
        scale, bias = 1.0 / (255.0 * self.std), -self.mean / self.std

        def prep(x: Tensor) -> Tensor:
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            x = torch.addcmul(bias, x, scale)
            return x.contiguous(memory_format=torch.channels_last)

        tgt = prep(target)
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
            ),
        ):
            if self.uses_context:  # only the target's logits: the context decoder stops early
                logits = self.model(prep(context), tgt, context_logits=False)[0]
            else:
                logits = self.model(tgt)
        # over the foreground classes only: fine-tuning's loss never scores class 0 (ignore),
        # so the share a model gives it is arbitrary, and averaged over an ensemble it had set
        # how much each model counted (a model near all-ignore had mapped its pixels as zero
        # probability)
        return logits[:, 1:].float().softmax(dim=1)


def load_predictor(path: str | Path, device: torch.device, amp: bool = True) -> Predictor:
    """Load a `model.pt` written by `dsf finetune` (weights only) in eval mode on `device`."""
    from dsf.models.fold import fold_batchnorm
    from dsf.models.hooknet import HookNet, UNet

    path = Path(path)
    meta = checkpoints.load(path, device)
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        if "model" in meta or "optimizer" in meta or "context" in meta:
            raise ConfigError(
                f"{path} is not a fine-tuned model (it lacks {missing}): encoders or a training "
                "checkpoint; give the model.pt of `dsf finetune` (results/finetune/<init>/"
                "frac<f>/fold<k>/model.pt)"
            )
        raise ConfigError(
            f"{path} lacks {missing}: it was not written by this version of `dsf finetune`; "
            "rerun the finetune stage (snakemake --forcerun finetune)"
        )
    classes = list(meta["classes"])
    settings = meta.get("settings", {})
    backbone = meta.get("backbone", settings.get("backbone", LEGACY_BACKBONE))
    if meta["init"] == "unet":
        model: nn.Module = UNet(len(classes), backbone=backbone)
    else:
        model = HookNet(
            len(classes), backbone=backbone, scale=int(meta["scale"]), input_size=int(meta["block"])
        )
    try:
        model.load_state_dict(meta["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"{path}: weights do not fit the model they describe: {exc}") from exc
    # batch norms folded into their convolutions (one pass fewer over each activation map), and
    # channels_last: the fast layout for convolutions on GPUs and CPUs alike (a HookNet at 64 px
    # runs about 3.5x faster on this project's 2-core CPU than in the default layout)
    model = model.eval()
    fold_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    if meta.get("mean") is None or meta.get("std") is None:
        raise ConfigError(
            f"{path} records no input normalisation (mean, std): it was not written by "
            "`dsf finetune`; rerun fine-tuning"
        )
    mean = torch.tensor(meta["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, 3, 1, 1)
    return Predictor(
        model=model,
        init=str(meta["init"]),
        classes=classes,
        scale=int(meta["scale"]),
        block=int(meta["block"]),
        target_mpp=float(meta["target_mpp"]),
        mean=mean,
        std=std,
        device=device,
        amp=amp_dtype(device, amp),
        meta={k: v for k, v in meta.items() if k != "state_dict"},
    )
