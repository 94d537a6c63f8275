"""Input normalisation statistics: the per-channel mean and std of a dataset's tiles.

Pretraining, fine-tuning and inference normalise inputs as (x - mean) / std (DESIGN section 5).
BCSS and PAIP have published statistics (`config/presets/`); for other data the design says to
compute them. With `pretrain.mean`/`std` null (the default) they are computed here from a seeded
sample of `pretrain.norm_tiles` tiles of a pretraining run's training stores (a fold's never
include its validation slides), exactly (256-bin histograms per channel). `dsf norm` writes them
to the JSON the workflow caches as `results/norm/{unit}.json`, which that unit's pretraining and
its folds' fine-tuning both read, so the encoders and HookNet see the same statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from dsf import __version__
from dsf.atomic import atomic_path
from dsf.config import add_setting_argument
from dsf.errors import ConfigError
from dsf.folds import add_fold_arguments, check_fold_arguments
from dsf.runner import run, setup_logging

if TYPE_CHECKING:  # torch is not imported here: the workflow imports this module to parse
    import torch

log = logging.getLogger(__name__)

READ_CHUNK = 16  # tiles read and counted at a time (48 MB at 1024 px)


@dataclass(frozen=True)
class NormStats:
    """Normalisation statistics in [0, 1] units and where they come from."""

    mean: list[float]
    std: list[float]
    tiles: int  # tiles counted
    tiles_total: int  # tiles in the stores
    slides: list[str]
    seed: int


def tile_stats(tiles: np.ndarray | torch.Tensor | Iterable[Any]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) in [0, 1] units of uint8 RGB tiles (..., 3).

    Accepts one array or tensor, or an iterable of them (a store read in chunks); the statistics
    are exact, from 256-bin histograms, so chunking does not change them.
    """
    one = isinstance(tiles, np.ndarray) or hasattr(tiles, "cpu")  # an array or a tensor
    hist = np.zeros((3, 256), np.float64)
    for t in [tiles] if one else tiles:
        a = t.cpu().numpy() if hasattr(t, "cpu") else np.asarray(t)
        if a.dtype != np.uint8 or a.shape[-1] != 3:
            raise ValueError(f"tiles must be uint8 (..., 3), got {a.dtype} {tuple(a.shape)}")
        # tile by tile: bincount widens its input to int64, 8 bytes per pixel and channel
        for part in a.reshape(-1, a.shape[-3] * a.shape[-2], 3) if a.ndim > 3 else [a]:
            flat = part.reshape(-1, 3)
            for c in range(3):
                hist[c] += np.bincount(flat[:, c], minlength=256)
    total = hist.sum(1)
    if not (total > 0).all():
        raise ValueError("tile_stats: no pixels")
    levels = np.arange(256, dtype=np.float64) / 255
    mean = (hist * levels).sum(1) / total
    var = (hist * (levels - mean[:, None]) ** 2).sum(1) / total
    return mean.tolist(), np.sqrt(var).tolist()


def store_stats(
    stores: Sequence[str | Path], max_tiles: int, seed: int, progress: bool | None = True
) -> NormStats:
    """Statistics of `max_tiles` tiles drawn without replacement (seeded, uniformly over all
    tiles of `stores`), or of every tile when there are fewer. `progress`: a bar (None: only
    on a terminal)."""
    from dsf.tiles import TileDataset

    data = TileDataset(list(stores))
    n = len(data)
    if n == 0:
        raise ConfigError(
            f"patch stores {', '.join(map(str, stores))} hold no tile to compute the "
            "normalisation from: set pretrain.mean and pretrain.std, or lower "
            "patches.min_tissue"
        )
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(n, max_tiles), replace=False))
    chunks = [picked[i : i + READ_CHUNK].tolist() for i in range(0, len(picked), READ_CHUNK)]
    bar = tqdm(
        chunks,
        desc="normalisation",
        unit="chunk",
        disable=None if progress is None else not progress,
    )
    mean, std = tile_stats(data.read(c).numpy() for c in bar)
    if min(std) <= 0:
        raise ConfigError(
            f"the sampled tiles of {', '.join(map(str, stores))} have a constant channel "
            f"(std {std}): they cannot be normalised; check the slides and the tissue masks"
        )
    return NormStats(mean, std, len(picked), n, sorted(set(data.slides)), seed)


def write_stats(stats: NormStats, path: Path) -> None:
    """The statistics as JSON, under a temporary name until complete."""
    payload = asdict(stats) | {"dsf_version": __version__}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")


def read_stats(path: Path) -> tuple[list[float], list[float]]:
    """(mean, std) from a `dsf norm` JSON; a missing or malformed file names itself."""
    if not Path(path).is_file():
        raise ConfigError(
            f"normalisation file {path} not found: write it with `dsf norm --stores "
            f"STORE.zarr ... --out {path}` (the workflow's norm rule), or leave --norm out to "
            "use the mean and std given as settings"
        )
    try:
        data = json.loads(Path(path).read_text())
        mean, std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"normalisation file {path} cannot be read ({type(exc).__name__}: {exc}); delete "
            "it and rerun `dsf norm` (the workflow's norm rule)"
        ) from exc
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(
            f"normalisation file {path}: mean and std must be 3 numbers each, std above 0 "
            f"(got {mean}, {std}); delete it and rerun `dsf norm`"
        )
    return mean, std


def check_settings(pretrain: dict[str, Any]) -> bool:
    """Whether the normalisation is computed (`pretrain.mean` and `std` both null); one null and
    the other set is a ConfigError."""
    unset = [pretrain.get(k) is None for k in ("mean", "std")]
    if unset[0] != unset[1]:
        raise ConfigError(
            "pretrain.mean and pretrain.std: set both (three numbers each) or neither (null: "
            "computed from the training tiles)"
        )
    return unset[0]


def encoder_stats(state: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """(mean, std) the encoders of a loaded `encoders.pt` were pretrained with, or None when
    it does not record them."""
    st = state.get("settings") or {}
    if st.get("mean") is None or st.get("std") is None:
        return None
    return [float(v) for v in st["mean"]], [float(v) for v in st["std"]]


def given_stats(
    mean: Sequence[float] | None, std: Sequence[float] | None, norm_file: Path | None
) -> tuple[list[float], list[float]] | None:
    """The (mean, std) given to a run, as numbers or as a `dsf norm` file (logged), or None
    when neither is: the run then computes them (`computed_stats`)."""
    if not check_settings({"mean": mean, "std": std}):
        if norm_file is not None:
            raise ConfigError(
                f"normalisation given twice: as numbers (mean {list(mean or [])}, std "
                f"{list(std or [])}) and as the file {norm_file}: give one"
            )
        given = [float(v) for v in mean or []], [float(v) for v in std or []]
        log_stats(given, "as given")
        return given
    if norm_file is not None:
        got = read_stats(norm_file)
        log_stats(got, f"from {norm_file}")
        return got
    return None


def computed_stats(
    stores: Sequence[str | Path], max_tiles: int, seed: int, progress: bool | None = None
) -> tuple[list[float], list[float]]:
    """(mean, std) counted from `stores` by the run itself (one run by hand, without the
    workflow's norm file), logged. `progress`: a bar (None: only on a terminal)."""
    stats = store_stats(stores, max_tiles, seed, progress)
    log_stats((stats.mean, stats.std), f"from {stats.tiles} of {stats.tiles_total} tiles")
    return stats.mean, stats.std


def log_stats(norm: tuple[Sequence[float], Sequence[float]], source: str) -> None:
    """One log line saying what a run normalises with and where that comes from."""
    log.info("input normalisation %s: mean %s, std %s", source, _fmt(norm[0]), _fmt(norm[1]))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsf norm", description=__doc__)
    p.add_argument("--stores", nargs="+", required=True, type=Path, help="patch stores (.zarr)")
    add_fold_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="the JSON to write")
    add_setting_argument(p, "--norm-tiles", "pretrain.norm_tiles", "tiles sampled")
    add_setting_argument(p, "--seed", "pretrain.seed", "sampling seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf norm`: training stores -> normalisation JSON (mean, std, what they come from)."""
    parser = _parser()
    args = parser.parse_args(argv)
    check_fold_arguments(parser, args)
    setup_logging()

    def body() -> None:
        if args.norm_tiles < 1:
            raise ConfigError(f"--norm-tiles must be at least 1, got {args.norm_tiles}")
        stores = list(args.stores)
        if args.folds is not None and args.fold is not None:
            from dsf.folds import read_folds
            from dsf.pretrain import training_stores

            stores = training_stores(read_folds(args.folds), args.fold, stores)
        stats = store_stats(stores, args.norm_tiles, args.seed, progress=not args.no_progress)
        write_stats(stats, args.out)
        source = f"from {stats.tiles} of {stats.tiles_total} tiles of {len(stats.slides)} slides"
        log_stats((stats.mean, stats.std), f"{source} -> {args.out}")

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
