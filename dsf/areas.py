"""Predicted area of each class per slide: one table over a set of class maps (`dsf areas`).

For every map of `dsf infer`, the area in mm² it gives each class and each class's share of
the mapped area (the pixels that got a class; 0 in the map is background or outside the
tissue), e.g. a cohort's tumour burden per slide. The pixel counts come from the map's JSON
(`class_pixels`, counted by `dsf infer` as it writes the map); a map written before dsf
recorded them is counted from its level 0, band by band (bounded memory).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsf.atomic import atomic_path, check_outputs, remove
from dsf.class_map import ClassMap, class_counts, damaged_map, open_map
from dsf.errors import ConfigError
from dsf.runner import run, setup_logging

log = logging.getLogger(__name__)

#: Map rows counted at a time when a map's JSON holds no counts.
COUNT_ROWS = 2048
#: A TSV column per foreground class and these quantities.
AREA_SUFFIX, SHARE_SUFFIX = "_mm2", "_pct"


def class_pixels(cmap: ClassMap) -> np.ndarray:
    """Pixels of each class index in the map's level 0, at its mpp (int64, one per class of
    the map, 0 first): the JSON's counts, or counted from the map when it has none (an
    older dsf's map)."""
    k = len(cmap.meta["classes"])
    recorded = cmap.meta.get("class_pixels")
    if recorded is not None:
        counts = np.asarray(recorded, np.int64)
        if counts.shape != (k,) or counts.sum() != cmap.width * cmap.height:
            raise damaged_map(
                cmap.path,
                f"its JSON's class_pixels {list(recorded)} do not count its {k} classes over "
                f"{cmap.width} x {cmap.height} px",
            )
        return counts
    log.info("%s: its JSON has no class_pixels (an older dsf): counting the map", cmap.path)
    counts = np.zeros(k, np.int64)
    for _, band in cmap.bands(COUNT_ROWS):
        if band.size and (top := int(band.max())) >= k:
            raise damaged_map(cmap.path, f"it holds class index {top} of {k} classes")
        counts += class_counts(band, k)
    return counts


def area_row(cmap: ClassMap, method: str | None = None) -> dict[str, Any]:
    """One slide's row: slide, init (`method`, a prediction run's model set, else the models'
    init), map mpp, mapped area and each foreground class's area (mm²) and share of the mapped
    area (%; empty when nothing was mapped)."""
    classes = list(cmap.meta["classes"])
    counts = class_pixels(cmap)
    px_mm2 = (cmap.mpp / 1000.0) ** 2
    mapped = int(counts[1:].sum())
    row: dict[str, Any] = {
        "slide": cmap.meta["slide"],
        "init": method or cmap.meta["init"],
        "mpp": cmap.mpp,
        "mapped_mm2": mapped * px_mm2,
    }
    for name, n in zip(classes[1:], counts[1:], strict=True):
        row[name + AREA_SUFFIX] = int(n) * px_mm2
    for name, n in zip(classes[1:], counts[1:], strict=True):
        row[name + SHARE_SUFFIX] = 100.0 * int(n) / mapped if mapped else math.nan
    return row


def areas_table(maps: list[Path], method: str | None = None) -> pd.DataFrame:
    """The rows of `maps` (each with its JSON beside it), in the order given, their init
    column `method` where given; the maps must predict the same classes (one table's
    columns)."""
    rows, first = [], None
    for path in maps:
        cmap = open_map(path)
        classes = list(cmap.meta["classes"])
        if first is None:
            first = (path, classes)
        elif classes != first[1]:
            raise ConfigError(
                f"class maps {first[0]} and {path} predict different classes ({first[1][1:]} "
                f"vs {classes[1:]}): one areas table holds the maps of one set of models"
            )
        rows.append(area_row(cmap, method))
        log.info(
            "%s: %.4g mm² mapped%s",
            cmap.meta["slide"],
            rows[-1]["mapped_mm2"],
            "".join(f", {c} {rows[-1][c + SHARE_SUFFIX]:.1f}%" for c in classes[1:]),
        )
    return pd.DataFrame(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf areas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--maps", nargs="+", required=True, type=Path, help="class maps of dsf infer (.tiff)"
    )
    p.add_argument("--out", required=True, type=Path, help="table to write (.tsv)")
    p.add_argument(
        "--method",
        help="the rows' init column (default: the models' init; a prediction run gives its "
        "model set's name, as its score tables do)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf areas`: class maps -> one TSV of each slide's predicted area per class."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        check_outputs([args.out], args.maps)
        remove(args.out)  # a failed rerun leaves no earlier table looking current
        table = areas_table(args.maps, args.method)
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="")
        log.info("%d slides -> %s", len(table), args.out)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
