"""The evaluation tables: per fold, then mean (sample std) over folds (paper Tables II-IV).

Tile protocol (the paper's): per method (init) and label fraction, per fold the micro F1 of each
validation slide averaged over the fold's slides (the paper's F1, Table II) and likewise its
accuracy (mean one-vs-rest accuracy, Table III); per-class F1, macro F1 and pixel accuracy from
the fold's pooled confusion; then mean and std (ddof 1) over folds, one table per label fraction
and a summary over fractions (Table IV).

Whole-slide protocol: per-class F1 (= Dice), pixel accuracy (= micro F1) and macro F1 per slide
and per fold (pooled confusion), then mean (std) over folds.

Nothing is ever shown as 0 for want of data: a fold or method without results is `n/a` with a
footnote saying why; std over fewer than two folds is `n/a`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsf import __version__
from dsf.atomic import atomic_path
from dsf.errors import ConfigError
from dsf.evaluate import classes_of, confusion_of, with_provenance, write_tsv
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


def read_results(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate per-slide TSVs (header-only ones included) and their common classes."""
    frames, classes = [], None
    for p in paths:
        df = pd.read_csv(p, sep="\t", dtype={"slide": str})
        cls = classes_of(list(df.columns))
        if classes is not None and cls != classes:
            raise ConfigError(
                f"{p} scores classes {cls[1:]}, other results {classes[1:]}: they come from "
                "runs with different labels.classes; rerun evaluate"
            )
        classes = cls
        if len(df):
            frames.append(df)
    if not frames:
        return pd.DataFrame(), classes or []
    return pd.concat(frames, ignore_index=True), classes or []


def _frac_eq(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _pooled(sub: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
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


def _summary_rows(
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
                    pooled = _pooled(sub, classes)
                    row |= pooled
                    evaluated = sub[sub["n_pixels"] > 0]
                    row["f1"] = mean_std(list(evaluated["micro_f1"]))[0]
                    row["paper_accuracy"] = mean_std(list(evaluated["paper_accuracy"]))[0]
                else:
                    row |= {"n_pixels": 0} | {m: float("nan") for m in metrics}
                rows.append(row)
            out += rows + _summary_rows(rows, key, metrics)
    columns = ["init", "fraction", "fold", "n_folds", "n_slides", "n_tiles", "n_pixels"]
    return pd.DataFrame(out, columns=[*columns, *metrics])


def slide_fold_scores(
    df: pd.DataFrame, classes: list[str], methods: list[str], fold_ids: list[int]
) -> pd.DataFrame:
    """Whole-slide protocol, rows with `level` slide (each map), fold (pooled confusion of the
    fold's slides), mean and std (over folds) per method x fraction."""
    metrics = ["pixel_accuracy", "micro_f1", "macro_f1", *(f"f1_{c}" for c in classes[1:])]
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
                row |= {"n_slides": 1, "n_pixels": int(r["n_pixels"])}
                row |= {"pixel_accuracy": r["accuracy"]}
                row |= {m: r[m] for m in metrics if m != "pixel_accuracy"}
                out.append(row)
            folds = []
            for fold in fold_ids:
                sub = sub_m[sub_m["fold"].astype(int) == fold] if len(sub_m) else sub_m
                row = key | {"level": "fold", "fold": str(fold), "slide": "", "n_slides": len(sub)}
                row["n_folds"] = int(len(sub) > 0)
                if len(sub):
                    row |= _pooled(sub, classes)
                else:
                    row |= {"n_pixels": 0} | {m: float("nan") for m in metrics}
                folds.append(row)
            out += folds
            for r in _summary_rows(folds, key, metrics):
                out.append(r | {"level": r["fold"], "slide": ""})
    columns = ["init", "fraction", "level", "fold", "slide", "n_folds", "n_slides", "n_pixels"]
    return pd.DataFrame(out, columns=[*columns, *metrics])


# -- markdown ---------------------------------------------------------------------------------


class _Notes:
    """Numbered markdown footnotes, one per distinct reason."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[^{self.texts.index(text) + 1}]"

    def render(self) -> list[str]:
        return [f"[^{i}]: {t}" for i, t in enumerate(self.texts, 1)]


def _num(v: Any) -> str:
    return f"{float(v):.4f}"


def _finite(v: Any) -> bool:
    try:
        return bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


def _cell(v: Any, notes: _Notes, why: str) -> str:
    return _num(v) if _finite(v) else "n/a" + notes.ref(why)


def _mean_std_cell(mean: Any, std: Any, notes: _Notes, why: str, over: str = "folds") -> str:
    if not _finite(mean):
        return "n/a" + notes.ref(why)
    sd = (
        _num(std)
        if _finite(std)
        else "n/a" + notes.ref(f"std (ddof 1) needs results of at least two {over}")
    )
    return f"{_num(mean)} ({sd})"


def _count(n: int, noun: str) -> str:
    """`1 slide`, `2 slides`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _pct(frac: float) -> str:
    return f"{frac * 100:g}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _pick(scores_df: pd.DataFrame, method: str, frac: float, fold: str) -> pd.Series | None:
    m = scores_df[
        (scores_df["init"] == method)
        & scores_df["fraction"].map(lambda f: _frac_eq(f, frac))
        & (scores_df["fold"] == fold)
    ]
    return None if m.empty else m.iloc[0]


def _summary_cell(
    ts: pd.DataFrame, method: str, frac: float, metric: str, notes: _Notes, why: str
) -> str:
    """The 'mean (std)' cell of one method, fraction and metric over folds."""
    mean, std = _pick(ts, method, frac, "mean"), _pick(ts, method, frac, "std")
    return _mean_std_cell(
        None if mean is None else mean[metric],
        None if std is None else std[metric],
        notes,
        why,
    )


def _fraction_summary(
    ts: pd.DataFrame, method: str, frac: float, metric: str, notes: _Notes
) -> str:
    """The mean (std) cell of a method at a label fraction, or the note of its missing result."""
    why = f"{method}: no tile-protocol result at label fraction {_pct(frac)}"
    return _summary_cell(ts, method, frac, metric, notes, why)


def tile_markdown(
    ts: pd.DataFrame,
    raw: pd.DataFrame,
    classes: list[str],
    methods: list[str],
    fractions: list[float],
    fold_ids: list[int],
    notes: _Notes,
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
        "accuracy, macro F1 and per-class F1 come from the fold's pooled confusion. Mean (std) "
        "over folds, std with ddof 1."
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
            lines += [f"### Label fraction {_pct(frac)}: {title}", ""]
            rows = []
            for method in methods:
                cells = [method]
                for fold in fold_ids:
                    r = _pick(ts, method, frac, str(fold))
                    cells.append(
                        _cell(
                            None if r is None else r[metric],
                            notes,
                            f"fold {fold}: no tile-protocol result ({_no_tiles_why()})",
                        )
                    )
                cells.append(_fraction_summary(ts, method, frac, metric, notes))
                rows.append(cells)
            lines += _table(["Method", *fold_cols, "Mean (Std)"], rows)
        lines += [f"### Label fraction {_pct(frac)}: per-class F1, mean (std) over folds", ""]
        cols = [*(f"f1_{c}" for c in classes[1:]), "macro_f1", "pixel_accuracy"]
        rows = []
        for method in methods:
            why = f"no fold has this class in its truth or predictions ({method}, {_pct(frac)})"
            rows.append([method] + [_summary_cell(ts, method, frac, c, notes, why) for c in cols])
        lines += _table(["Method", *classes[1:], "Macro F1", "Pixel acc."], rows)
    if fractions:
        lines += ["### Label fractions (Table IV): F1 and ACC, mean (std) over folds", ""]
        header = ["Method", *(f"F1 {_pct(f)}" for f in fractions)]
        header += [f"ACC {_pct(f)}" for f in fractions]
        rows = []
        for method in methods:
            cells = [method]
            for metric in ("f1", "paper_accuracy"):
                for frac in fractions:
                    cells.append(_fraction_summary(ts, method, frac, metric, notes))
            rows.append(cells)
        lines += _table(header, rows)
    return lines


def _no_tiles_why() -> str:
    return (
        "no labelled validation slide with kept tiles in this fold, or its evaluation did not run"
    )


def slide_markdown(
    ss: pd.DataFrame, raw: pd.DataFrame, classes: list[str], methods: list[str], notes: _Notes
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
        "pixels the map leaves as background count as misses. F1 = Dice; pixel accuracy = micro "
        "F1; per fold from the pooled confusion of its slides."
    )
    lines.append("")
    cols = [*(f"f1_{c}" for c in classes[1:]), "pixel_accuracy", "macro_f1"]
    names = [*classes[1:], "Pixel acc. (= micro F1)", "Macro F1"]
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
            label = f"{method} ({_pct(frac)})" if _finite(frac) else method
            rows.append(
                [label]
                + [
                    _mean_std_cell(
                        mean[c].iloc[0] if len(mean) else None,
                        std[c].iloc[0] if len(std) else None,
                        notes,
                        f"{method}: no whole-slide result for this class or method",
                    )
                    for c in cols
                ]
            )
    lines += _table(["Method", *names], rows)
    for level, title in (("fold", "Per fold"), ("slide", "Per slide")):
        per_slide = level == "slide"
        lines += [f"### {title}", ""]
        lines += _rows_table(
            ss[ss["level"] == level],
            ["Method", *(["Slide"] if per_slide else []), "Fold", "Labelled px", *names],
            lambda r, s=per_slide: [
                str(r["init"]),
                *([str(r["slide"])] if s else []),
                str(r["fold"]),
                str(int(r["n_pixels"])),
            ],  # fmt: skip
            cols,
            lambda r, s=per_slide: (
                "class absent from both truth and prediction"
                if s
                else f"fold {r['fold']}: no labelled slide in this fold"
            ),
            notes,
        )
    return lines


def _rows_table(
    rows: pd.DataFrame,
    header: list[str],
    lead: Callable[[pd.Series], list[str]],
    cols: list[str],
    why: Callable[[pd.Series], str],
    notes: _Notes,
) -> list[str]:
    """A markdown table of score rows: `lead(row)` cells, then one cell per metric of `cols`
    (n/a with the footnote `why(row)` where it is undefined)."""
    body = [lead(r) + [_cell(r[c], notes, why(r)) for c in cols] for _, r in rows.iterrows()]
    return _table(header, body)


# -- entry ------------------------------------------------------------------------------------


def _classes_text(classes: list[str]) -> str:
    return f"Classes: {', '.join(classes[1:])} (index 0, {classes[0]}, is unlabelled and ignored)."


def _write_markdown(
    lines: list[str], notes: _Notes, settings: dict[str, Any], markdown: Path
) -> None:
    """tables.md: the sections, their footnotes, and the version and settings that made it."""
    made = f"Made by dsf {__version__}; settings: `{json.dumps(settings, sort_keys=True)}`"
    with atomic_path(markdown) as tmp:
        tmp.write_text("\n".join([*lines, *notes.render(), "", made]).rstrip() + "\n")


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
    notes = _Notes()
    lines = ["# Evaluation", ""]
    lines.append(
        f"{_classes_text(classes)} Folds: {', '.join(map(str, fold_ids))}. "
        f"Methods: {', '.join(methods) or 'none'}."
    )
    lines.append("")
    lines += tile_markdown(ts, traw, classes, methods, fractions, fold_ids, notes)
    lines += slide_markdown(ss, sraw, classes, smethods, notes)
    settings = settings or {}
    write_tsv(with_provenance(ts, settings), tile_scores)
    write_tsv(with_provenance(ss, settings), slide_scores)
    _write_markdown(lines, notes, settings, markdown)
    if figure is not None:
        from dsf.figures import evaluation_figure

        evaluation_figure(ts, ss, classes, panels, figure, panel_slides)
    log.info("wrote %s, %s, %s", markdown, tile_scores, slide_scores)


# -- prediction runs --------------------------------------------------------------------------


def slide_cohort_scores(df: pd.DataFrame, classes: list[str], methods: list[str]) -> pd.DataFrame:
    """A prediction run's whole-slide scores: rows with `level` slide (each map), all (the
    pooled confusion of every slide), mean and std (ddof 1) over the slides, per method (model
    set) and label fraction. The `fold` column repeats the level for the figure; `n_models`
    counts the models the set averages."""
    metrics = ["pixel_accuracy", "micro_f1", "macro_f1", *(f"f1_{c}" for c in classes[1:])]
    out: list[dict[str, Any]] = []
    for method in methods:
        mine = df[df["init"] == method]
        for frac in sorted({float(f) for f in mine["fraction"]}, reverse=True):
            sub = mine[mine["fraction"] == frac]
            averaged = (
                max(len(str(m).split(";")) for m in sub["models"])
                if "models" in sub.columns
                else None
            )
            key = {"init": method, "fraction": frac, "model": "", "n_models": averaged}
            per_slide = []
            for _, r in sub.iterrows():
                row = key | {"level": "slide", "fold": "", "slide": r["slide"], "n_slides": 1}
                row |= {"n_pixels": int(r["n_pixels"]), "pixel_accuracy": r["accuracy"]}
                row |= {m: r[m] for m in metrics if m != "pixel_accuracy"}
                per_slide.append(row)
            out += per_slide
            pooled = key | {"level": "all", "fold": "all", "slide": "", "n_slides": len(sub)}
            out.append(pooled | _pooled(sub, classes))
            for level in ("mean", "std"):
                row = key | {"level": level, "fold": level, "slide": "", "n_slides": len(sub)}
                for m in metrics:
                    mu, sd, _ = mean_std([r[m] for r in per_slide if r["n_pixels"] > 0])
                    row[m] = mu if level == "mean" else sd
                out.append(row)
    columns = ["init", "fraction", "level", "fold", "slide", "model", "n_models", "n_slides"]
    return pd.DataFrame(out, columns=[*columns, "n_pixels", *metrics])


def model_cohort_scores(df: pd.DataFrame, classes: list[str], methods: list[str]) -> pd.DataFrame:
    """Each model of a set alone (apply.each_model): per model the pooled confusion of its
    slides (level `model`, as the paper pools a fold's validation slides), then mean and std
    (ddof 1) over the set's models (levels `models_mean`, `models_std`), per method and label
    fraction. Every model must have scored the same slides, or the spread would mix cohorts."""
    metrics = ["pixel_accuracy", "micro_f1", "macro_f1", *(f"f1_{c}" for c in classes[1:])]
    if len(df) and "models" not in df.columns:
        raise ConfigError(
            "the per-model whole-slide results (--model-slides) do not name their model (no "
            "`models` column): they were written by an older dsf; rerun `dsf evaluate slide`"
        )
    out: list[dict[str, Any]] = []
    for method in methods:
        mine = df[df["init"] == method]
        for frac in sorted({float(f) for f in mine["fraction"]}, reverse=True):
            sub = mine[mine["fraction"] == frac]
            models = list(dict.fromkeys(sub["models"]))
            slides = {m: sorted(sub.loc[sub["models"] == m, "slide"]) for m in models}
            first = slides[models[0]]
            if odd := [m for m in models if slides[m] != first]:
                raise ConfigError(
                    f"the models of {method} scored different slides ({odd[0]}: {slides[odd[0]]}"
                    f", {models[0]}: {first}): give every model's result of every slide"
                )
            key = {"init": method, "fraction": frac, "fold": "", "slide": ""}
            key["n_slides"] = len(first)
            per_model = [
                key | {"level": "model", "model": m, "n_models": 1}
                | _pooled(sub[sub["models"] == m], classes)
                for m in models
            ]  # fmt: skip
            out += per_model
            for level in ("models_mean", "models_std"):
                row = key | {"level": level, "model": "", "n_models": len(models)}
                for m in metrics:
                    mu, sd, _ = mean_std([r[m] for r in per_model if r["n_pixels"] > 0])
                    row[m] = mu if level == "models_mean" else sd
                row["n_pixels"] = sum(r["n_pixels"] for r in per_model)
                out.append(row)
    columns = ["init", "fraction", "level", "fold", "slide", "model", "n_models", "n_slides"]
    return pd.DataFrame(out, columns=[*columns, "n_pixels", *metrics])


def model_tile_scores(df: pd.DataFrame, classes: list[str], methods: list[str]) -> pd.DataFrame:
    """A prediction run's tile protocol (apply.tile_protocol): per model, as the paper scores a
    fold model on its validation slides, f1 (the slides' micro F1 averaged) and paper_accuracy
    (likewise), with pixel accuracy, macro F1 and per-class F1 of the pooled confusion (`fold`
    empty, `model` its file); then `mean` and `std` (ddof 1) over the set's models, per method
    and label fraction."""
    metrics = [*FOLD_METRICS, *(f"f1_{c}" for c in classes[1:])]
    out: list[dict[str, Any]] = []
    for method in methods:
        mine = df[df["init"] == method]
        for frac in sorted({float(f) for f in mine["fraction"]}, reverse=True):
            key = {"init": method, "fraction": frac}
            sub = mine[mine["fraction"] == frac]
            rows = []
            for model in dict.fromkeys(sub["model"]):
                one = sub[sub["model"] == model]
                row: dict[str, Any] = key | {"fold": "", "model": model, "n_slides": len(one)}
                row |= {"n_folds": 1, "n_tiles": int(one["n_tiles"].sum())} | _pooled(one, classes)
                evaluated = one[one["n_pixels"] > 0]
                row["f1"] = mean_std(list(evaluated["micro_f1"]))[0]
                row["paper_accuracy"] = mean_std(list(evaluated["paper_accuracy"]))[0]
                rows.append(row)
            summary = _summary_rows(rows, key | {"model": ""}, metrics)
            for r in summary:
                r["n_models"] = len(rows)
            out += rows + summary
    columns = ["init", "fraction", "fold", "model", "n_models", "n_slides", "n_tiles", "n_pixels"]
    return pd.DataFrame(out, columns=[*columns, *metrics])


def tile_cohort_markdown(
    ts: pd.DataFrame, raw: pd.DataFrame, classes: list[str], notes: _Notes
) -> list[str]:
    """The tile-protocol section of a prediction run: mean (std) over a set's models, and per
    model."""
    slides = sorted(set(raw["slide"]))
    per_slide = raw.drop_duplicates("slide")
    lines = [
        "## Tile protocol (the paper's, Tables II-III, on this cohort)",
        "",
        "Each model predicts the centre target block of every kept tile of the annotated slides "
        f"({len(slides)}: {', '.join(slides)}; {_count(int(per_slide['n_tiles'].sum()), 'tile')}), "
        "argmax over the foreground classes, unlabelled pixels ignored. **F1** is the micro F1 "
        "of each slide averaged over the slides (the paper's Table II), **ACC** the paper's "
        "accuracy likewise (Table III); pixel accuracy, macro F1 and per-class F1 come from the "
        "model's pooled confusion. Mean (std, ddof 1) over the set's models, as the paper's "
        "tables are over fold models.",
        "",
    ]
    cols = ["f1", "paper_accuracy", *(f"f1_{c}" for c in classes[1:]), "pixel_accuracy"]
    pairs = [
        (sub[sub["fold"] == "mean"].iloc[0], sub[sub["fold"] == "std"].iloc[0])
        for _, sub in ts.groupby(["init", "fraction"], sort=False)
    ]
    lines += _over_models(
        pairs,
        ts[~ts["fold"].isin(["mean", "std"])],
        cols,
        ["F1", "ACC", *classes[1:], "Pixel acc."],
        {"Models (n)": "n_models"},
        ("Per model", "Tiles", "n_tiles"),
        ("no model has a result for this", "no labelled pixel, or the class is absent"),
        notes,
    )
    return lines


def _set_label(r: pd.Series) -> str:
    """A model set's row label: its name and label fraction."""
    return f"{r['init']} ({_pct(float(r['fraction']))})"


def _over_models(
    pairs: list[tuple[pd.Series, pd.Series]],
    per_model: pd.DataFrame,
    cols: list[str],
    names: list[str],
    counts: dict[str, str],
    per: tuple[str, str, str],
    why: tuple[str, str],
    notes: _Notes,
) -> list[str]:
    """A prediction run's tables over a set's models: mean (std) per set (`pairs` of its mean
    and std rows, `counts` header -> column), then one row per model (`per`: the title, the
    count's header and column); `why`: the notes of an n/a mean and an n/a model cell."""
    rows = []
    for mean, std in pairs:
        note = f"{mean['init']}: {why[0]}"
        cells = [_mean_std_cell(mean[c], std[c], notes, note, over="models") for c in cols]
        rows.append([_set_label(mean), *(str(int(mean[c])) for c in counts.values()), *cells])
    lines = ["### Mean (std) over the models", ""]
    lines += _table(["Models", *counts, *names], rows)
    title, count_header, count_col = per
    lines += [f"### {title}", ""]
    lines += _rows_table(
        per_model,
        ["Models", "Model", count_header, *names],
        lambda r: [_set_label(r), f"`{r['model']}`", str(int(r[count_col]))],
        cols,
        lambda r: why[1],
        notes,
    )
    return lines


def models_markdown(ms: pd.DataFrame, classes: list[str], notes: _Notes) -> list[str]:
    """The tables of each model alone: mean (std) over a set's models, and per model."""
    cols = [*(f"f1_{c}" for c in classes[1:]), "pixel_accuracy", "macro_f1"]
    names = [*classes[1:], "Pixel acc. (= micro F1)", "Macro F1"]
    lines = [
        "## Each model alone (`apply.each_model`)",
        "",
        "Every model of a set predicted each labelled slide on its own. A model's scores pool "
        "the confusion of all the slides, as the paper's tables pool a fold's validation "
        "slides; the mean (std, ddof 1) is over the set's models, the spread of a fold "
        "ensemble's members on this cohort. Compare the mean with the set's averaged maps "
        "(all slides pooled, above).",
        "",
    ]
    pairs = [
        (sub[sub["level"] == "models_mean"].iloc[0], sub[sub["level"] == "models_std"].iloc[0])
        for _, sub in ms.groupby(["init", "fraction"], sort=False)
    ]
    lines += _over_models(
        pairs,
        ms[ms["level"] == "model"],
        cols,
        names,
        {"Models (n)": "n_models", "Slides": "n_slides"},
        ("Per model, slides pooled", "Labelled px", "n_pixels"),
        (
            "no model has this class in its truth or prediction",
            "class absent from both truth and prediction",
        ),
        notes,
    )
    return lines


def cohort_markdown(
    cs: pd.DataFrame, raw: pd.DataFrame, classes: list[str], notes: _Notes
) -> list[str]:
    """A prediction run's tables: mean (std) over slides, all slides pooled, per slide."""
    mpps = ", ".join(f"{m:g}" for m in sorted(set(raw["mpp"])))
    lines = [
        "## Whole-slide protocol (class maps of the given models)",
        "",
        f"Each labelled slide's full class map (at {mpps} um/px) against its ground truth, "
        f"unlabelled pixels ignored: {_count(raw['slide'].nunique(), 'slide')} "
        f"({', '.join(sorted(set(raw['slide'])))}). Labelled pixels the map leaves as "
        "background count as misses. F1 = Dice; pixel accuracy = micro F1. The models were "
        "trained before, outside this run (`apply.models`); no slide is among their fit or "
        "selection slides by id (checked), but whether they saw the same tissue under another "
        "name is for you to know.",
        "",
    ]
    cols = [*(f"f1_{c}" for c in classes[1:]), "pixel_accuracy", "macro_f1"]
    names = [*classes[1:], "Pixel acc. (= micro F1)", "Macro F1"]
    absent = "class absent from both truth and prediction"

    lines += ["### Mean (std) over slides", ""]
    rows = []
    for (_, _), sub in cs.groupby(["init", "fraction"], sort=False):
        mean, std = sub[sub["level"] == "mean"].iloc[0], sub[sub["level"] == "std"].iloc[0]
        why = f"{mean['init']}: no slide has this class in its truth or prediction"
        cells = [_mean_std_cell(mean[c], std[c], notes, why, over="slides") for c in cols]
        rows.append([_set_label(mean), str(int(mean["n_slides"])), *cells])
    lines += _table(["Models", "Slides", *names], rows)
    for level, title in (("all", "All slides pooled"), ("slide", "Per slide")):
        per_slide = level == "slide"
        lines += [f"### {title}", ""]
        lines += _rows_table(
            cs[cs["level"] == level],
            ["Models", *(["Slide"] if per_slide else []), "Labelled px", *names],
            lambda r, s=per_slide: [
                _set_label(r),
                *([str(r["slide"])] if s else []),
                str(int(r["n_pixels"])),
            ],  # fmt: skip
            cols,
            lambda r: absent,
            notes,
        )
    return lines


def build_cohort_tables(
    *,
    slides: list[Path],
    panels: list[Path],
    methods: list[str],
    markdown: Path,
    slide_scores: Path,
    figure: Path | None = None,
    panel_slides: int = 3,
    settings: dict[str, Any] | None = None,
    model_slides: Sequence[Path] = (),
    tiles: Sequence[Path] = (),
    tile_scores: Path | None = None,
) -> None:
    """A prediction run's tables.md, slide_scores.tsv and figure from its whole-slide TSVs
    (`slides`: each set's averaged maps; `model_slides`: each model alone, optional), and with
    `tiles` (each model's tile protocol) its tile_scores.tsv."""
    raw, classes = read_results(slides)
    if not classes or not len(raw):
        raise ConfigError("no whole-slide result was given (--slides): nothing to table")
    members, member_classes = read_results(model_slides)
    if len(members) and member_classes != classes:
        raise ConfigError(
            f"the per-model results score classes {member_classes[1:]}, the model sets' "
            f"{classes[1:]}: evaluate both with the same labels.classes"
        )
    traw, tile_classes = read_results(tiles)
    if len(traw) and tile_classes != classes:
        raise ConfigError(
            f"the tile-protocol results score classes {tile_classes[1:]}, the maps' "
            f"{classes[1:]}: evaluate both with the same labels.classes"
        )
    methods = list(dict.fromkeys([*methods, *raw["init"]]))
    methods = [m for m in methods if m in set(raw["init"])]
    cs = slide_cohort_scores(raw, classes, methods)
    ts = model_tile_scores(traw, classes, methods) if len(traw) else None
    ms = (
        model_cohort_scores(members, classes, list(dict.fromkeys(members["init"])))
        if len(members)
        else None
    )
    notes = _Notes()
    lines = ["# Evaluation of a prediction run", ""]
    tile_note = "" if ts is not None else " No tile protocol (apply.tile_protocol is off)."
    lines.append(f"{_classes_text(classes)} Models: {', '.join(methods)}.{tile_note}")
    lines.append("")
    if ts is not None:
        lines += tile_cohort_markdown(ts, traw, classes, notes)
    lines += cohort_markdown(cs, raw, classes, notes)
    if ms is not None:
        lines += models_markdown(ms, classes, notes)
        cs = pd.concat([cs, ms], ignore_index=True)
    settings = settings or {}
    if ts is not None:
        if tile_scores is None:
            raise ConfigError("tile-protocol results were given without a tile_scores path")
        write_tsv(with_provenance(ts, settings), tile_scores)
    write_tsv(with_provenance(cs, settings), slide_scores)
    _write_markdown(lines, notes, settings, markdown)
    if figure is not None:
        from dsf.figures import evaluation_figure

        evaluation_figure(ts, cs, classes, panels, figure, panel_slides)
    log.info("wrote %s, %s", markdown, slide_scores)
