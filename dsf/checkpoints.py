"""Training state on disk: atomic saves and resume with a hyperparameter check (pretrain and
finetune share it, so both refuse a resume under changed settings the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsf.atomic import atomic_path
from dsf.errors import ConfigError


def save(obj: Any, path: Path) -> None:
    """torch.save under a temporary name, renamed when complete."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_for_resume(path: Path, hyper: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Load a checkpoint (weights_only) whose `hyper` must equal `hyper`; else a ConfigError
    naming every changed setting with its old and new value."""
    state = torch.load(path, map_location=device, weights_only=True)
    old = state["hyper"]
    changed = sorted(k for k in set(hyper) | set(old) if hyper.get(k) != old.get(k))
    if changed:
        raise ConfigError(
            f"{path} was trained with other settings ({', '.join(changed)}: "
            f"{[old.get(k) for k in changed]} then, {[hyper.get(k) for k in changed]} now); "
            "restore them, or delete the checkpoint to start over"
        )
    return state
