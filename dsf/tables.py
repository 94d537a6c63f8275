"""The evaluation tables: per fold, then mean (sample std) over folds (paper Tables II-IV).

Tile protocol (the paper's): per method (init) and label fraction, per fold the micro F1 of each
validation slide averaged over the fold's slides (the paper's F1, Table II) and likewise its
accuracy (mean one-vs-rest accuracy, Table III); per-class F1, macro F1 and pixel accuracy from
the fold's pooled confusion; then mean and std (ddof 1) over folds, one table per label fraction
and a summary over fractions (Table IV).

Whole-slide protocol: per-class F1 (= Dice), pixel accuracy and macro F1 per slide
and per fold (pooled confusion), then mean (std) over folds.

Nothing is ever shown as 0 for want of data: a fold or method without results is `n/a` with a
footnote saying why; std over fewer than two folds is `n/a` (`dsf.markdown`). A prediction run's
tables, over slides and over a set's models, are `dsf.cohort_tables`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsf.errors import ConfigError
from dsf.evaluate import (
    classes_of,
    confusion_columns,
    confusion_of,
    with_provenance,
    write_tsv,
)
from dsf.markdown import (
    Notes,
    cell,
    classes_text,
    finite,
    mean_std_cell,
    pct,
    rows_table,
    table,
    write_markdown,
)
from dsf.metrics import scores

log = logging.getLogger(__name__)

FOLD_METRICS = ["f1", "paper_accuracy", "pixel_accuracy", "macro_f1"]


# -- numbers ----------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof 1, count) of the finite values; NaN where undefined (no
    value: both; one value: the std)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return float(v.mean()), std, int(v.size)


#: Columns of a score table that are names, never numbers or NaN (a slide may be called `NA`).
TEXT_COLUMNS = ("slide", "init", "model", "models", "routing")


def _read_scores(path: Path) -> pd.DataFrame:
    """A score TSV of `write_tsv`: `nan` (and empty) is NaN in the number columns only, so
    slides named `NA`, `nan` or `null` keep their names (as folds.tsv keeps them)."""
    header = pd.read_csv(path, sep="\t", nrows=0).columns
    return pd.read_csv(
        path,
        sep="\t",
        keep_default_na=False,
        na_values={c: ["nan", "NaN", ""] for c in header if c not in TEXT_COLUMNS},
        dtype={c: str for c in TEXT_COLUMNS if c in header},
    )


def read_results(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate per-slide TSVs (header-only ones included) and their common classes."""
    frames, classes = [], None
    for p in paths:
        fix = "delete it and rerun the evaluate stage (Snakemake rebuilds it)"
        try:
            df = _read_scores(p)
        except FileNotFoundError as exc:
            raise ConfigError(f"score table {p} not found; run the evaluate stage first") from exc
        except (
            OSError,
            UnicodeDecodeError,
            pd.errors.ParserError,
            pd.errors.EmptyDataError,
        ) as exc:
            raise ConfigError(f"score table {p} is not a readable TSV ({exc}); {fix}") from exc
        cls = classes_of(list(df.columns))
        missing = [c for c in confusion_columns(cls) if c not in df.columns]
        if len(cls) < 2 or missing:
            raise ConfigError(
                f"score table {p} has no per-class scores and confusion counts "
                f"({missing[:3] if missing else 'no f1_<class> columns'} missing): it was not "
                f"written by `dsf evaluate`, or by another dsf version; {fix}"
            )
        if classes is not None and cls != classes:
            raise ConfigError(
                f"{p} scores classes {cls[1:]}, other results {classes[1:]}: they come from "
                "runs with different labels.classes; rerun evaluate"
            )
        classes = cls
        # dsf before 2026-12-07 named the per-slide pixel accuracy `accuracy`, which read as
        # the paper's accuracy (`paper_accuracy`)
        if "accuracy" in df.columns and "pixel_accuracy" not in df.columns:
            df = df.rename(columns={"accuracy": "pixel_accuracy"})
        if len(df):
            frames.append(df)
    if not frames:
        return pd.DataFrame(), classes or []
    return pd.concat(frames, ignore_index=True), classes or []


def _frac_eq(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def pooled_scores(sub: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Scores of the summed confusion of some slides."""
    k = len(classes) - 1
    cm = np.zeros((k, k + 1), np.int64)
    for _, row in sub.iterrows():
        cm += confusion_of(row, classes)
    s = scores(cm)
    out: dict[str, Any] = {
        "n_pixels": int(cm.sum()),
        "pixel_accuracy": s["accuracy"],
        "micro_f1": s["micro_f1"],
        "macro_f1": s["macro_f1"],
    }
    out |= {f"f1_{c}": float(f) for c, f in zip(classes[1:], s["f1"], strict=True)}  # type: ignore[arg-type]
    return out


def slide_averages(sub: pd.DataFrame) -> dict[str, float]:
    """The paper's F1 and ACC of some slides' rows: each slide's micro F1 and one-vs-rest
    accuracy averaged over the slides with labelled pixels (Tables II-III)."""
    evaluated = sub[sub["n_pixels"] > 0]
    return {
        "f1": mean_std(list(evaluated["micro_f1"]))[0],
        "paper_accuracy": mean_std(list(evaluated["paper_accuracy"]))[0],
    }


def summary_rows(
    folds: list[dict[str, Any]], key: dict[str, Any], metrics: list[str]
) -> list[dict[str, Any]]:
    """The `mean` and `std` rows over fold rows (each metric over the folds that have it)."""
    mean = key | {"fold": "mean"}
    std = key | {"fold": "std"}
    for m in metrics:
        mu, sd, n = mean_std([r.get(m, float("nan")) for r in folds])
        mean[m], std[m] = mu, sd
    mean["n_folds"] = std["n_folds"] = sum(1 for r in folds if r.get("n_pixels", 0) > 0)
    for count in ("n_slides", "n_tiles", "n_pixels"):  # the mean row states the totals
        if count in folds[0]:
            mean[count] = sum(int(r[count]) for r in folds)
    return [mean, std]


def tile_fold_scores(
    df: pd.DataFrame,
    classes: list[str],
    methods: list[str],
    fractions: list[float],
    fold_ids: list[int],
) -> pd.DataFrame:
    """Per method x fraction x fold (then `mean`, `std`): n_slides, n_tiles, n_pixels, f1 (the
    paper's: slides' micro F1 averaged), paper_accuracy (likewise), pixel_accuracy and macro_f1
    and per-class F1 of the fold's pooled confusion."""
    metrics = [*FOLD_METRICS, *(f"f1_{c}" for c in classes[1:])]
    out: list[dict[str, Any]] = []
    for method in methods:
        for frac in fractions:
            key = {"init": method, "fraction": float(frac)}
            rows = []
            for fold in fold_ids:
                sub = (
                    df[
                        (df["init"] == method)
                        & df["fraction"].map(lambda f, fr=frac: _frac_eq(f, fr))
                        & (df["fold"].astype(int) == fold)
                    ]
                    if len(df)
                    else df
                )
                row: dict[str, Any] = key | {"fold": str(fold), "n_slides": len(sub)}
                row["n_folds"] = int(len(sub) > 0)
                row["n_tiles"] = int(sub["n_tiles"].sum()) if len(sub) else 0
                if len(sub):
                    row |= pooled_scores(sub, classes) | slide_averages(sub)
                else:
                    row |= {"n_pixels": 0} | {m: float("nan") for m in metrics}
                rows.append(row)
            out += rows + summary_rows(rows, key, metrics)
    columns = ["init", "fraction", "fold", "n_folds", "n_slides", "n_tiles", "n_pixels"]
    return pd.DataFrame(out, columns=[*columns, *metrics])


def slide_fold_scores(
    df: pd.DataFrame, classes: list[str], methods: list[str], fold_ids: list[int]
) -> pd.DataFrame:
    """Whole-slide protocol, rows with `level` slide (each map), fold (pooled confusion of the
    fold's slides, with f1 and paper_accuracy the slides' averaged as the tile protocol's),
    mean and std (over folds) per method x fraction."""
    metrics = [*FOLD_METRICS, "micro_f1", *(f"f1_{c}" for c in classes[1:])]
    out: list[dict[str, Any]] = []
    for method in methods:
        mine = df[df["init"] == method] if len(df) else df
        fracs = (
            sorted({float(f) for f in mine["fraction"]}, reverse=True)
            if len(mine)
            else [float("nan")]
        )
        for frac in fracs:
            key = {"init": method, "fraction": frac}
            sub_m = mine[mine["fraction"] == frac] if len(mine) else mine
            for _, r in sub_m.iterrows():
                row = key | {"level": "slide", "fold": str(int(r["fold"])), "slide": r["slide"]}
                row |= {"n_slides": 1, "n_pixels": int(r["n_pixels"]), "f1": r["micro_f1"]}
                row |= {m: r[m] for m in metrics if m != "f1"}
                out.append(row)
            folds = []
            for fold in fold_ids:
                sub = sub_m[sub_m["fold"].astype(int) == fold] if len(sub_m) else sub_m
                row = key | {"level": "fold", "fold": str(fold), "slide": "", "n_slides": len(sub)}
                row["n_folds"] = int(len(sub) > 0)
                if len(sub):
                    row |= pooled_scores(sub, classes) | slide_averages(sub)
                else:
                    row |= {"n_pixels": 0} | {m: float("nan") for m in metrics}
                folds.append(row)
            out += folds
            for r in summary_rows(folds, key, metrics):
                out.append(r | {"level": r["fold"], "slide": ""})
    columns = ["init", "fraction", "level", "fold", "slide", "n_folds", "n_slides", "n_pixels"]
    return pd.DataFrame(out, columns=[*columns, *metrics])


# -- the paper's tables -----------------------------------------------------------------------


def _pick(scores_df: pd.DataFrame, method: str, frac: float, fold: str) -> pd.Series | None:
    m = scores_df[
        (scores_df["init"] == method)
        & scores_df["fraction"].map(lambda f: _frac_eq(f, frac))
        & (scores_df["fold"] == fold)
    ]
    return None if m.empty else m.iloc[0]


def _summary_cell(
    ts: pd.DataFrame, method: str, frac: float, metric: str, notes: Notes, why: str
) -> str:
    """The 'mean (std)' cell of one method, fraction and metric over folds."""
    mean, std = _pick(ts, method, frac, "mean"), _pick(ts, method, frac, "std")
    folds = ts[
        (ts["init"] == method)
        & ts["fraction"].map(lambda f: _frac_eq(f, frac))
        & ~ts["fold"].isin(["mean", "std"])
    ]
    return mean_std_cell(
        None if mean is None else mean[metric],
        None if std is None else std[metric],
        notes,
        why,
        of=list(folds[metric]),
    )


def _fraction_summary(ts: pd.DataFrame, method: str, frac: float, metric: str, notes: Notes) -> str:
    """The mean (std) cell of a method at a label fraction, or the note of its missing result."""
    why = f"{method}: no tile-protocol result at label fraction {pct(frac)}"
    return _summary_cell(ts, method, frac, metric, notes, why)


def tile_markdown(
    ts: pd.DataFrame,
    raw: pd.DataFrame,
    classes: list[str],
    methods: list[str],
    fractions: list[float],
    fold_ids: list[int],
    notes: Notes,
) -> list[str]:
    """The tile-protocol section: Tables II and III per fraction, pixel accuracy, per class,
    and Table IV over fractions."""
    lines = ["## Tile protocol (the paper's, Tables II-IV)", ""]
    lines.append(
        "Each fold's model predicts the centre target block of every kept tile of that fold's "
        "labelled validation slides (argmax over the foreground classes); unlabelled pixels are "
        "ignored. **F1** is the micro F1 of each slide averaged over the fold's slides (the "
        "paper's Table II); **ACC** the paper's accuracy, (TP + TN) / all per class one-vs-rest, "
        "averaged over classes and then over slides (Table III; = 1 - 2 (1 - F1) / K); pixel "
        "accuracy, macro F1 and per-class F1 come from the fold's pooled confusion (a class "
        "predicted in a fold whose truth lacks it scores F1 0 there; one in neither is left out "
        "of that fold, as the footnotes count). Mean (std) over folds, std with ddof 1."
    )
    lines.append("")
    if len(raw):
        first = raw.drop_duplicates("slide")
        for fold in fold_ids:
            sub = first[first["fold"].astype(int) == fold]
            names = ", ".join(sorted(sub["slide"])) or "none"
            lines.append(
                f"- fold {fold}: {len(sub)} validation slide(s) ({names}), "
                f"{int(sub['n_tiles'].sum())} tiles, {int(sub['n_pixels'].sum())} labelled pixels"
            )
        lines.append("")
    else:
        lines += ["No tile-protocol results." + notes.ref(_no_tiles_why()), ""]
    fold_cols = [f"Fold {f}" for f in fold_ids]
    for frac in fractions:
        for metric, title in (
            ("f1", "F1 (Table II)"),
            ("paper_accuracy", "ACC (Table III)"),
            ("pixel_accuracy", "pixel accuracy, pooled per fold"),
        ):
            lines += [f"### Label fraction {pct(frac)}: {title}", ""]
            rows = []
            for method in methods:
                cells = [method]
                for fold in fold_ids:
                    r = _pick(ts, method, frac, str(fold))
                    cells.append(
                        cell(
                            None if r is None else r[metric],
                            notes,
                            f"fold {fold}: no tile-protocol result ({_no_tiles_why()})",
                        )
                    )
                cells.append(_fraction_summary(ts, method, frac, metric, notes))
                rows.append(cells)
            lines += table(["Method", *fold_cols, "Mean (Std)"], rows)
        lines += [f"### Label fraction {pct(frac)}: per-class F1, mean (std) over folds", ""]
        cols = [*(f"f1_{c}" for c in classes[1:]), "macro_f1", "pixel_accuracy"]
        rows = []
        for method in methods:
            why = f"no fold has this class in its truth or predictions ({method}, {pct(frac)})"
            rows.append([method] + [_summary_cell(ts, method, frac, c, notes, why) for c in cols])
        lines += table(["Method", *classes[1:], "Macro F1", "Pixel acc."], rows)
    if fractions:
        lines += ["### Label fractions (Table IV): F1 and ACC, mean (std) over folds", ""]
        header = ["Method", *(f"F1 {pct(f)}" for f in fractions)]
        header += [f"ACC {pct(f)}" for f in fractions]
        rows = []
        for method in methods:
            cells = [method]
            for metric in ("f1", "paper_accuracy"):
                for frac in fractions:
                    cells.append(_fraction_summary(ts, method, frac, metric, notes))
            rows.append(cells)
        lines += table(header, rows)
    return lines


def _no_tiles_why() -> str:
    return (
        "no labelled validation slide with kept tiles in this fold, or its evaluation did not run"
    )


def slide_markdown(
    ss: pd.DataFrame, raw: pd.DataFrame, classes: list[str], methods: list[str], notes: Notes
) -> list[str]:
    """The whole-slide section: mean (std) over folds, per fold, per slide."""
    lines = ["## Whole-slide protocol (out-of-fold class maps)", ""]
    if not len(raw):
        why = "no class map was evaluated (no labelled slide, or no `dsf infer` maps yet)"
        return [*lines, "No whole-slide results." + notes.ref(why), ""]
    mpps = ", ".join(f"{m:g}" for m in sorted(set(raw["mpp"])))
    routing = ", ".join(sorted(set(raw["routing"])))
    n_slides = raw["slide"].nunique()
    n_px = int(raw.drop_duplicates("slide")["n_pixels"].sum())
    lines.append(
        f"Each labelled slide's full class map (at {mpps} um/px, routing {routing}) against its "
        f"ground truth, unlabelled pixels ignored: {n_slides} slides "
        f"({', '.join(sorted(set(raw['slide'])))}), {n_px} labelled pixels per method. Labelled "
        "pixels the map leaves as background count as misses (for the pixel accuracy, and as "
        "misses of their class for F1). **F1** is each slide's micro F1 averaged over the "
        "fold's slides and **ACC** the paper's accuracy likewise, as the tile protocol's "
        "Tables II-III; per-class F1 (= Dice), macro F1 and pixel accuracy per fold from the "
        "pooled confusion of its slides; mean and sample std (ddof 1) over folds."
    )
    lines.append("")
    cols = ["f1", "paper_accuracy", *(f"f1_{c}" for c in classes[1:]), "macro_f1"]
    cols.append("pixel_accuracy")
    names = ["F1", "ACC", *classes[1:], "Macro F1", "Pixel acc."]
    lines += ["### Mean (std) over folds", ""]
    rows = []
    for method in methods:
        mine = ss[ss["init"] == method]
        for frac in list(dict.fromkeys(mine["fraction"])):
            sub = mine[
                mine["fraction"].map(lambda f, x=frac: f == x or (pd.isna(f) and pd.isna(x)))
            ]
            mean = sub[sub["level"] == "mean"]
            std = sub[sub["level"] == "std"]
            label = f"{method} ({pct(frac)})" if finite(frac) else method
            rows.append(
                [label]
                + [
                    mean_std_cell(
                        mean[c].iloc[0] if len(mean) else None,
                        std[c].iloc[0] if len(std) else None,
                        notes,
                        f"{method}: no whole-slide result for this class or method",
                        of=list(sub.loc[sub["level"] == "fold", c]),
                    )
                    for c in cols
                ]
            )
    lines += table(["Method", *names], rows)
    for level, title in (("fold", "Per fold"), ("slide", "Per slide")):
        per_slide = level == "slide"
        lines += [f"### {title}", ""]
        lines += rows_table(
            ss[ss["level"] == level],
            ["Method", *(["Slide"] if per_slide else []), "Fold", "Labelled px", *names],
            lambda r, s=per_slide: [
                f"{r['init']} ({pct(r['fraction'])})" if finite(r["fraction"]) else str(r["init"]),
                *([str(r["slide"])] if s else []),
                str(r["fold"]),
                str(int(r["n_pixels"])),
            ],  # fmt: skip
            cols,
            lambda r, s=per_slide: (
                f"fold {r['fold']}: no labelled slide in this fold"
                if not s and not r["n_pixels"]
                else "no labelled pixel on this slide"
                if not r["n_pixels"]
                else "class absent from both truth and prediction"
            ),
            notes,
        )
    return lines


#: What each init of `finetune.inits` is, in the paper's words (Tables II-V), for the tables.
METHOD_NAMES = {
    "random": "HookNet from random init, the supervised baseline",
    "unet": "U-Net on target patches, random init",
    "imagenet": "HookNet from ImageNet encoders",
    "dsf": "HookNet from DSF-WSI encoders, the paper's method",
    "simsiam": "HookNet from SimSiam encoders, each branch alone",
    "dsl_only": "HookNet from DSF-WSI without CTFM, DSL only",
    "ctfm_only": "HookNet from DSF-WSI without DSL, only CTFM",
    "jigsaw_only": "HookNet from DSF-WSI without DSL, only the jigsaw",
    "mask_only": "HookNet from DSF-WSI without DSL, only masking",
}


def method_legend(methods: list[str]) -> str:
    """The methods as the tables name them, each with what it is where dsf knows it."""
    if not methods:
        return "none"
    return ", ".join(f"{m} ({METHOD_NAMES[m]})" if m in METHOD_NAMES else m for m in methods)


# -- entry ------------------------------------------------------------------------------------


def build_tables(
    *,
    tiles: list[Path],
    slides: list[Path],
    panels: list[Path],
    folds: pd.DataFrame,
    methods: list[str],
    fractions: list[float],
    markdown: Path,
    tile_scores: Path,
    slide_scores: Path,
    figure: Path | None = None,
    panel_slides: int = 3,
    settings: dict[str, Any] | None = None,
) -> None:
    """Read the per-slide TSVs and write tables.md, tile_scores.tsv, slide_scores.tsv and the
    figure (`dsf.figures`); each records the dsf version and `settings` (the config sections
    used) as the other artifacts do."""
    fold_ids = sorted({int(f) for f in folds["fold"]})
    traw, tcls = read_results(tiles)
    sraw, scls = read_results(slides)
    if tcls and scls and tcls != scls:
        raise ConfigError(f"tile results score classes {tcls[1:]}, whole-slide ones {scls[1:]}")
    classes = tcls or scls
    if not classes:
        raise ConfigError("no evaluation result was given (--tiles / --slides): nothing to table")
    methods = methods or (list(dict.fromkeys(traw["init"])) if len(traw) else [])
    fractions = fractions or (
        sorted({float(f) for f in traw["fraction"]}, reverse=True) if len(traw) else []
    )
    ts = tile_fold_scores(traw, classes, methods, fractions, fold_ids)
    smethods = list(dict.fromkeys([m for m in methods if len(sraw) and m in set(sraw["init"])]))
    if len(sraw):
        smethods += [m for m in dict.fromkeys(sraw["init"]) if m not in smethods]
    ss = slide_fold_scores(sraw, classes, smethods, fold_ids)
    notes = Notes()
    lines = ["# Evaluation", ""]
    lines.append(
        f"{classes_text(classes)} Folds: {', '.join(map(str, fold_ids))}. "
        f"Methods: {method_legend(methods)}."
    )
    lines.append("")
    lines += tile_markdown(ts, traw, classes, methods, fractions, fold_ids, notes)
    lines += slide_markdown(ss, sraw, classes, smethods, notes)
    settings = settings or {}
    write_tsv(with_provenance(ts, settings), tile_scores)
    write_tsv(with_provenance(ss, settings), slide_scores)
    write_markdown(lines, notes, settings, markdown)
    if figure is not None:
        from dsf.figures import evaluation_figure

        evaluation_figure(ts, ss, classes, panels, figure, panel_slides)
    log.info("wrote %s, %s, %s", markdown, tile_scores, slide_scores)
