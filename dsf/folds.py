"""Cross-validation folds over slides, grouped by patient or site (DESIGN section 4, Folds).

Groups (the sheet's `group` column) never span folds, so no tile of a validation slide, nor of
another slide of its patient, is seen in that fold's pretraining or fine-tuning. The split is
seeded and balanced by slide count; a `fold` column in the sheet fixes a slide's fold.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import pandas as pd

from dsf.atomic import atomic_path
from dsf.config import add_section_arguments, section_from_args
from dsf.errors import ConfigError
from dsf.runner import run, setup_logging


def assign_folds(sheet: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """A (slide, group, fold) table: fixed folds kept, other groups spread over the k folds.

    Groups are shuffled with `seed`, then each goes to the fold with the fewest slides so far
    (largest groups first), which keeps folds balanced and the split reproducible.
    """
    df = sheet[["slide", "group", "fold"]].copy()
    df["group"] = [g if g else s for s, g in zip(df["slide"], df["group"], strict=True)]
    fixed: dict[str, int] = {}
    for group, rows in df.groupby("group", sort=True):
        folds = {int(f) for f in rows["fold"] if f is not None and not pd.isna(f)}
        if len(folds) > 1:
            raise ConfigError(
                f"slide sheet: group {group!r} has slides in folds {sorted(folds)}; "
                "a group (patient) must stay in one fold: fix the `fold` column"
            )
        if folds:
            (fold,) = folds
            if fold >= k:
                raise ConfigError(
                    f"slide sheet: group {group!r} has fold {fold}, but folds.k is {k} "
                    f"(folds 0..{k - 1})"
                )
            fixed[str(group)] = fold
    sizes = df.groupby("group").size()
    n_groups = len(sizes)
    if n_groups < k:
        raise ConfigError(
            f"folds.k is {k} but the sheet has only {n_groups} groups (patients); "
            "lower folds.k or add slides"
        )
    load = [0] * k
    for group, fold in fixed.items():
        load[fold] += int(sizes[group])
    free = [g for g in sizes.index if g not in fixed]
    random.Random(seed).shuffle(free)
    free.sort(key=lambda g: -int(sizes[g]))  # stable: equal sizes keep the seeded order
    assigned = dict(fixed)
    for group in free:
        fold = min(range(k), key=lambda f: (load[f], f))
        assigned[group] = fold
        load[fold] += int(sizes[group])
    df["fold"] = [assigned[g] for g in df["group"]]
    empty = [f for f in range(k) if f not in set(df["fold"])]
    if empty:
        raise ConfigError(
            f"folds {empty} have no slide (fixed folds in the sheet leave them empty); "
            "lower folds.k or change the `fold` column"
        )
    return df.reset_index(drop=True)


def write_folds(table: pd.DataFrame, out: Path) -> None:
    """Write folds.tsv atomically."""
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read folds.tsv (slide, group, fold); an unreadable table is a ConfigError naming it."""
    try:
        folds = pd.read_csv(path, sep="\t", dtype={"slide": str, "group": str, "fold": int})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConfigError(f"cannot read folds table {path}: {exc}; rerun the folds rule") from exc
    missing = {"slide", "group", "fold"} - set(folds.columns)
    if missing:
        raise ConfigError(
            f"folds table {path} lacks columns {sorted(missing)}; rerun the folds rule"
        )
    return folds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsf folds", description=__doc__)
    p.add_argument(
        "--sheet-json", required=True, help="the slide sheet as JSON records (slide, group, fold)"
    )
    p.add_argument("--out", required=True, type=Path, help="folds.tsv to write")
    add_section_arguments(p, "folds")
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf folds`: the sheet -> folds.tsv."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        settings = section_from_args(args, "folds")
        sheet = pd.DataFrame(json.loads(args.sheet_json))
        table = assign_folds(sheet, settings["k"], settings["seed"])
        write_folds(table, args.out)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
