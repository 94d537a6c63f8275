"""The evaluation figure (DESIGN section 4, Evaluate: per-class bars and overlays).

Top row: per-class F1 per method, mean over folds with the std as error bars, for the tile
protocol (at the largest label fraction) and the whole-slide protocol. Below: for a few labelled
slides, the thumbnail, the ground truth and each method's prediction over it, coloured by
`dsf.colours.class_colours`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsf.atomic import atomic_path
from dsf.colours import class_colours, tint

log = logging.getLogger(__name__)


def overlay(thumbnail: np.ndarray, classes: np.ndarray, n: int, alpha: float = 0.5) -> np.ndarray:
    """Class indices blended over an RGB thumbnail (`dsf.colours.tint`); index 0 leaves the
    thumbnail as it is."""
    out = tint(thumbnail, np.clip(classes, 0, n - 1), alpha)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


#: Bar colours, given to methods in order of first appearance: dark and muted tones that no
#: class colour (`dsf.colours.CLASS_COLOURS`) comes near, since the figure shows both (a
#: method's bars in the TUM colour read as the tumour class).
PALETTE = ["#4d4d4d", "#332288", "#bdbdbd", "#8c510a", "#00443a", "#40004b", "#1a1a1a"]


def _bars(
    ax: Any, df: pd.DataFrame, classes: list[str], title: str, colours: dict[str, str]
) -> None:
    """Grouped bars: classes on x, one bar per method (mean rows, std rows as error bars), each
    method in its colour of `colours`, the same in every panel."""
    k = len(classes) - 1
    methods = list(dict.fromkeys(df["init"])) if len(df) else []
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_xticks(range(k), classes[1:], fontsize=8)
    ax.set_xlim(-0.5, k - 0.5)
    if not methods:
        ax.text(0.5, 0.5, "n/a: no results", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        sub = df[df["init"] == method]
        mean = sub[sub["fold"] == "mean"]
        std = sub[sub["fold"] == "std"]
        h = np.array([float(mean[f"f1_{c}"].iloc[0]) if len(mean) else np.nan for c in classes[1:]])
        e = np.array([float(std[f"f1_{c}"].iloc[0]) if len(std) else np.nan for c in classes[1:]])
        x = np.arange(k) - 0.4 + width * (j + 0.5)
        ok = np.isfinite(h)
        colour = colours[method]
        label = method if ok.any() else f"{method} (n/a)"
        ax.bar(x[ok], h[ok], width, label=label, color=colour)
        err = ok & np.isfinite(e)  # no error bar where the std is n/a (one fold)
        ax.errorbar(x[err], h[err], yerr=e[err], fmt="none", ecolor="black", capsize=2)
        for xi in x[~ok]:
            ax.text(xi, 0.02, "n/a", rotation=90, fontsize=7, ha="center", va="bottom")
    ax.legend(fontsize=7, frameon=False)


def _load_panels(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """slide -> {thumbnail, truth, classes, predictions: {init: array}}."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            entry = out.setdefault(
                meta["slide"],
                {
                    "thumbnail": z["thumbnail"],
                    "truth": z["truth"],
                    "classes": list(z["classes"]),
                    "predictions": {},
                },
            )
            entry["predictions"][meta["init"]] = z["prediction"]
    return out


def evaluation_figure(
    tile_scores: pd.DataFrame | None,
    slide_scores: pd.DataFrame,
    classes: list[str],
    panels: list[Path],
    out: Path,
    panel_slides: int,
    over: tuple[str, str] = ("folds", "folds"),
) -> None:
    """Write figure.png: per-class F1 bars of both protocols, mean (std) over `over` (tile,
    whole-slide: folds in the usual run; models and slides in a prediction run), and overlay
    panels. Without `tile_scores` the whole-slide bars take the top row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tile = tile_scores if tile_scores is not None else pd.DataFrame()
    frac = None
    if len(tile):
        have = tile[(tile["fold"] == "mean") & tile["f1"].notna()]
        frac = float(have["fraction"].max()) if len(have) else float(tile["fraction"].max())
        tile = tile[tile["fraction"] == frac]
    slide = slide_scores.rename(columns={"level": "_level"}) if len(slide_scores) else slide_scores
    if len(slide):
        slide = slide.assign(fold=slide["_level"].where(slide["_level"] != "fold", slide["fold"]))
        slide = slide[slide["_level"].isin(["mean", "std"])]
    shown = _load_panels(panels)
    slides = sorted(shown)[:panel_slides]
    inits = sorted({i for s in slides for i in shown[s]["predictions"]})
    ncols = max(2, 2 + len(inits))
    nrows = 1 + len(slides)
    fig = plt.figure(figsize=(max(10.0, 3.2 * ncols), 3.0 * nrows + 0.8), layout="constrained")
    grid = fig.add_gridspec(nrows, 2 * ncols)
    frac_txt = f", label fraction {frac * 100:g}%" if frac is not None else ""
    slide_title = f"Whole-slide protocol, mean (std) over {over[1]}"
    frames = [slide] if tile_scores is None else [tile, slide]
    methods = dict.fromkeys(m for f in frames if len(f) for m in f["init"])
    by_method = {m: PALETTE[j % len(PALETTE)] for j, m in enumerate(methods)}
    if tile_scores is None:
        _bars(fig.add_subplot(grid[0, :]), slide, classes, slide_title, by_method)
    else:
        tile_title = f"Tile protocol{frac_txt}, mean (std) over {over[0]}"
        _bars(fig.add_subplot(grid[0, :ncols]), tile, classes, tile_title, by_method)
        _bars(fig.add_subplot(grid[0, ncols:]), slide, classes, slide_title, by_method)
    n = len(classes)
    for r, sid in enumerate(slides, start=1):
        entry = shown[sid]
        images = [
            ("thumbnail", entry["thumbnail"]),
            ("truth", overlay(entry["thumbnail"], entry["truth"], n)),
        ]
        for init in inits:
            pred = entry["predictions"].get(init)
            images.append((init, None if pred is None else overlay(entry["thumbnail"], pred, n)))
        for c, (name, img) in enumerate(images):
            ax = fig.add_subplot(grid[r, 2 * c : 2 * c + 2])
            ax.set_axis_off()
            ax.set_title(f"{sid}: {name}", fontsize=8)
            if img is None:
                ax.text(0.5, 0.5, "n/a: no map", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(img)
    colours = class_colours(n) / 255.0
    fig.legend(
        handles=[Patch(color=colours[i], label=classes[i]) for i in range(1, n)],
        loc="outside lower center",
        ncols=n - 1,
        fontsize=8,
        frameon=False,
    )
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    log.info("wrote %s (%d overlay rows)", out, len(slides))
