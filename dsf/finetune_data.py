"""Fine-tuning data: labelled tiles as HookNet inputs, label fractions, the selection split.

DESIGN section 5 (HookNet): the context input is the whole tile downsampled to one block (the
store's `context` array), the target input the centre block at full resolution with its labels.
Each item also carries the context labels: the tile's labels on the context grid, sampled at the
centre of every context pixel (`labels[s//2::s, s//2::s]`), for the optional context loss
(`finetune.context_weight`). Label fractions (1.0, 0.5, 0.1, 0.01) are sampled by tile with a
fixed seed; model selection uses held-out training slides (by group), never the validation fold.

`target_block: random` (the U-Net baseline only) takes a b x b window at a random offset of the
tile, any pixel offset, drawn from (seed, epoch, item) so every epoch differs and a resumed run
reads exactly what an uninterrupted one would. It is not offered to HookNet: the hook crops the
*centre* of the context decoder's map, so the target must be the centre of the context, and the
only context in the store is the whole tile. A concentric context for an off-centre block would
reach past the tile (padding it loses context and trains on inputs inference never shows, since
inference reads concentric windows from the slide); moving the hook window instead would train a
model that is used differently at inference. `FineTuner` refuses the combination.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from dsf.errors import ConfigError
from dsf.stores import SameGeometry, StoreArray, open_store, store_array
from dsf.tile_labels import LabelledStore


def label_subset(n_tiles: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a `fraction` of `n_tiles` tiles (at least one), fixed by `seed`.

    The first k of one seeded permutation, so with one seed the fractions are nested (the 1%
    tiles are among the 10%, those among the 50%): a smaller fraction only removes labels, and
    the fraction tables compare more labels with fewer, not other labels (paper IV-D2)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"label fraction {fraction} must be in (0, 1]")
    k = min(n_tiles, max(1, round(n_tiles * fraction)))
    order = np.random.default_rng(seed).permutation(n_tiles)
    return np.sort(order[:k])


def selection_split(
    folds: pd.DataFrame, fold: int, held_out: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training slides, selection slides) of fold `fold`: groups outside the validation fold,
    a seeded `held_out` share of them (at least one group) kept for model selection; with
    `held_out` 0 every training slide fits and none selects (the paper's fit on the whole
    training set, the last epoch kept)."""
    train = folds[folds["fold"] != fold]
    groups = sorted(set(train["group"]))
    if held_out == 0:
        if not groups:
            raise ConfigError(f"fold {fold} has no training group to fine-tune on")
        return sorted(train["slide"]), []
    if len(groups) < 2:
        raise ConfigError(
            f"fold {fold} has {len(groups)} training group(s): model selection needs at least "
            "2 (one held out): annotate slides of more patients (fewer folds leave fewer out)"
        )
    random.Random(seed * 1009 + fold).shuffle(groups)
    n_sel = min(len(groups) - 1, max(1, round(len(groups) * held_out)))
    sel = set(groups[:n_sel])
    fit = sorted(train.loc[~train["group"].isin(sel), "slide"])
    chosen = sorted(train.loc[train["group"].isin(sel), "slide"])
    return fit, chosen


TARGET_BLOCKS = ("centre", "random")


def _labelled_targets(lab: Any, pair: LabelledStore, n: int) -> np.ndarray | range:
    """Indices (of a labels store's `n` tiles) whose centre block holds a labelled pixel, by
    the store's `target_frac`; every tile for a store of an older dsf, which lacks it."""
    if "target_frac" not in lab:
        logging.getLogger(__name__).warning(
            "labels store %s was written by an older dsf (no target_frac): tiles whose centre "
            "block holds no label are not left out; delete it to rebuild it",
            pair.labels,
        )
        return range(n)
    frac = store_array(lab, "target_frac", pair.labels)[:]
    return np.flatnonzero(frac > 0)


class LabelledTiles(Dataset):
    """(context, target, labels, context labels) uint8 tensors of labelled tiles: context
    (b, b, 3) = the whole tile at the context mpp, context labels (b, b) = the tile's labels on
    that grid, target (b, b, 3) and labels (b, b) = the centre block, or with `target_block`
    "random" a b x b window at an offset drawn from (`seed`, epoch, item) (see `set_epoch`).

    The tiles are those of each patch store its labels store keeps (`dsf.tile_labels`); with
    `labelled_target` (and the centre block) only those whose centre block holds a label, the
    others give a loss of nothing (class 0 is ignored) and only dilute a label fraction."""

    def __init__(
        self,
        stores: list[LabelledStore],
        fraction: float = 1.0,
        seed: int = 0,
        target_block: str = "centre",
        labelled_target: bool = False,
        geometry: SameGeometry | None = None,
    ) -> None:
        """`geometry`: the check of the stores' geometry, shared with another set of the same
        run (fine-tuning's fit and selection stores), else this set's own."""
        if target_block not in TARGET_BLOCKS:
            raise ConfigError(
                f"finetune.target_block {target_block!r}: choose one of {list(TARGET_BLOCKS)}"
            )
        self.stores = list(stores)
        self.seed, self.target_block, self.epoch = seed, target_block, 0
        self.index: list[tuple[int, int]] = []
        n_all = 0  # labelled tiles before `labelled_target` drops any
        #: per store, the patch-store tile number of each labelled tile
        self.tile_of: list[np.ndarray] = []
        geometry = geometry or SameGeometry()
        for k, pair in enumerate(self.stores):
            g = open_store(pair.tiles)
            self.scale, self.block, _ = geometry.add(pair.tiles, dict(g.attrs))
            lab = open_store(pair.labels, kind="labels")
            self.tile_of.append(store_array(lab, "index", pair.labels)[:])
            n = int(lab.attrs["n_tiles"])
            if labelled_target and target_block == "centre":
                n_all += n
                kept = _labelled_targets(lab, pair, n)
            else:
                kept = range(n)
            self.index += [(k, int(i)) for i in kept]
        if not self.index:
            raise ConfigError(
                f"none of the {n_all} labelled tiles of {[p.slide for p in self.stores]} has a "
                "label in its target (centre) block, which fine-tuning trains on: annotate "
                "more of these slides, or raise patches.min_label_frac"
                if n_all
                else "no labelled tiles to fine-tune on"
            )
        if labelled_target and n_all > len(self.index):
            logging.getLogger(__name__).info(
                "%d of %d labelled tiles have no label in their target (centre) block: left out",
                n_all - len(self.index),
                n_all,
            )
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

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the random target offsets; set before the loader's iterator is made (the
        workers get a copy of the dataset per epoch)."""
        self.epoch = int(epoch)

    def offset(self, i: int) -> tuple[int, int]:
        """(row, col) of item `i`'s target block in its tile: the centre, or with
        `target_block` "random" uniform over [0, scale*b - b] per axis, from (seed, epoch, i)."""
        b, tile = self.block, self.block * self.scale
        if self.target_block == "centre":
            c0 = b * (self.scale - 1) // 2
            return c0, c0
        rng = np.random.default_rng([self.seed, self.epoch, i])
        y, x = rng.integers(0, tile - b + 1, size=2)
        return int(y), int(x)

    def _open(self) -> list[dict[str, StoreArray]]:
        """Per store its context, tiles and labels arrays, opened once per process (reads
        that fail name the store, the tile and the fix)."""
        if self._groups is None or self._pid != os.getpid():
            self._groups = []
            for pair in self.stores:
                g, lab = open_store(pair.tiles), open_store(pair.labels, kind="labels")
                arrays = {a: store_array(g, a, pair.tiles) for a in ("context", "tiles")}
                arrays["labels"] = store_array(lab, "labels", pair.labels)
                self._groups.append(arrays)
            self._pid = os.getpid()
        return self._groups

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        store, local = self.index[i]
        g = self._open()[store]
        b, s = self.block, self.scale
        y, x = self.offset(i)
        tile = int(self.tile_of[store][local])
        context = g["context"][tile]
        target = g["tiles"][tile, y : y + b, x : x + b]
        # one chunk per tile: reading the whole label tile costs no more than its centre
        tile_labels = g["labels"][local]
        labels = np.ascontiguousarray(tile_labels[y : y + b, x : x + b])
        context_labels = np.ascontiguousarray(tile_labels[s // 2 :: s, s // 2 :: s])
        return (
            torch.from_numpy(context),
            torch.from_numpy(target),
            torch.from_numpy(labels),
            torch.from_numpy(context_labels),
        )
