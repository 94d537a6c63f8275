"""The slide sheet: one row per slide, validated, with paths resolved (DESIGN section 3).

Kept out of the Snakefile so it is tested like any other code and used by hand the same way.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd

from dsf.config import load_schema
from dsf.errors import ConfigError

COLUMNS = ("slide", "path", "mpp", "labels", "group", "fold")


def _clean(value: Any) -> Any:
    """Empty cells are None; floats that are whole numbers stay as read (pandas NaN -> None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    return os.path.normpath(path if path.is_absolute() else base / path)


def read_sheet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a slide sheet; the index is the slide id.

    Errors name the sheet, the row and the column: a missing or unknown column, a duplicate slide
    id, a value that breaks `workflow/schemas/slides.schema.yaml`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"slide sheet {path} not found; set config key `slides`")
    try:
        # only whole lines starting with '#' are comments: a '#' inside a path is part of it
        with open(path, encoding="utf-8-sig") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.startswith("#")]
        df = pd.read_csv(io.StringIO("".join(lines)), sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"slide sheet {path} is not a valid TSV: {exc}") from exc
    cols = [c.strip() for c in lines[0].rstrip("\n").split("\t")]
    df.columns = cols
    dup_cols = sorted({c for c in cols if cols.count(c) > 1})
    if dup_cols:
        raise ConfigError(f"slide sheet {path}: column(s) {dup_cols} appear more than once")
    for col in ("slide", "path"):
        if col not in cols:
            raise ConfigError(
                f"slide sheet {path}: required column `{col}` is missing (columns: {cols}); "
                f"the sheet needs tab-separated columns {list(COLUMNS)}"
            )
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown:
        raise ConfigError(f"slide sheet {path}: unknown column(s) {unknown}; allowed {COLUMNS}")
    return validate_rows(df.to_dict("records"), str(path), path.parent)


def validate_rows(rows: list[dict[str, Any]], where: str, base: Path) -> pd.DataFrame:
    """Validate sheet rows (dicts), resolve paths against `base`, return the sheet."""
    schema = load_schema("slides")
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(rows, start=1):
        row = {k: _clean(v) for k, v in raw.items()}
        for num in ("mpp", "fold"):
            if isinstance(row.get(num), str):
                try:
                    value = float(row[num])
                    row[num] = int(value) if num == "fold" and value.is_integer() else value
                except ValueError:
                    pass  # the schema reports the bad value below
        try:
            jsonschema.validate(row, schema)
        except jsonschema.ValidationError as exc:
            col = ".".join(str(p) for p in exc.path) or "row"
            raise ConfigError(
                f"slide sheet {where}, row {i} (slide {row.get('slide')!r}), column `{col}`: "
                f"{exc.message}"
            ) from exc
        sid = row["slide"]
        if sid in seen:
            raise ConfigError(
                f"slide sheet {where}: slide id {sid!r} appears in rows {seen[sid]} and {i}; "
                "slide ids must be unique"
            )
        seen[sid] = i
        row["path"] = _resolve(base, row["path"])
        row["labels"] = _resolve(base, row.get("labels"))
        row.setdefault("mpp", None)
        row["group"] = row.get("group") or sid
        row.setdefault("fold", None)
        out.append(row)
    if not out:
        raise ConfigError(f"slide sheet {where} lists no slides")
    df = pd.DataFrame(out, columns=list(COLUMNS), dtype=object)
    return df.set_index("slide", drop=False)


def synthetic_rows(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Sheet rows of the synthetic slides the config asks for (written under results/synth)."""
    root = Path(config["results"]) / "synth"
    rows = []
    for sid, spec in config["synth"]["slides"].items():
        kind = spec.get("labels", "mask")
        labels = {"mask": f"{sid}.labels.tiff", "geojson": f"{sid}.geojson"}.get(kind)
        rows.append(
            {
                "slide": sid,
                "path": str(root / f"{sid}.tiff"),
                "labels": str(root / labels) if labels else None,
                "group": spec.get("group"),
            }
        )
    return rows


def load_sheet(config: dict[str, Any]) -> pd.DataFrame:
    """The sheet of a validated config: its `slides` file plus its synthetic slides."""
    rows: list[dict[str, Any]] = []
    sheet = Path(config["slides"])
    if config["slides"]:
        rows += read_sheet(sheet).to_dict("records")
    rows += synthetic_rows(config)
    return validate_rows(rows, f"{sheet} + synth.slides", Path("."))
