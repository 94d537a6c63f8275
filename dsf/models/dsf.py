"""The DSF-WSI pretraining model: dual branch, CTFM with the masked jigsaw, and DSL (paper III).

Two encoders of one architecture with separate weights: the context branch sees the whole tile at
the coarse resolution, the target branch its `n_blocks` blocks at the fine one (paper III-D). Each
view goes through the encoders alone (batch-norm statistics per view, as in SimSiam). Per stage and
per view:

- context features: the pooled context map, (B, C);
- target features: the pooled block maps, put back in raster order through the inverse of the
  view's permutation so that both views compare the same block, (B * n_blocks, C);
- fusion features (CTFM, paper III-D): the context vector concatenated with the target vectors of
  the first `n_keep` slots of the view's shuffled order, (B, (n_keep + 1) C). Dropping the other
  slots is the masking; the view's own slot order is the jigsaw. No stop-gradient on the features.

Each (group, stage) pair has its own projector and predictor (DSL, paper III-E), which take both
views' rows in one call (`dsf.models.heads`: per-view statistics, half the calls); the SimSiam loss
of each pair is weighted by `stage_weights` and summed over stages, and the total is the sum of the
three groups (Eq. 7-8), so it lies in [-sum(w) * groups, sum(w) * groups] = [-6.6, 6.6] by default.

The permutations are drawn by the caller (the augmentation shuffles the blocks); `draw_perms`
draws them as each method wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from dsf.models.encoders import build_encoder
from dsf.models.heads import Predictor, Projector, paired_simsiam_loss

__all__ = ["GROUPS", "METHODS", "DSFModel", "Method", "draw_perms"]

GROUPS = ("context", "target", "fusion")


@dataclass(frozen=True)
class Method:
    """Which parts of DSF-WSI a pretraining method uses (the ablations of paper IV-E, Table V).

    groups: SimSiam groups with a loss (and heads); stages: 1-based stages with a loss (and heads);
    mask: keep only n_keep = round(n_blocks * (1 - mask_ratio)) slots in the fusion (else all);
    shuffle: the target blocks of each view come in a fresh random order (the jigsaw).
    """

    groups: tuple[str, ...]
    stages: tuple[int, ...]
    mask: bool
    shuffle: bool


METHODS: dict[str, Method] = {
    # Full method: dense over 4 stages, context + target + fusion with the masked jigsaw.
    "dsf": Method(GROUPS, (1, 2, 3, 4), mask=True, shuffle=True),
    # Plain SimSiam on each branch alone, last stage only; no fusion, no jigsaw, no masking.
    "simsiam": Method(("context", "target"), (4,), mask=False, shuffle=False),
    # DSL without CTFM: dense context and target SimSiam over 4 stages, no fusion.
    "dsl_only": Method(("context", "target"), (1, 2, 3, 4), mask=False, shuffle=False),
    # Table V's three "w/o DSL" rows: the full method without DSL's density, i.e. context,
    # target and fusion SimSiam at the last stage only (the rows are "Ours" less a part, as
    # "w/o CTFM, only DSL" keeps the context and target losses), with ...
    # ... the masked jigsaw ("only CTFM", 0.7881),
    "ctfm_only": Method(GROUPS, (4,), mask=True, shuffle=True),
    # ... the jigsaw without masking: all n_blocks slots, shuffled ("only jigsaw", 0.7753),
    "jigsaw_only": Method(GROUPS, (4,), mask=False, shuffle=True),
    # ... masking without the jigsaw: a random n_keep subset in raster order ("only masking").
    "mask_only": Method(GROUPS, (4,), mask=True, shuffle=False),
}


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown pretraining method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def keep_count(n_blocks: int, mask_ratio: float, method: str = "dsf") -> int:
    """Slots the fusion keeps (the masked jigsaw, paper III-D): round(n_blocks * (1 -
    mask_ratio)) if `method` masks, else all."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not _method(method).mask:
        return n_blocks
    n_keep = round(n_blocks * (1.0 - mask_ratio))
    if not 1 <= n_keep <= n_blocks:
        raise ValueError(f"mask_ratio {mask_ratio} keeps {n_keep} of {n_blocks} blocks; need >= 1")
    return n_keep


def draw_perms(
    batch: int,
    n_blocks: int,
    method: str = "dsf",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mask_ratio: float = 0.5,
) -> Tensor:
    """Slot orders of the target blocks (the jigsaw, paper III-D), (2, batch, n_blocks) long:
    perms[v, b, j] fills slot j.

    Drawn independently per view and per sample. Shuffling methods (dsf, ctfm_only, jigsaw_only)
    get uniform random permutations. mask_only gets a random subset of n_keep blocks in ascending
    (raster) order followed by the other blocks in ascending order, so the fusion sees a random
    subset without any shuffle. simsiam and dsl_only get the identity (no jigsaw).
    """
    m = _method(method)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if not m.shuffle and not m.mask:
        perms = torch.arange(n_blocks, device=gen_device).expand(2, batch, n_blocks).clone()
        return perms.to(device) if device is not None else perms
    noise = torch.rand((2, batch, n_blocks), generator=generator, device=gen_device)
    perms = noise.argsort(dim=-1)
    if not m.shuffle:  # mask_only: kept subset, then the rest, each in raster order
        n_keep = keep_count(n_blocks, mask_ratio, method)
        perms = torch.cat(
            [perms[..., :n_keep].sort(dim=-1).values, perms[..., n_keep:].sort(dim=-1).values],
            dim=-1,
        )
    return perms.to(device) if device is not None else perms


class DSFModel(nn.Module):
    """DSF-WSI for self-supervised pretraining (paper III; DESIGN section 5).

    Args:
        backbone: encoder name (see `dsf.models.encoders.BACKBONES`).
        n_blocks: target blocks per tile, scale**2 (16 for scale 4).
        mask_ratio: fraction of the shuffled target slots the fusion drops (CTFM masking).
        method: one of `METHODS`:
            dsf: everything (dense 4 stages; context, target and fusion; masked jigsaw);
            simsiam: context and target SimSiam at stage 4 only, no fusion (heads for those only);
            dsl_only: dense context and target SimSiam over 4 stages, no fusion;
            ctfm_only, jigsaw_only, mask_only: Table V's "w/o DSL" rows, the context, target
                and fusion losses at stage 4 only, with the masked jigsaw (ctfm_only),
                the jigsaw without masking (all n_blocks shuffled slots) or masking without the
                jigsaw (pass `draw_perms(..., "mask_only")`: the kept slots are a random subset
                of blocks in raster order).
        stage_weights: DSL weight of stages 1-4 (Eq. 7); single-stage methods use the 4th.
        weights: optional local torchvision weights file for both encoders.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        n_blocks: int = 16,
        mask_ratio: float = 0.5,
        method: str = "dsf",
        stage_weights: tuple[float, float, float, float] = (0.1, 0.4, 0.7, 1.0),
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.spec = _method(method)
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        if len(stage_weights) != 4:
            raise ValueError(f"stage_weights needs 4 values, got {stage_weights}")
        self.backbone = backbone
        self.n_blocks = n_blocks
        self.mask_ratio = mask_ratio
        self.n_keep = keep_count(n_blocks, mask_ratio, method)
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.context_encoder = build_encoder(backbone, weights)
        self.target_encoder = build_encoder(backbone, weights)
        self.dims = self.context_encoder.dims
        self.head_dims: dict[str, int] = {}
        for group in self.spec.groups:
            for stage in self.spec.stages:
                c = self.dims[stage - 1]
                self.head_dims[f"{group}{stage}"] = (
                    (self.n_keep + 1) * c if group == "fusion" else c
                )
        self.projectors = nn.ModuleDict({k: Projector(d) for k, d in self.head_dims.items()})
        self.predictors = nn.ModuleDict({k: Predictor(d) for k, d in self.head_dims.items()})

    def draw_perms(
        self, batch: int, generator: torch.Generator | None = None, device: Any = None
    ) -> Tensor:
        """`draw_perms` with this model's n_blocks, method and mask ratio."""
        return draw_perms(batch, self.n_blocks, self.method, generator, device, self.mask_ratio)

    def _features(
        self, context: Tensor, targets: Tensor, perms: Tensor
    ) -> dict[str, dict[int, Tensor]]:
        """Per group and (1-based) stage with a loss, the rows SimSiam compares, both views at
        once: (R, 2, d) with view v in [:, v] (see module docstring). Each view goes through the
        encoders alone, so their batch-norm statistics stay per view."""
        groups = self.spec.groups
        # Without a target loss only the kept slots would matter, so only those would be
        # encoded (every method with a fusion loss has a target loss too, since 2026-12-07).
        n_enc = self.n_blocks if "target" in groups else self.n_keep
        b = targets.shape[1]
        ctx = [self.context_encoder(context[v]) for v in range(2)]
        tgt = [self.target_encoder(targets[v, :, :n_enc].flatten(0, 1)) for v in range(2)]
        # raster[b, k, v] = slot inverse[v, b, k] of view v: the block k of both views
        inverse = perms.argsort(dim=-1).permute(1, 2, 0).unsqueeze(-1)  # (B, n, 2, 1)
        out: dict[str, dict[int, Tensor]] = {g: {} for g in groups}
        for stage in self.spec.stages:
            c = torch.stack([ctx[v][stage - 1] for v in range(2)], dim=1)  # (B, 2, C)
            slots = torch.stack(
                [tgt[v][stage - 1].reshape(b, n_enc, -1) for v in range(2)], dim=2
            )  # (B, n_enc, 2, C)
            if "context" in groups:
                out["context"][stage] = c
            if "target" in groups:
                raster = slots.gather(1, inverse.expand(-1, -1, -1, slots.shape[-1]))
                out["target"][stage] = raster.flatten(0, 1)
            if "fusion" in groups:
                kept = slots[:, : self.n_keep].transpose(1, 2)  # (B, 2, n_keep, C)
                out["fusion"][stage] = torch.cat([c.unsqueeze(2), kept], dim=2).flatten(2)
        return out

    def forward(self, context: Tensor, targets: Tensor, perms: Tensor) -> dict[str, Tensor]:
        """The weighted DSL loss of both views (Eq. 3-8).

        Args:
            context: (2, B, 3, H, W), the two context views.
            targets: (2, B, n_blocks, 3, H, W); slot j of view v holds block perms[v, b, j].
            perms: (2, B, n_blocks) long, each row a permutation of range(n_blocks).

        Returns:
            "loss" (context + target + fusion, with grad), "context", "target", "fusion" (weighted
            stage sums; zero for groups the method does not use), "{group}_s{i}" (unweighted stage
            losses, detached) and the collapse monitor "z_std_{group}" (std over rows of the
            L2-normalised last-stage projections, mean over channels and views; about 1/sqrt(d)
            when healthy, 0 when collapsed) with "z_std" its mean over groups (detached).
        """
        n, b = self.n_blocks, context.shape[1]
        if context.shape[0] != 2 or targets.shape[:3] != (2, b, n) or perms.shape != (2, b, n):
            raise ValueError(
                f"expected context (2, B, 3, H, W), targets (2, B, {n}, 3, H, W) and perms "
                f"(2, B, {n}); got {tuple(context.shape)}, {tuple(targets.shape)}, "
                f"{tuple(perms.shape)}"
            )
        feats = self._features(context, targets, perms)
        zero = context.new_zeros((), dtype=torch.float32)
        out: dict[str, Tensor] = {g: zero for g in GROUPS}
        stds: list[Tensor] = []
        last = max(self.spec.stages)
        for group in self.spec.groups:
            total = zero
            for stage in self.spec.stages:
                key = f"{group}{stage}"
                z = self.projectors[key](feats[group][stage])  # both views: (R, 2, d)
                loss = paired_simsiam_loss(self.predictors[key](z), z)
                total = total + self.stage_weights[stage - 1] * loss
                out[f"{group}_s{stage}"] = loss.detach()
                if stage == last:
                    std = _normalised_std(z)
                    out[f"z_std_{group}"] = std
                    stds.append(std)
            out[group] = total
        out["loss"] = out["context"] + out["target"] + out["fusion"]
        out["z_std"] = torch.stack(stds).mean()
        return out

    def encoder_state(self) -> dict[str, Any]:
        """What fine-tuning needs (`encoders.pt`): backbone name, both encoders' weights, dims."""
        return {
            "backbone": self.backbone,
            "context": self.context_encoder.state_dict(),
            "target": self.target_encoder.state_dict(),
            "dims": self.dims,
        }


@torch.no_grad()
def _normalised_std(z: Tensor) -> Tensor:
    """SimSiam's collapse indicator: per-channel std over the rows of the L2-normalised
    vectors, averaged over channels and views ((R, d) or (R, V, d))."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()
