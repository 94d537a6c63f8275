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

REQUIRED = ("state_dict", "init", "classes", "scale", "block", "target_mpp")


def find_models(spec: dict[str, list[str]], key: str = "apply.models") -> dict[str, list[str]]:
    """The model.pt files of each name of `spec` (files, or folders searched for `model.pt`),
    sorted per folder; a missing path or a folder without models is a ConfigError naming
    `key`."""
    found: dict[str, list[str]] = {}
    for name, paths in spec.items():
        models: list[str] = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                inside = sorted(str(p) for p in path.rglob("model.pt"))
                if not inside:
                    raise ConfigError(
                        f"{key}.{name}: folder {raw} holds no model.pt; give the fine-tuning "
                        "folder of an earlier run (results/finetune/<init>/frac<f>) or the files"
                    )
                models += inside
            elif path.is_file():
                models.append(str(path))
            else:
                raise ConfigError(
                    f"{key}.{name}: {raw} not found (paths are relative to the working "
                    f"directory {Path.cwd()}); give model.pt files or folders holding them"
                )
        found[name] = list(dict.fromkeys(models))
    return found


def trained_on(meta: dict[str, Any]) -> set[str]:
    """The slides a fine-tuned model was fitted or selected on (its model.pt says)."""
    return set(meta.get("fit_slides", [])) | set(meta.get("select_slides", []))


def check_given_models(
    models: dict[str, list[str]],
    scored: set[str],
    patches: dict[str, Any] | None,
    classes: list[str],
    one_fraction: bool,
) -> None:
    """Refuse at the start what would stop a prediction run midway (metadata only, the weights
    mapped, not read): an annotated slide (`scored`) among a model's fit or selection slides
    (scoring it would not be validation); with `patches` (the tile protocol) a model whose
    target mpp, block, scale or classes differ from the `patches` and `labels` sections; with
    `one_fraction` (each model scored alone) a set whose models differ in label fraction."""
    for name, paths in models.items():
        fractions = set()
        for path in paths:
            meta = checkpoints.load(Path(path), mmap=True)
            fractions.add(float(meta.get("fraction", 1.0)))
            seen = sorted(scored & trained_on(meta))
            if seen:
                raise ConfigError(
                    f"apply.models.{name}: {path} was fitted or selected on annotated slides "
                    f"{seen} of this run: scoring them would not be validation; drop their "
                    "annotations (labels) from the sheet, or give models that did not train "
                    "on them"
                )
            if patches is not None:
                _check_geometry(name, path, meta, patches, classes)
        if one_fraction and len(fractions) > 1:
            raise ConfigError(
                f"apply.models.{name} mixes models fine-tuned on label fractions "
                f"{sorted(fractions)}: scored one by one they would not form one set; give one "
                "fraction's folder (results/finetune/<init>/frac<f>) per name"
            )


def _check_geometry(
    name: str, path: str, meta: dict[str, Any], patches: dict[str, Any], classes: list[str]
) -> None:
    """The tile protocol's stores must be cut with the model's geometry and classes."""
    want = (float(patches["target_mpp"]), int(patches["block"]), int(patches["scale"]))
    got = (float(meta["target_mpp"]), int(meta["block"]), int(meta["scale"]))
    if got[1:] != want[1:] or abs(got[0] - want[0]) > 1e-3 * want[0]:
        raise ConfigError(
            f"apply.models.{name}: {path} was fine-tuned on target_mpp, block, scale "
            f"{got}, but patches.target_mpp, patches.block, patches.scale are {want}: "
            "set the patches section to the models' geometry for the tile protocol"
        )
    if list(meta["classes"]) != list(classes):
        raise ConfigError(
            f"apply.models.{name}: {path} predicts classes {list(meta['classes'])}, "
            f"labels.classes is {list(classes)}: set labels.classes to the models'"
        )


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
        """Softmax over all class channels, (B, C, block, block) float32 on the device.

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
        return logits.float().softmax(dim=1)


def load_predictor(path: str | Path, device: torch.device, amp: bool = True) -> Predictor:
    """Load a `model.pt` written by `dsf finetune` (weights only) in eval mode on `device`."""
    from dsf.models.fold import fold_batchnorm
    from dsf.models.hooknet import HookNet, UNet

    path = Path(path)
    meta = checkpoints.load(path, device)
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ConfigError(
            f"{path} lacks {missing}: it was not written by this version of `dsf finetune`; "
            "rerun the finetune stage (snakemake --forcerun finetune)"
        )
    classes = list(meta["classes"])
    settings = meta.get("settings", {})
    backbone = meta.get("backbone", settings.get("backbone", "resnet18"))
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
