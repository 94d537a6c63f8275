"""Fine-tuning inits and pretraining methods: which start from pretrained encoders, and what
each reads.

Kept apart from `dsf.finetune` and `dsf.models.dsf` (which import torch) so that the workflow,
which reads these while Snakemake parses the Snakefile, imports no torch.
"""

from __future__ import annotations

#: Inits that start from no pretraining of dsf's: HookNet from scratch, the U-Net baseline,
#: HookNet from ImageNet weights (`finetune.weights`); every other init is a pretraining method
BASELINE_INITS = ("random", "unet", "imagenet")


def unread_settings(init: str) -> set[str]:
    """The fine-tuning settings init `init` does not read: the U-Net has no context branch
    (context_weight), and only init imagenet loads `weights`."""
    return ({"context_weight"} if init == "unet" else set()) | (
        {"weights"} if init != "imagenet" else set()
    )


#: Pretraining methods that mask fusion slots (`dsf.models.dsf.METHODS`' `mask`): the others
#: never read pretrain.mask_ratio
MASKING_METHODS = ("dsf", "ctfm_only", "mask_only")


def unread_pretrain_settings(method: str) -> set[str]:
    """The pretraining settings method `method` does not read: mask_ratio, unless it masks."""
    return set() if method in MASKING_METHODS else {"mask_ratio"}


def check_mask_ratio(methods: list[str], mask_ratio: float, scale: int) -> None:
    """Refuse a pretrain.mask_ratio that would mask every fusion slot of a masking method:
    the fusion keeps round(scale^2 * (1 - mask_ratio)) of the scale^2 target blocks (paper
    III-D), at least one (0.9 keeps 2 of 16 at scale 4, none of 4 at scale 2)."""
    from dsf.errors import ConfigError

    masking = [m for m in methods if m in MASKING_METHODS]
    blocks = scale * scale
    if masking and round(blocks * (1.0 - mask_ratio)) < 1:
        below = 1 - 0.5 / blocks  # keeps more than half a block: rounds to one at least
        raise ConfigError(
            f"pretrain.mask_ratio {mask_ratio:g} masks all {blocks} target block(s) of "
            f"patches.scale {scale} (methods {masking} fuse the blocks they keep): lower it "
            f"below {below:g}"
            + (", or raise patches.scale (the paper's is 4)" if scale == 1 else "")
        )
