"""The tables of a prediction run (`apply.models`): its models were trained elsewhere, so the
scores are over the cohort's slides and over a set's models, not over folds. Whole-slide
protocol per model set (mean (std) over slides, all slides pooled, per slide); with
`apply.each_model` each model alone, slides pooled, and mean (std) over the set's models; with
`apply.tile_protocol` the paper's tile protocol per model and mean (std) over the models."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dsf import markdown as md
from dsf.errors import ConfigError
from dsf.evaluate import with_provenance, write_tsv
from dsf.tables import (
    FOLD_METRICS,
    mean_std,
    pooled_scores,
    read_results,
    slide_averages,
    summary_rows,
)

log = logging.getLogger(__name__)


def _sets(df: pd.DataFrame, methods: list[str]) -> Iterator[tuple[str, float, pd.DataFrame]]:
    """(model set, label fraction, its rows) of per-slide results, in `methods` order and from
    the largest fraction down."""
    for method in methods if len(df) else []:
        mine = df[df["init"] == method]
        for frac in sorted({float(f) for f in mine["fraction"]}, reverse=True):
            yield method, frac, mine[mine["fraction"] == frac]


def _slide_metrics(classes: list[str]) -> list[str]:
    """The whole-slide protocol's score columns."""
    return ["pixel_accuracy", "micro_f1", "macro_f1", *(f"f1_{c}" for c in classes[1:])]


def _spread(rows: list[dict[str, Any]], metrics: list[str]) -> tuple[dict, dict]:
    """Mean and std (ddof 1) of each metric over the rows with labelled pixels."""
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for m in metrics:
        mean[m], std[m], _ = mean_std([r[m] for r in rows if r["n_pixels"] > 0])
    return mean, std


def slide_cohort_scores(df: pd.DataFrame, classes: list[str], methods: list[str]) -> pd.DataFrame:
    """A prediction run's whole-slide scores: rows with `level` slide (each map), all (the
    pooled confusion of every slide), mean and std (ddof 1) over the slides, per method (model
    set) and label fraction. The `fold` column repeats the level for the figure; `n_models`
    counts the models the set averages."""
    metrics = _slide_metrics(classes)
    out: list[dict[str, Any]] = []
    for method, frac, sub in _sets(df, methods):
        averaged = (
            max(len(str(m).split(";")) for m in sub["models"]) if "models" in sub.columns else None
        )
        key = {"init": method, "fraction": frac, "model": "", "n_models": averaged}
        per_slide = []
        for _, r in sub.iterrows():
            row = key | {"level": "slide", "fold": "", "slide": r["slide"], "n_slides": 1}
            row |= {"n_pixels": int(r["n_pixels"])} | {m: r[m] for m in metrics}
            per_slide.append(row)
        out += per_slide
        pooled = key | {"level": "all", "fold": "all", "slide": "", "n_slides": len(sub)}
        out.append(pooled | pooled_scores(sub, classes))
        for level, values in zip(("mean", "std"), _spread(per_slide, metrics), strict=True):
            out.append(key | {"level": level, "fold": level, "slide": "", "n_slides": len(sub)})
            out[-1] |= values
    columns = ["init", "fraction", "level", "fold", "slide", "model", "n_models", "n_slides"]
    return pd.DataFrame(out, columns=[*columns, "n_pixels", *metrics])


def _models_of(sub: pd.DataFrame, column: str, method: str, what: str) -> list[str]:
    """The models of one set's rows (`column` names each row's model), in order; every model
    must have scored the same slides, or a spread over them would mix cohorts."""
    if column not in sub.columns:
        raise ConfigError(
            f"the {what} do not name their model (no `{column}` column): they were written by "
            "an older dsf; rerun the evaluation"
        )
    models = list(dict.fromkeys(sub[column]))
    slides = {m: sorted(sub.loc[sub[column] == m, "slide"]) for m in models}
    first = slides[models[0]] if models else []
    if odd := [m for m in models if slides[m] != first]:
        raise ConfigError(
            f"the models of {method} scored different slides ({odd[0]}: {slides[odd[0]]}, "
            f"{models[0]}: {first}): give every model's result of every slide"
        )
    return models


def model_cohort_scores(df: pd.DataFrame, classes: list[str], methods: list[str]) -> pd.DataFrame:
    """Each model of a set alone (apply.each_model): per model the pooled confusion of its
    slides (level `model`, as the paper pools a fold's validation slides), then mean and std
    (ddof 1) over the set's models (levels `models_mean`, `models_std`, counting one model's
    slides and pixels), per method and label fraction."""
    metrics = _slide_metrics(classes)
    out: list[dict[str, Any]] = []
    for method, frac, sub in _sets(df, methods):
        models = _models_of(sub, "models", method, "per-model whole-slide results")
        key = {"init": method, "fraction": frac, "fold": "", "slide": ""}
        per_model = [
            key | {"level": "model", "model": m, "n_models": 1}
            | {"n_slides": int((sub["models"] == m).sum())}
            | pooled_scores(sub[sub["models"] == m], classes)
            for m in models
        ]  # fmt: skip
        out += per_model
        counts = {c: per_model[0][c] for c in ("n_slides", "n_pixels")}  # one model's
        for level, values in zip(("models_mean", "models_std"), _spread(per_model, metrics),
                                 strict=True):  # fmt: skip
            out.append(key | {"level": level, "model": "", "n_models": len(models)} | counts)
            out[-1] |= values
    columns = ["init", "fraction", "level", "fold", "slide", "model", "n_models", "n_slides"]
    return pd.DataFrame(out, columns=[*columns, "n_pixels", *metrics])


TILE_COLUMNS = ["init", "fraction", "fold", "model", "n_models", "n_slides", "n_tiles", "n_pixels"]


def model_tile_scores(df: pd.DataFrame, classes: list[str], methods: list[str]) -> pd.DataFrame:
    """A prediction run's tile protocol (apply.tile_protocol): per model, as the paper scores a
    fold model on its validation slides, f1 (the slides' micro F1 averaged) and paper_accuracy
    (likewise), with pixel accuracy, macro F1 and per-class F1 of the pooled confusion (`fold`
    empty, `model` its file); then `mean` and `std` (ddof 1) over the set's models (counting
    one model's slides, tiles and pixels), per method and label fraction."""
    metrics = [*FOLD_METRICS, *(f"f1_{c}" for c in classes[1:])]
    out: list[dict[str, Any]] = []
    for method, frac, sub in _sets(df, methods):
        key = {"init": method, "fraction": frac}
        rows = []
        for model in _models_of(sub, "model", method, "tile-protocol results"):
            one = sub[sub["model"] == model]
            row: dict[str, Any] = key | {"fold": "", "model": model, "n_slides": len(one)}
            row |= {"n_folds": 1, "n_tiles": int(one["n_tiles"].sum())}
            row |= pooled_scores(one, classes) | slide_averages(one)
            rows.append(row)
        summary = summary_rows(rows, key | {"model": ""}, metrics)
        for r in summary:  # every model scored the same slides: count them once
            r |= {c: rows[0][c] for c in ("n_slides", "n_tiles", "n_pixels")}
            r["n_models"] = len(rows)
        out += rows + summary
    return pd.DataFrame(out, columns=[*TILE_COLUMNS, *metrics])


def tile_cohort_markdown(
    ts: pd.DataFrame, raw: pd.DataFrame, classes: list[str], notes: md.Notes
) -> list[str]:
    """The tile-protocol section of a prediction run: mean (std) over a set's models, and per
    model."""
    slides = sorted(set(raw["slide"]))
    tiles = md.count(int(raw.drop_duplicates("slide")["n_tiles"].sum()), "tile")
    lines = [
        "## Tile protocol (the paper's, Tables II-III, on this cohort)",
        "",
        "Each model predicts the centre target block of every kept tile of the annotated slides "
        f"({len(slides)}: {', '.join(slides)}; {tiles}), "
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
    return f"{r['init']} ({md.pct(float(r['fraction']))})"


def _over_models(
    pairs: list[tuple[pd.Series, pd.Series]],
    per_model: pd.DataFrame,
    cols: list[str],
    names: list[str],
    counts: dict[str, str],
    per: tuple[str, str, str],
    why: tuple[str, str],
    notes: md.Notes,
) -> list[str]:
    """A prediction run's tables over a set's models: mean (std) per set (`pairs` of its mean
    and std rows, `counts` header -> column), then one row per model (`per`: the title, the
    count's header and column); `why`: the notes of an n/a mean and an n/a model cell."""
    rows = []
    for mean, std in pairs:
        note = f"{mean['init']}: {why[0]}"
        mine = per_model[
            (per_model["init"] == mean["init"])
            & (per_model["fraction"].astype(float) == float(mean["fraction"]))
        ]
        cells = [
            md.mean_std_cell(mean[c], std[c], notes, note, over="models", of=list(mine[c]))
            for c in cols
        ]
        rows.append([_set_label(mean), *(str(int(mean[c])) for c in counts.values()), *cells])
    lines = ["### Mean (std) over the models", ""]
    lines += md.table(["Models", *counts, *names], rows)
    title, count_header, count_col = per
    lines += [f"### {title}", ""]
    lines += md.rows_table(
        per_model,
        ["Models", "Model", count_header, *names],
        lambda r: [_set_label(r), f"`{r['model']}`", str(int(r[count_col]))],
        cols,
        lambda r: why[1],
        notes,
    )
    return lines


def models_markdown(ms: pd.DataFrame, classes: list[str], notes: md.Notes) -> list[str]:
    """The tables of each model alone: mean (std) over a set's models, and per model."""
    cols = [*(f"f1_{c}" for c in classes[1:]), "macro_f1", "pixel_accuracy"]
    names = [*classes[1:], "Macro F1", "Pixel acc."]
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
    cs: pd.DataFrame, raw: pd.DataFrame, classes: list[str], notes: md.Notes
) -> list[str]:
    """A prediction run's tables: mean (std) over slides, all slides pooled, per slide."""
    mpps = ", ".join(f"{m:g}" for m in sorted(set(raw["mpp"])))
    lines = [
        "## Whole-slide protocol (class maps of the given models)",
        "",
        f"Each labelled slide's full class map (at {mpps} um/px) against its ground truth, "
        f"unlabelled pixels ignored: {md.count(raw['slide'].nunique(), 'slide')} "
        f"({', '.join(sorted(set(raw['slide'])))}). Labelled pixels the map leaves as "
        "background count as misses (of their class for F1). F1 = Dice. A slide whose "
        "truth lacks a class its map predicts scores F1 0 for it (false positives only); one "
        "with the class in neither is left out of that class's mean, as the footnotes count. "
        "Mean and sample std (ddof 1) over slides. The models were "
        "trained before, outside this run (`apply.models`); no slide is among their fit or "
        "selection slides by id (checked at start), but whether they saw the same tissue under "
        "another name is for you to know.",
        "",
    ]
    cols = [*(f"f1_{c}" for c in classes[1:]), "macro_f1", "pixel_accuracy"]
    names = [*classes[1:], "Macro F1", "Pixel acc."]
    absent = "class absent from both truth and prediction"

    lines += ["### Mean (std) over slides", ""]
    rows = []
    for (_, _), sub in cs.groupby(["init", "fraction"], sort=False):
        mean, std = sub[sub["level"] == "mean"].iloc[0], sub[sub["level"] == "std"].iloc[0]
        why = f"{mean['init']}: no slide has this class in its truth or prediction"
        slides = sub[sub["level"] == "slide"]
        cells = [
            md.mean_std_cell(mean[c], std[c], notes, why, over="slides", of=list(slides[c]))
            for c in cols
        ]
        rows.append([_set_label(mean), str(int(mean["n_slides"])), *cells])
    lines += md.table(["Models", "Slides", *names], rows)
    for level, title in (("all", "All slides pooled"), ("slide", "Per slide")):
        per_slide = level == "slide"
        lines += [f"### {title}", ""]
        lines += md.rows_table(
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
    ts = model_tile_scores(traw, classes, methods) if tiles else None
    ms = (
        model_cohort_scores(members, classes, list(dict.fromkeys(members["init"])))
        if len(members)
        else None
    )
    notes = md.Notes()
    lines = ["# Evaluation of a prediction run", ""]
    tile_note = "" if ts is not None else " No tile protocol (apply.tile_protocol is off)."
    lines.append(f"{md.classes_text(classes)} Models: {', '.join(methods)}.{tile_note}")
    lines.append("")
    if ts is not None and len(ts):
        lines += tile_cohort_markdown(ts, traw, classes, notes)
    elif ts is not None:
        lines += [
            "## Tile protocol (the paper's, Tables II-III, on this cohort)",
            "",
            "No result: no tile of the annotated slides was kept (patches.min_tissue, "
            "patches.min_label_frac) or scored.",
            "",
        ]
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
    md.write_markdown(lines, notes, settings, markdown)
    if figure is not None:
        from dsf.figures import evaluation_figure

        evaluation_figure(ts, cs, classes, panels, figure, panel_slides, ("models", "slides"))
    log.info("wrote %s, %s", markdown, slide_scores)
