"""Markdown for the evaluation tables: cells of scores and of mean (std) with numbered footnotes
where a value is n/a (never a 0 for want of data), tables of rows, and tables.md written with the
version and settings that made it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsf import __version__
from dsf.atomic import atomic_path


class Notes:
    """Numbered markdown footnotes, one per distinct reason."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        """The footnote mark of `text`, numbered at its first use."""
        if text not in self.texts:
            self.texts.append(text)
        return f"[^{self.texts.index(text) + 1}]"

    def render(self) -> list[str]:
        """The footnotes' lines, in the order they were first used."""
        return [f"[^{i}]: {t}" for i, t in enumerate(self.texts, 1)]


def num(v: Any) -> str:
    """A score with four decimals."""
    return f"{float(v):.4f}"


def finite(v: Any) -> bool:
    """Whether `v` is a finite number (None, NaN and text are not)."""
    try:
        return bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


def cell(v: Any, notes: Notes, why: str) -> str:
    """A score, or n/a with the footnote `why`."""
    return num(v) if finite(v) else "n/a" + notes.ref(why)


def mean_std_cell(
    mean: Any,
    std: Any,
    notes: Notes,
    why: str,
    over: str = "folds",
    of: Sequence[Any] | None = None,
) -> str:
    """`mean (std)`; n/a with a footnote for a missing mean, or a std of fewer than two `over`.
    `of`, the values averaged (NaN where a fold, slide or model has no such score: a class it
    lacks), adds a footnote when the mean is over only some of them."""
    if not finite(mean):
        return "n/a" + notes.ref(why)
    sd = (
        num(std)
        if finite(std)
        else "n/a" + notes.ref(f"std (ddof 1) needs results of at least two {over}")
    )
    part = ""
    if of is not None:
        n = sum(1 for v in of if finite(v))
        if 0 < n < len(of):
            part = notes.ref(
                f"over the {n} of {len(of)} {over} that have this score (the others lack the "
                "class in both truth and prediction, or have no result)"
            )
    return f"{num(mean)} ({sd}){part}"


def count(n: int, noun: str) -> str:
    """`1 slide`, `2 slides`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def pct(frac: float) -> str:
    """A label fraction as a percentage: 0.1 -> `10%`."""
    return f"{frac * 100:g}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table (lines, a blank one last)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def rows_table(
    rows: pd.DataFrame,
    header: list[str],
    lead: Callable[[pd.Series], list[str]],
    cols: list[str],
    why: Callable[[pd.Series], str],
    notes: Notes,
) -> list[str]:
    """A markdown table of score rows: `lead(row)` cells, then one cell per metric of `cols`
    (n/a with the footnote `why(row)` where it is undefined)."""
    body = [lead(r) + [cell(r[c], notes, why(r)) for c in cols] for _, r in rows.iterrows()]
    return table(header, body)


def classes_text(classes: list[str]) -> str:
    """The classes line of a table's caption (index 0 is never scored)."""
    return f"Classes: {', '.join(classes[1:])} (index 0, {classes[0]}, is unlabelled and ignored)."


def write_markdown(
    lines: list[str], notes: Notes, settings: dict[str, Any], markdown: Path
) -> None:
    """tables.md: the sections, their footnotes, and the version and settings that made it."""
    made = f"Made by dsf {__version__}; settings: `{json.dumps(settings, sort_keys=True)}`"
    with atomic_path(markdown) as tmp:
        tmp.write_text("\n".join([*lines, *notes.render(), "", made]).rstrip() + "\n")
