"""Fine-tuning inits: which start from pretrained encoders, and what each reads.

Kept apart from `dsf.finetune` (which imports torch) so that the workflow, which reads these
while Snakemake parses the Snakefile, imports no torch.
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
