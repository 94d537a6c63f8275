"""Cross-validation folds over slides, grouped by patient or site (DESIGN section 4, Folds).

Groups (the sheet's `group` column) never span folds, so no tile of a validation slide, nor of
another slide of its patient, is seen in that fold's pretraining or fine-tuning. The split is
seeded and stratified: annotated slides are spread evenly over the folds first (a
self-supervised project has many unlabelled slides and few annotated ones, and a fold without
an annotated validation slide has nothing to evaluate), then the unlabelled ones balance the
slide count. A `fold` column in the sheet fixes a slide's fold.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from dsf.atomic import atomic_path
from dsf.config import add_section_arguments, section_from_args
from dsf.errors import ConfigError, some
from dsf.runner import run, setup_logging
from dsf.scan import patient_group

log = logging.getLogger(__name__)


def _labelled(sheet: pd.DataFrame) -> list[bool]:
    """Per row, whether the slide has an annotation (a `labels` path or per-class `masks`, or
    `labelled` true)."""
    if "labelled" in sheet:
        return [bool(v) for v in sheet["labelled"]]
    out = [False] * len(sheet)
    if "labels" in sheet:
        out = [isinstance(v, str) and v != "" for v in sheet["labels"]]
    if "masks" in sheet:
        out = [o or bool(m) for o, m in zip(out, sheet["masks"], strict=True)]
    return out


def _group_key(slide: Any, group: Any) -> str:
    """A group as one string: missing (None, NaN, "") is the patient of a slide named by its
    TCGA barcode, as a slide sheet's rows are grouped (`dsf.sheet`), else the slide's own group;
    a number (JSON records, where pandas may widen 1 to 1.0) is the group of its text ("1")."""
    if _missing(group):
        return patient_group(str(slide)) or str(slide)
    if isinstance(group, float) and group.is_integer():
        return str(int(group))
    return str(group)


def assign_folds(sheet: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """A (slide, group, fold) table: fixed folds kept, other groups spread over the k folds.

    Groups are shuffled with `seed`; groups with annotated slides go first, most annotated
    first, each to the fold with the fewest annotated slides so far; then the others, largest
    first, each to the fold with the fewest slides. So annotated slides are spread evenly, the
    folds stay balanced in size, and the split is reproducible.
    """
    df = sheet[["slide", "group", "fold"]].copy()
    # one string key per group: a missing group (None, NaN, "") is the slide's own, and a
    # number (JSON records, a sheet read by hand) is the same group as its text
    df["group"] = [_group_key(s, g) for s, g in zip(df["slide"], df["group"], strict=True)]
    labelled = pd.Series(_labelled(sheet), index=df.index)
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
            fixed[group] = fold
    sizes = df.groupby("group").size()
    annotated = labelled.groupby(df["group"]).sum()
    if too_few := too_few_groups(sheet, k):
        raise ConfigError(too_few)
    load, load_lab = [0] * k, [0] * k
    for group, fold in fixed.items():
        load[fold] += int(sizes[group])
        load_lab[fold] += int(annotated[group])
    free = [g for g in sizes.index if g not in fixed]
    random.Random(seed).shuffle(free)
    # stable: equal keys keep the seeded order
    free.sort(key=lambda g: (-int(annotated[g]), -int(sizes[g])))
    assigned = dict(fixed)
    for group in free:
        if annotated[group]:
            fold = min(range(k), key=lambda f: (load_lab[f], load[f], f))
        else:
            fold = min(range(k), key=lambda f: (load[f], f))
        assigned[group] = fold
        load[fold] += int(sizes[group])
        load_lab[fold] += int(annotated[group])
    df["fold"] = [assigned[g] for g in df["group"]]
    empty = [f for f in range(k) if f not in set(df["fold"])]
    if empty:
        raise ConfigError(
            f"folds {empty} have no slide (fixed folds in the sheet leave them empty); "
            "lower folds.k or change the `fold` column"
        )
    bare = [f for f in range(k) if load_lab[f] == 0]
    if labelled.any() and bare:
        log.warning(
            "folds %s have no annotated validation slide (%d annotated patients or groups "
            "for folds.k %d): their evaluation will be empty; annotate more slides or lower "
            "folds.k",
            bare,
            int((annotated > 0).sum()),
            k,
        )
    return df.reset_index(drop=True)


def _missing(group: Any) -> bool:
    return group is None or (not isinstance(group, str) and pd.isna(group)) or str(group) == ""


def group_clash_note(slides: list[str], where: str) -> str | None:
    """A warning for `slides`, which have no group in sheet `where` and whose ids are other
    slides' group: a slide without a group is its own group, named by its id, so each joins
    that patient's group and fold. None when there is none."""
    if not slides:
        return None
    return (
        f"slide sheet {where}: slides {some(slides)} have no group, so each is a group of its "
        "own, named by its id, which other slides have as their group: they share that "
        "patient's fold. If they are not that patient's, give them a group of their own in the "
        "sheet's `group` column"
    )


def too_few_groups(sheet: pd.DataFrame, k: int) -> str | None:
    """Why the sheet's slides cannot be split into k folds (fewer groups, patients, than
    folds), or None."""
    groups = {_group_key(s, g) for s, g in zip(sheet["slide"], sheet["group"], strict=True)}
    if len(groups) >= k:
        return None
    least = 2 if k > 2 else k
    return (
        f"folds.k is {k} but the sheet has only {len(groups)} group(s) (patients): every fold "
        f"holds patients of its own, so add slides of more patients (at least {k}; fine-tuning "
        f"needs annotated slides of {groups_needed(k)}){' or lower folds.k' if k > least else ''}"
    )


def finetune_gaps(folds: pd.DataFrame, labelled: set[str], need: int = 2) -> list[int]:
    """Folds whose fine-tuning cannot run: fewer than `need` annotated groups outside the fold
    (2: one trains, one is held out to choose the epoch, `dsf.finetune_data.selection_split`;
    1 with finetune.held_out 0)."""
    outside = [
        folds.loc[(folds["fold"] != k) & folds["slide"].isin(labelled), "group"].nunique()
        for k in sorted(set(folds["fold"]))
    ]
    return [k for k, n in zip(sorted(set(folds["fold"])), outside, strict=True) if n < need]


def groups_needed(k: int, need: int = 2) -> int:
    """Annotated groups that k folds spread evenly need so that every fold leaves `need`
    outside it (n - ceil(n / k) >= need): with 2, 4 for 2 folds and 3 for 3 or more."""
    n = need
    while n - -(-n // k) < need:
        n += 1
    return n


def gap_advice(k: int, need: int = 2) -> str:
    """What to do about `finetune_gaps` (fewer folds never helps: 2 folds need 4 groups)."""
    patients = "patient" if need == 1 else "patients"
    return (
        f"annotate slides of at least {groups_needed(k, need)} patients in all (folds.k {k}), "
        f"or assign folds in the sheet's `fold` column so that each leaves {need} annotated "
        f"{patients} out"
    )


def split_key(folds: pd.DataFrame) -> str:
    """The split as one string the workflow compares with the last run's (the folds rule's
    param): slide, group and fold of every slide, sorted by slide, so reordering the sheet's
    rows (the split does not depend on their order) does not rerun the folds and so every
    fold's jobs."""
    rows = folds[["slide", "group", "fold"]].sort_values("slide", kind="stable")
    return rows.to_json(orient="records")


def moved_note(
    earlier_path: Path,
    now: pd.DataFrame,
    labelled: set[str],
    slides: str | Path,
    k: int | None = None,
    synthetic: bool = True,
) -> str | None:
    """A warning when the run's split moves slides that the earlier `folds.tsv` at
    `earlier_path` placed (the folds are balanced over all slides, so adding slides moves
    others; so do folds.k and folds.seed): every fold whose slides change is trained again,
    and its scores are no longer comparable with the earlier ones. Names the moved slides
    (annotated first), the earlier slides gone from the run, and how to keep the earlier
    folds: under another folds.k (`k`) they cannot be kept, and the synthetic slides' way
    is told only with `synthetic` slides. None when nothing moves or there is no earlier
    table."""
    if not Path(earlier_path).is_file():
        return None
    try:
        earlier = read_folds(earlier_path)
    except ConfigError as exc:  # the folds job rewrites it; the comparison is only advice
        log.debug("earlier folds not compared: %s", exc)
        return None
    before = dict(zip(earlier["slide"].astype(str), earlier["fold"].astype(int), strict=True))
    moved = [
        (slide, before[slide], int(fold))
        for slide, fold in zip(now["slide"].astype(str), now["fold"], strict=True)
        if slide in before and before[slide] != int(fold)
    ]
    if not moved:
        return None
    moved.sort(key=lambda m: (m[0] not in labelled, m[0]))
    n_lab = sum(m[0] in labelled for m in moved)
    shown = some([f"{s} fold {a} -> {b}" for s, a, b in moved])
    gone = sorted(set(before) - set(now["slide"].astype(str)))
    left = (
        f" Slides of the earlier folds no longer in the run: {some(gone)} (their maps and "
        "logs stay in the results folder; the tables leave them out)."
        if gone
        else ""
    )
    head = (
        f"this run's folds move {len(moved)} slide(s) that {earlier_path} placed ({n_lab} "
        f"annotated): {shown}."
    )
    earlier_k = int(earlier["fold"].max()) + 1 if len(earlier) else 0
    if k is not None and earlier_k and k != earlier_k:
        return (
            f"{head} folds.k is {k}, the earlier folds were {earlier_k}: every "
            "slide is split again, every fold is pretrained, fine-tuned and scored again, and "
            "the scores are not comparable with the earlier ones. The earlier folds cannot be "
            f"kept under another folds.k: set it back to {earlier_k} to keep them (slides "
            "added since then still move them: the next run's warning says how to keep them "
            f"too).{left}"
        )
    if Path(slides).is_dir():
        keep = (
            f"write a sheet with them, `dsf sheet {slides} --folds {earlier_path} --out "
            "slides.tsv`, and run on it (`--config slides=slides.tsv`)"
        )
    else:
        keep = f"copy the `fold` column of {earlier_path} into the sheet's `fold` column"
    synth = " (a synthetic slide's: `fold:` in its synth.slides entry)" if synthetic else ""
    return (
        f"{head} The folds are balanced over all slides, so added or "
        "removed slides or annotations move others (as folds.seed does): every fold "
        "whose slides change is pretrained, fine-tuned and scored again, and its scores are "
        f"not comparable with the earlier ones. To keep the earlier folds, stop now and {keep}"
        f"{synth}; new slides are then placed around them.{left}"
    )


def write_folds(table: pd.DataFrame, out: Path) -> None:
    """Write folds.tsv atomically."""
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read folds.tsv (slide, group, fold); an unreadable table is a ConfigError naming it."""
    try:
        # no NA strings: `NA`, `null` and `nan` are valid slide ids
        folds = pd.read_csv(
            path,
            sep="\t",
            dtype={"slide": str, "group": str, "fold": int},
            keep_default_na=False,
            na_values=[],
        )
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConfigError(f"cannot read folds table {path}: {exc}; rerun the folds rule") from exc
    missing = {"slide", "group", "fold"} - set(folds.columns)
    if missing:
        raise ConfigError(
            f"folds table {path} lacks columns {sorted(missing)}; rerun the folds rule"
        )
    twice = sorted(set(folds.loc[folds["slide"].duplicated(), "slide"]))
    if twice:
        raise ConfigError(f"folds table {path} lists slides {twice} twice; rerun the folds rule")
    if (folds["fold"] < 0).any():
        bad = list(folds.loc[folds["fold"] < 0, "slide"])
        raise ConfigError(
            f"folds table {path} gives slides {bad} a negative fold; rerun the folds rule"
        )
    # a patient in two folds validates on slides whose patient the fold trains on
    spread = folds.groupby("group")["fold"].nunique()
    if (spread > 1).any():
        group = str(spread[spread > 1].index[0])
        rows = folds[folds["group"] == group]
        raise ConfigError(
            f"folds table {path} puts group {group!r} (one patient or site) in folds "
            f"{sorted(set(rows['fold']))} (slides {list(rows['slide'])}): a fold's validation "
            "slides would share a patient with its training slides; give the group's slides "
            "one fold, or rerun the folds rule"
        )
    return folds


def add_fold_arguments(parser: argparse.ArgumentParser) -> None:
    """`--folds folds.tsv --fold K` of a stage that trains or samples on a fold's training
    slides (`check_fold_arguments` requires them together)."""
    parser.add_argument("--folds", type=Path, help="folds.tsv; with --fold, checks the stores")
    parser.add_argument("--fold", type=int, help="the fold whose validation slides are excluded")


def check_fold_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop when only one of --fold and --folds is given: --fold alone would be recorded (in
    encoders.pt, which fine-tuning trusts) without its validation slides being left out."""
    if (args.fold is None) != (args.folds is None):
        parser.error(
            "--fold and --folds go together: --folds names folds.tsv, which says which stores "
            "are fold K's validation slides (left out); give both, or neither for all stores"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsf folds", description=__doc__)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--sheet-json",
        help="the slide sheet as inline JSON records (not a file), e.g. "
        '\'[{"slide": "a", "group": "p1", "fold": null, "labelled": true}]\'',
    )
    given.add_argument(
        "--sheet-file",
        type=Path,
        help="a file of those records (the workflow's folds rule writes one), or a slide "
        "sheet (.tsv, as `dsf sheet` writes)",
    )
    p.add_argument("--out", required=True, type=Path, help="folds.tsv to write")
    add_section_arguments(p, "folds")
    return p


def _records(text: str, option: str) -> pd.DataFrame:
    """The sheet of JSON records `text` (given by `option`), each with a slide id, checked."""
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"{option} is not JSON records ({exc}): give a list of records such as "
            '[{"slide": "a", "group": "p1", "fold": null, "labelled": true}]'
        ) from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{option}: give a JSON list of records (one object per slide)")
    if not records:
        raise ConfigError(f"{option} lists no slide")
    sheet = pd.DataFrame(records)
    if "slide" not in sheet or sheet["slide"].isna().any():
        raise ConfigError(f"{option}: every record needs a `slide` id")
    for column in ("group", "fold"):  # optional: the slide's own group, no fixed fold
        if column not in sheet:
            sheet[column] = None
    return sheet


def read_sheet_records(args: argparse.Namespace) -> pd.DataFrame:
    """The sheet `dsf folds` splits: --sheet-json, or --sheet-file with JSON records or a
    slide sheet (.tsv) as `dsf sheet` writes (its `labels` and mask columns say which slides
    are annotated)."""
    if args.sheet_file is None:
        return _records(args.sheet_json, "--sheet-json")
    path = args.sheet_file
    if not path.is_file():
        raise ConfigError(
            f"--sheet-file {path} not found: give the JSON records the folds rule writes, or "
            "a slide sheet (.tsv) as `dsf sheet` writes"
        )
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip()[:1] in ("[", "{"):
        return _records(text, f"--sheet-file {path}")
    from dsf.sheet import read_sheet

    return read_sheet(path).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    """`dsf folds`: the sheet -> folds.tsv."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        settings = section_from_args(args, "folds")
        sheet = read_sheet_records(args)
        table = assign_folds(sheet, settings["k"], settings["seed"])
        write_folds(table, args.out)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
