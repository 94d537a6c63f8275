"""Fine-tuning data: labelled tiles as HookNet inputs, label fractions, the selection split.

DESIGN section 5 (HookNet): the context input is the whole tile downsampled to one block (the
store's `context` array), the target input the centre block at full resolution with its labels.
Label fractions (1.0, 0.5, 0.1, 0.01) are sampled by tile with a fixed seed; model selection uses
held-out training slides (by group), never the validation fold.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from dsf.errors import ConfigError
from dsf.tiles import open_store


def label_subset(n_tiles: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a `fraction` of `n_tiles` tiles (at least one), fixed by `seed`."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"label fraction {fraction} must be in (0, 1]")
    k = max(1, round(n_tiles * fraction))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_tiles, size=min(k, n_tiles), replace=False))


def selection_split(
    folds: pd.DataFrame, fold: int, held_out: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training slides, selection slides) of fold `fold`: groups outside the validation fold,
    a seeded `held_out` share of them (at least one group) kept for model selection."""
    train = folds[folds["fold"] != fold]
    groups = sorted(set(train["group"]))
    if len(groups) < 2:
        raise ConfigError(
            f"fold {fold} has {len(groups)} training group(s): model selection needs at least "
            "2 (one held out); add slides or lower folds.k"
        )
    random.Random(seed * 1009 + fold).shuffle(groups)
    n_sel = min(len(groups) - 1, max(1, round(len(groups) * held_out)))
    sel = set(groups[:n_sel])
    fit = sorted(train.loc[~train["group"].isin(sel), "slide"])
    chosen = sorted(train.loc[train["group"].isin(sel), "slide"])
    return fit, chosen


class LabelledTiles(Dataset):
    """(context, target, labels) uint8 tensors of labelled tiles: context (b, b, 3) = the whole
    tile at the context mpp, target (b, b, 3) and labels (b, b) = the centre block."""

    def __init__(self, stores: list[Path], fraction: float = 1.0, seed: int = 0) -> None:
        self.stores = [Path(s) for s in stores]
        self.index: list[tuple[int, int]] = []
        for k, path in enumerate(self.stores):
            g = open_store(path)
            if "labels" not in g:
                raise ConfigError(f"patch store {path} has no labels: its slide is unannotated")
            self.block = int(g.attrs["block"])
            self.scale = int(g.attrs["scale"])
            self.index += [(k, i) for i in range(int(g.attrs["n_tiles"]))]
        if not self.index:
            raise ConfigError("no labelled tiles to fine-tune on")
        keep = label_subset(len(self.index), fraction, seed)
        self.index = [self.index[i] for i in keep]
        self._groups: list[Any] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_groups"], state["_pid"] = None, -1
        return state

    def _open(self) -> list[Any]:
        if self._groups is None or self._pid != os.getpid():
            self._groups = [open_store(s) for s in self.stores]
            self._pid = os.getpid()
        return self._groups

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        store, local = self.index[i]
        g = self._open()[store]
        b = self.block
        c0 = b * (self.scale - 1) // 2  # the centre b x b crop of the scale*b tile
        centre = slice(c0, c0 + b)
        context = np.asarray(g["context"][local])
        target = np.asarray(g["tiles"][local, centre, centre])
        labels = np.asarray(g["labels"][local, centre, centre])
        return torch.from_numpy(context), torch.from_numpy(target), torch.from_numpy(labels)
