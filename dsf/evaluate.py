"""Evaluation against the annotations (DESIGN section 4, Evaluate; paper IV-C and Tables II-IV).

Two protocols, each one confusion matrix per slide (`dsf.metrics.confusion`: rows the true
class 1..K, columns the predicted class 1..K and 'predicted background'):

- `tiles`, the paper's: fold k's model predicts the centre target block of every kept tile of
  fold k's labelled validation slides (argmax over the foreground classes, as model selection
  does). The paper's F1 is the micro F1 of a region (slide) averaged over the fold's regions.
  A store of a slide the model trained or was selected on is refused.
- `slide`: a whole-slide class map of `dsf infer` against the ground truth at the map's mpp,
  unlabelled pixels ignored, read in row bands so memory stays flat in slide size. Only a map
  made by the fold model that did not see the slide (out of fold) is accepted, or, in a
  prediction run (`apply.models`), a map of models trained before on other slides.

`dsf evaluate tables` aggregates the per-slide TSVs into the tables (`dsf.tables`) and the
figure (`dsf.figures`); `dsf evaluate cohort` does so for a prediction run, over its slides.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dsf import __version__
from dsf.atomic import atomic_path
from dsf.class_map import ClassMap, add_map_arguments, open_map
from dsf.config import add_section_arguments, given, section_from_args, section_schema
from dsf.errors import ConfigError
from dsf.metrics import confusion, scores
from dsf.model_sets import trained_on
from dsf.runner import run, setup_logging
from dsf.tile_labels import LabelledStore, pair_stores

log = logging.getLogger(__name__)

#: Name of the confusion column of labelled pixels predicted as background (0, not predicted).
NONE = "bg"
#: Map pixels scored at a time (confusion() makes a few int64 copies of the labelled ones).
SCORE_PIXELS = 1 << 22


# -- per-slide rows ---------------------------------------------------------------------------


def confusion_columns(classes: list[str]) -> list[str]:
    """`cm_{true}_{pred}` column names of a (K, K + 1) confusion, row-major; `classes` with the
    ignore class at index 0, the last column of each row is `cm_{true}_bg`."""
    fg = list(classes[1:])
    return [f"cm_{t}_{p}" for t in fg for p in [*fg, NONE]]


def one_vs_rest_accuracy(cm: np.ndarray) -> float:
    """The paper's accuracy, (TP + TN) / all, per class one-vs-rest, averaged over the K classes.

    Where no labelled pixel is predicted background (the tile protocol) this is
    1 - 2 (1 - micro F1) / K, which is how the paper's Table III (0.9180 for BCSS, K = 5)
    relates to its Table II (0.7949).
    """
    k = cm.shape[0]
    total = cm.sum()
    if not total:
        return float("nan")
    tp = np.diag(cm[:, :k]).astype(np.float64)
    fn = cm.sum(1) - tp
    fp = cm[:, :k].sum(0) - tp
    return float(np.mean((total - fn - fp) / total))


def score_row(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Counts and scores of one confusion as TSV columns (F1 NaN where a class is absent from
    both truth and prediction)."""
    s = scores(cm)
    row: dict[str, Any] = {"n_pixels": int(cm.sum())}
    row |= dict(zip(confusion_columns(classes), (int(v) for v in cm.ravel()), strict=True))
    row |= {
        "pixel_accuracy": s["accuracy"],
        "micro_f1": s["micro_f1"],
        "macro_f1": s["macro_f1"],
        "paper_accuracy": one_vs_rest_accuracy(cm),
    }
    row |= {f"f1_{c}": float(f) for c, f in zip(classes[1:], s["f1"], strict=True)}  # type: ignore[arg-type]
    return row


def confusion_of(row: pd.Series | dict[str, Any], classes: list[str]) -> np.ndarray:
    """The (K, K + 1) confusion back from a row written by `score_row`."""
    k = len(classes) - 1
    values = [int(row[c]) for c in confusion_columns(classes)]
    return np.asarray(values, np.int64).reshape(k, k + 1)


def classes_of(columns: list[str]) -> list[str]:
    """Class names (ignore first) from the `f1_*` columns of a per-slide table."""
    return ["ignore", *(c[3:] for c in columns if c.startswith("f1_"))]


def with_provenance(df: pd.DataFrame, settings: dict[str, Any]) -> pd.DataFrame:
    """`df` with the columns `dsf_version` and `settings` (the config sections that produced
    it, as JSON), like every other artifact's `dsf_version` and `settings`."""
    return df.assign(dsf_version=__version__, settings=json.dumps(settings, sort_keys=True))


def write_tsv(df: pd.DataFrame, out: Path) -> None:
    """A TSV written atomically (NaN as `nan`, so an empty score is visible, never a 0);
    counts (`n_*`, `cm_*`) stay integers; scores to 10 significant digits, so means taken of
    the per-slide files agree with the exact ones far below the tables' 4 decimals."""
    df = df.copy()
    for c in df.columns:
        if str(c).startswith(("n_", "cm_")):
            df[c] = pd.to_numeric(df[c]).astype("Int64")
    with atomic_path(out) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep="nan", float_format="%.10g")


# -- tile protocol ----------------------------------------------------------------------------


def check_not_trained_on(cmap: ClassMap, slide: str) -> bool:
    """Refuse to score a map of a slide that one of its models was fitted or selected on (by
    slide id, as the tile protocol refuses its store): that is not validation. A model file
    no longer at its recorded path is skipped with a warning. True when every model of the map
    was found and names its training slides (the check is complete)."""
    from dsf import checkpoints

    paths = list(map(Path, cmap.meta.get("models", [])))
    complete = bool(paths)
    for path in paths:
        if not path.is_file():
            log.warning(
                "%s: model %s of the map is gone: its training slides are unchecked", slide, path
            )
            complete = False
            continue
        seen = trained_on(checkpoints.load(path, mmap=True))
        complete = complete and bool(seen)
        if slide in seen:
            raise ConfigError(
                f"slide {slide!r} is training data of {path} (its fit or selection slides): "
                "scoring it would not be validation; drop the slide's annotation from the "
                "prediction run, or map it with models that did not train on it"
            )
    return complete


def check_validation_stores(
    slides: list[str], meta: dict[str, Any], model: Path, folds: pd.DataFrame | None = None
) -> None:
    """Refuse slides the model was fitted or selected on, and (with folds.tsv) slides outside
    the model's validation fold: the tile protocol reads the validation fold only."""
    seen = trained_on(meta)
    if not seen:
        log.warning("%s names no fit/selection slides: cannot check for training data", model)
    bad = sorted(set(slides) & seen)
    if bad:
        raise ConfigError(
            f"slides {bad} are training data of {model} (its fit or selection slides): the tile "
            f"protocol evaluates fold {meta.get('fold')}'s validation slides only; give their "
            "stores to the model of the fold they belong to"
        )
    if folds is not None and "fold" in meta:
        fold_of = dict(zip(folds["slide"], folds["fold"], strict=True))
        unknown = sorted(s for s in slides if s not in fold_of)
        if unknown:
            raise ConfigError(f"slides {unknown} are not in folds.tsv; rerun the folds stage")
        other = sorted(s for s in slides if int(fold_of[s]) != int(meta["fold"]))
        if other:
            raise ConfigError(
                f"slides {other} are not in validation fold {meta['fold']} of {model} "
                f"(folds.tsv puts them in {sorted({int(fold_of[s]) for s in other})}); "
                "evaluate each slide with its own fold's model"
            )


def _check_geometry(attrs: dict[str, Any], predictor: Any, store: Path) -> None:
    """The store must be cut with the geometry and classes the model was fine-tuned on."""
    from dsf.slide import tolerance
    from dsf.stores import store_geometry

    got = store_geometry(attrs)
    want = (predictor.scale, predictor.block, predictor.target_mpp)
    # within the tolerance the store was cut with (patches.mpp_tolerance), as a slide level
    # serves (models before 2026-12-06 hold an actual mpp)
    tol = tolerance(attrs.get("settings", {}).get("mpp_tolerance"))
    if got[:2] != want[:2] or not math.isclose(got[2], want[2], rel_tol=tol):
        raise ConfigError(
            f"patch store {store} has scale, block, target mpp {got}, the model {want}: "
            "evaluate with stores cut by the same patches settings as fine-tuning"
        )


def _check_classes(attrs: dict[str, Any], predictor: Any, store: Path) -> None:
    """The labels store must name the classes the model was fine-tuned on."""
    names = attrs.get("class_names")
    if names is not None and list(names) != list(predictor.classes):
        raise ConfigError(
            f"labels store {store} has classes {list(names)}, the model {predictor.classes}: "
            "labels.classes must be the same for tile-labels, finetune and evaluate"
        )


def tile_confusion(predictor: Any, store: LabelledStore, batch_size: int) -> tuple[int, np.ndarray]:
    """(labelled tiles, confusion) of the centre blocks of one slide's labelled tiles."""
    from dsf.stores import open_store, read_rows, store_array

    g, lab = open_store(store.tiles), open_store(store.labels, kind="labels")
    _check_geometry(dict(g.attrs), predictor, store.tiles)
    _check_classes(dict(lab.attrs), predictor, store.labels)
    k = len(predictor.classes) - 1
    b, scale = predictor.block, predictor.scale
    c0 = b * (scale - 1) // 2  # the centre b x b block of the scale*b tile (as LabelledTiles)
    centre = slice(c0, c0 + b)
    n = int(lab.attrs["n_tiles"])
    cm = np.zeros((k, k + 1), np.int64)
    # reads that fail name the store, the tiles and the fix
    contexts, tiles = (store_array(g, a, store.tiles) for a in ("context", "tiles"))
    labels = store_array(lab, "labels", store.labels)
    tile_of = store_array(lab, "index", store.labels)[:]
    # a bar on a terminal only (a job's log gets the per-slide line)
    for i0 in tqdm(range(0, n, batch_size), desc=store.slide, unit="batch", disable=None):
        i1 = min(n, i0 + batch_size)
        which = tile_of[i0:i1]
        ctx = torch.from_numpy(read_rows(contexts, which))
        tgt = torch.from_numpy(np.ascontiguousarray(read_rows(tiles, which, centre, centre)))
        lab_blocks = labels[i0:i1, centre, centre]
        probs = predictor.probabilities(ctx, tgt)
        if not bool(torch.isfinite(probs).all()):  # argmax would take NaN for a class
            amp = predictor.amp is not None
            raise ConfigError(
                f"the model gave NaN or infinite probabilities on the tiles of {store.tiles}: "
                "its weights hold NaN"
                + (", or autocast overflowed" if amp else "")
                + "; check the model"
                + (", or set evaluate.amp to false (--no-amp)" if amp else "")
            )
        pred = probs.argmax(1).cpu().numpy() + 1  # over the foreground classes
        cm += confusion(pred, lab_blocks, k)
    return n, cm


def evaluate_tiles(
    predictor: Any,
    stores: list[LabelledStore],
    batch_size: int,
    model: Path,
    folds: pd.DataFrame | None = None,
    method: str | None = None,
) -> pd.DataFrame:
    """One row per store: slide, fold, init, fraction, model, n_tiles, confusion counts and
    scores. `method` names the rows (default the model's init)."""
    meta = predictor.meta
    slides = [s.slide for s in stores]
    check_validation_stores(slides, meta, model, folds)
    rows = []
    for slide, store in zip(slides, stores, strict=True):
        n, cm = tile_confusion(predictor, store, batch_size)
        row = {
            "slide": slide,
            "fold": int(meta.get("fold", -1)),
            "init": method or predictor.init,
            "fraction": float(meta.get("fraction", 1.0)),
            "model": str(model),
            "n_tiles": n,
        } | score_row(cm, predictor.classes)
        log.info(
            "%s: %d tiles, %d labelled px, micro F1 %.4f",
            slide,
            n,
            row["n_pixels"],
            row["micro_f1"],
        )
        rows.append(row)
    if not rows:
        log.warning(
            "%s: no labelled validation store of fold %s to evaluate: the tables show n/a",
            model,
            meta.get("fold"),
        )
        k = len(predictor.classes) - 1
        empty = score_row(np.zeros((k, k + 1), np.int64), predictor.classes)
        columns = ["slide", "fold", "init", "fraction", "model", "n_tiles"]
        return pd.DataFrame(columns=[*columns, *empty])
    return pd.DataFrame(rows)


# -- whole-slide protocol ---------------------------------------------------------------------


def check_out_of_fold(cmap: ClassMap, slide: str, folds: pd.DataFrame) -> int:
    """The slide's validation fold; refuse a map made by any model that trained on the slide
    (every fold model but the slide's own fold's)."""
    row = folds.loc[folds["slide"] == slide, "fold"]
    if row.empty:
        raise ConfigError(f"slide {slide!r} is not in folds.tsv; rerun the folds stage")
    fold = int(row.iloc[0])
    used = sorted({int(f) for f in cmap.meta["folds"]})
    if used != [fold]:
        raise ConfigError(
            f"map {cmap.path} of slide {slide!r} was made by the models of folds {used} "
            f"(routing {cmap.meta['routing']!r}), but the slide is in validation fold {fold}, so "
            "the others trained on it: evaluate out-of-fold maps only (infer routing out_of_fold)"
        )
    return fold


def map_confusion(cmap: ClassMap, labels: Any, slide_mpp: float, rows: int) -> np.ndarray:
    """Confusion of a class map against the labels at the map's mpp, over labelled pixels,
    one band of `rows` map rows at a time. Map pixel (i, j) covers the level-0 square at
    (j, i) * mpp / slide_mpp (DESIGN section 3, infer)."""
    k = len(cmap.meta["classes"]) - 1
    f = cmap.mpp / slide_mpp
    cm = np.zeros((k, k + 1), np.int64)
    for r0, band in cmap.bands(rows):
        truth = labels.read(0.0, r0 * f, band.shape[1], band.shape[0], cmap.mpp)
        step = max(1, SCORE_PIXELS // max(1, band.shape[1]))  # bounds confusion()'s int64 copies
        for s in range(0, band.shape[0], step):
            cm += confusion(band[s : s + step], truth[s : s + step], k)
    return cm


def panel(cmap: ClassMap, slide: Any, labels: Any, size: int) -> dict[str, np.ndarray]:
    """Thumbnail, truth and prediction of the whole slide at one small mpp (longest side about
    `size` px); the prediction sampled from the coarsest map level at least that fine."""
    w0, h0 = slide.dimensions
    mpp = max(cmap.mpp, max(w0, h0) * slide.mpp / size)
    thumb = slide.thumbnail(mpp)
    th, tw = thumb.shape[:2]
    truth = labels.read(0.0, 0.0, tw, th, mpp)
    fine = [lv for lv in range(len(cmap.levels)) if cmap.level_mpp(lv) <= mpp * 1.001]
    level = max(fine, key=cmap.level_mpp) if fine else 0
    step = mpp / cmap.level_mpp(level)
    rows = np.floor((np.arange(th) + 0.5) * step).astype(np.int64)
    cols = np.floor((np.arange(tw) + 0.5) * step).astype(np.int64)
    pred = cmap.sample(level, rows, cols)
    return {"thumbnail": thumb, "truth": truth, "prediction": pred, "mpp": np.float64(mpp)}


def evaluate_slide(
    cmap: ClassMap,
    slide: Any,
    labels: Any,
    folds: pd.DataFrame | None,
    classes: list[str],
    band_rows: int,
    method: str | None = None,
) -> pd.DataFrame:
    """One row: slide, fold, init, fraction, routing, mpp, confusion counts and scores.

    A map of this run's fold models must be out of fold (checked against `folds`, or without
    them against its models' fit and selection slides, where they can be read); one of
    models given by `apply.models` (routing `given`, a prediction run) is scored as it is, fold
    -1. Neither is scored where one of its models lists the slide among its fit or selection
    slides. `method`
    names the row (default the models' init)."""
    sid = slide.slide_id
    if str(cmap.meta["slide"]) != sid:
        raise ConfigError(f"map {cmap.path} is of slide {cmap.meta['slide']!r}, not {sid!r}")
    if list(cmap.meta["classes"]) != list(classes):
        raise ConfigError(
            f"map {cmap.path} has classes {cmap.meta['classes']}, labels.classes (option "
            f"--classes) is {classes}: "
            "predict and evaluate with the same classes"
        )
    # no map is scored on a slide one of its models fitted or selected on, whatever folds.tsv
    # says now (rebuilt with another seed or k after the models, or a map made by hand)
    checked = check_not_trained_on(cmap, sid)
    used = sorted({int(f) for f in cmap.meta["folds"]})
    if cmap.meta["routing"] == "given":
        fold = -1
    elif folds is None and checked:  # by hand: the models themselves say it is out of fold
        fold = used[0] if len(used) == 1 else -1
    elif folds is None:
        raise ConfigError(
            f"map {cmap.path} of slide {sid!r} is of this run's fold models (routing "
            f"{cmap.meta['routing']!r}), which are not at their recorded paths or name no "
            "training slides: give --folds (folds.tsv) to check it is out of fold"
        )
    else:
        fold = check_out_of_fold(cmap, sid, folds)
    cm = map_confusion(cmap, labels, slide.mpp, band_rows)
    row = {
        "slide": sid,
        "fold": fold,
        "init": method or str(cmap.meta["init"]),
        "fraction": float(cmap.meta["fraction"]),
        "routing": str(cmap.meta["routing"]),
        "models": ";".join(str(m) for m in cmap.meta.get("models", [])),
        "mpp": cmap.mpp,
    } | score_row(cm, classes)
    if not row["n_pixels"]:
        log.warning("%s: no labelled pixel under the map: its scores are n/a", sid)
    log.info(
        "%s (%s): %d labelled px, pixel accuracy %.4f, macro F1 %.4f",
        sid,
        row["init"],
        row["n_pixels"],
        row["pixel_accuracy"],
        row["macro_f1"],
    )
    return pd.DataFrame([row])


# -- command line -----------------------------------------------------------------------------


#: the evaluate settings each mode reads (the others, shown by every mode, misled: `dsf evaluate
#: tables --device cuda` did nothing); gpus is the workflow's
_MODE_SETTINGS = {
    "tiles": ("batch_size", "device", "amp"),
    "slide": ("band_rows", "panel_size"),
    "tables": ("panel_slides",),
    "cohort": ("panel_slides",),
}


def _add_mode_settings(parser: argparse.ArgumentParser, mode: str) -> None:
    """The evaluate settings of one mode as options, without those it does not read."""
    keys = section_schema("evaluate").get("properties", {})
    add_section_arguments(
        parser, "evaluate", skip=tuple(k for k in keys if k not in _MODE_SETTINGS[mode])
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")

    t = sub.add_parser(
        "tiles",
        help="tile protocol: one fold model on its validation stores",
        description="tile protocol: one fold model on its validation stores",
    )
    t.add_argument("--model", required=True, type=Path, help="model.pt of fold k")
    t.add_argument(
        "--stores", nargs="*", default=[], type=Path, help="labelled validation stores of fold k"
    )
    t.add_argument(
        "--label-stores",
        nargs="*",
        default=[],
        type=Path,
        help="their labels stores (.labels.zarr of `dsf tile-labels`)",
    )
    t.add_argument("--folds", type=Path, help="folds.tsv: also refuse stores of other folds")
    t.add_argument("--method", help="the rows' method name (default: the model's init)")
    t.add_argument("--out", required=True, type=Path, help="per-slide TSV to write")
    _add_mode_settings(t, "tiles")

    s = sub.add_parser(
        "slide",
        help="whole-slide protocol: one class map against its labels",
        description="whole-slide protocol: one class map against its labels",
    )
    add_map_arguments(s)
    s.add_argument("--slide", required=True, type=Path, help="slide file")
    s.add_argument("--slide-id", help="slide id (default: file stem)")
    s.add_argument("--sheet-mpp", type=float, help="level-0 um/px from the sheet (wins)")
    from dsf.annotations import add_annotation_argument
    from dsf.slide import add_tolerance_argument

    add_tolerance_argument(s)
    add_annotation_argument(s)
    s.add_argument(
        "--folds",
        type=Path,
        help="folds.tsv; without it a fold model's map is checked against its models' training "
        "slides (not for maps of apply.models' models)",
    )
    s.add_argument("--method", help="the row's method name (default: the models' init)")
    s.add_argument("--out", required=True, type=Path, help="one-row TSV to write")
    s.add_argument("--panel", type=Path, help="thumbnail/truth/prediction .npz for the figure")
    _add_mode_settings(s, "slide")
    add_section_arguments(s, "labels", skip=("masks",))  # the workflow's file patterns

    a = sub.add_parser(
        "tables",
        help="aggregate per-slide TSVs into tables and the figure",
        description="aggregate per-slide TSVs into tables and the figure",
    )
    a.add_argument("--tiles", nargs="*", default=[], type=Path, help="tile-protocol TSVs")
    a.add_argument("--slides", nargs="*", default=[], type=Path, help="whole-slide TSVs")
    a.add_argument("--panels", nargs="*", default=[], type=Path, help="panel .npz files")
    a.add_argument("--folds", required=True, type=Path, help="folds.tsv (the fold columns)")
    a.add_argument("--methods", nargs="*", default=[], help="inits, in table order")
    a.add_argument("--fractions", nargs="*", default=[], type=float, help="label fractions")
    a.add_argument("--markdown", required=True, type=Path, help="tables.md")
    a.add_argument("--tile-scores", required=True, type=Path, help="tile_scores.tsv")
    a.add_argument("--slide-scores", required=True, type=Path, help="slide_scores.tsv")
    a.add_argument("--figure", type=Path, help="figure.png")
    _add_mode_settings(a, "tables")

    c = sub.add_parser(
        "cohort",
        help="a prediction run's whole-slide TSVs: tables over slides and the figure",
        description="a prediction run's whole-slide TSVs: tables over slides and the figure",
    )
    c.add_argument("--slides", nargs="+", required=True, type=Path, help="whole-slide TSVs")
    c.add_argument("--panels", nargs="*", default=[], type=Path, help="panel .npz files")
    c.add_argument(
        "--model-slides",
        nargs="*",
        default=[],
        type=Path,
        help="whole-slide TSVs of each model of a set alone (apply.each_model)",
    )
    c.add_argument(
        "--tiles",
        nargs="*",
        default=[],
        type=Path,
        help="tile-protocol TSVs of each model on the annotated stores (apply.tile_protocol)",
    )
    c.add_argument("--tile-scores", type=Path, help="tile_scores.tsv (with --tiles)")
    c.add_argument("--methods", nargs="*", default=[], help="model sets, in table order")
    c.add_argument("--markdown", required=True, type=Path, help="tables.md")
    c.add_argument("--slide-scores", required=True, type=Path, help="slide_scores.tsv")
    c.add_argument("--figure", type=Path, help="figure.png")
    _add_mode_settings(c, "cohort")
    return p


def _tiles(args: argparse.Namespace, st: dict[str, Any]) -> None:
    from dsf.devices import use_device
    from dsf.folds import read_folds
    from dsf.predict import load_predictor

    predictor = load_predictor(args.model, use_device(st["device"], "evaluate.device"), st["amp"])
    folds = read_folds(args.folds) if args.folds else None
    stores = pair_stores(list(args.stores), list(args.label_stores))
    df = evaluate_tiles(predictor, stores, st["batch_size"], args.model, folds, args.method)
    write_tsv(with_provenance(df, {"evaluate": st}), args.out)


def _slide(args: argparse.Namespace, st: dict[str, Any]) -> None:
    from dsf.annotations import open_labels
    from dsf.folds import read_folds
    from dsf.label_settings import check_base_painted
    from dsf.slide import open_slide

    label_st = section_from_args(args, "labels")
    cmap = open_map(args.map, args.map_json)
    if not given(args, "labels", "classes"):  # by hand: the map's classes, not the schema's
        label_st["classes"] = [str(c) for c in cmap.meta["classes"]]
    check_base_painted(label_st, args.labels, "evaluate slide")
    with open_slide(
        args.slide, args.sheet_mpp, args.slide_id, mpp_tolerance=args.mpp_tolerance
    ) as slide:
        labels = open_labels(
            args.labels,
            slide.slide_id,
            slide.dimensions,
            slide.mpp,
            label_st,
            slide.bounds,
        )
        folds = read_folds(args.folds) if args.folds else None
        df = evaluate_slide(
            cmap, slide, labels, folds, label_st["classes"], st["band_rows"], args.method
        )
        if args.panel:
            pan = panel(cmap, slide, labels, st["panel_size"])
            meta = {"slide": slide.slide_id, "init": str(df["init"].iloc[0])}
            with atomic_path(args.panel) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh, **pan, classes=np.asarray(label_st["classes"]), meta=json.dumps(meta)
                )
    write_tsv(with_provenance(df, {"evaluate": st, "labels": label_st}), args.out)


def _table_args(args: argparse.Namespace, st: dict[str, Any]) -> dict[str, Any]:
    """What `tables` and `cohort` both pass on: the whole-slide results and the outputs."""
    return {
        "slides": list(args.slides),
        "panels": list(args.panels),
        "methods": list(args.methods),
        "markdown": args.markdown,
        "slide_scores": args.slide_scores,
        "figure": args.figure,
        "panel_slides": st["panel_slides"],
        "settings": {"evaluate": st},
    }


def _tables(args: argparse.Namespace, st: dict[str, Any]) -> None:
    from dsf.folds import read_folds
    from dsf.tables import build_tables

    build_tables(
        tiles=list(args.tiles),
        folds=read_folds(args.folds),
        fractions=list(args.fractions),
        tile_scores=args.tile_scores,
        **_table_args(args, st),
    )


def _cohort(args: argparse.Namespace, st: dict[str, Any]) -> None:
    from dsf.cohort_tables import build_cohort_tables

    if args.tiles and args.tile_scores is None:
        raise ConfigError("--tiles needs --tile-scores, the TSV to write their scores to")
    build_cohort_tables(
        model_slides=list(args.model_slides),
        tiles=list(args.tiles),
        tile_scores=args.tile_scores,
        **_table_args(args, st),
    )


def main(argv: list[str] | None = None) -> int:
    """`dsf evaluate tiles|slide|tables|cohort`."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        st = section_from_args(args, "evaluate")
        modes = {"tiles": _tiles, "slide": _slide, "tables": _tables, "cohort": _cohort}
        modes[args.mode](args, st)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
