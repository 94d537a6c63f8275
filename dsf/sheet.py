"""The slide sheet: one row per slide, validated, with paths resolved (DESIGN section 3).

Kept out of the Snakefile so it is tested like any other code and used by hand the same way.
`slides` may also be a folder (every slide in it, `dsf.scan`); `dsf sheet FOLDER` writes that
folder's sheet to edit (groups, resolution, folds).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dsf.atomic import atomic_path, check_outputs
from dsf.config import load_schema, schema_problem
from dsf.errors import ConfigError, SlideError, some
from dsf.folds import group_clash_note
from dsf.runner import run, setup_logging
from dsf.scan import IMAGE_SUFFIXES, SLIDE_SUFFIXES, patient_group, scan_folder
from dsf.slide import describe_slide

log = logging.getLogger(__name__)

COLUMNS = ("slide", "path", "mpp", "labels", "group", "fold")
#: A column `mask:<class>` names a slide's binary mask of that class (`labels.masks`).
MASK_PREFIX = "mask:"


def _clean(value: Any) -> Any:
    """Empty cells are None; text is trimmed (a spreadsheet's stray space had made `p1 ` a
    patient of its own, split from `p1` across folds); floats that are whole numbers stay as
    read (pandas NaN -> None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    # lexical: `..` collapses without resolving links (pathlib has no such step)
    return os.path.normpath(path if path.is_absolute() else base / path)


def canonical_path(path: str) -> str:
    """One spelling of a file's path however the sheet or the config reached it: relative to
    the working folder when under it, else absolute (lexical, links kept). Snakemake compares
    its jobs' input paths as strings, so `../cohort/a.svs` and `/data/cohort/a.svs` (the same
    file, named once by a relative, once by an absolute `slides`) would rerun the project."""
    p = os.path.normpath(os.path.abspath(path))
    cwd = os.getcwd()
    return os.path.relpath(p, cwd) if Path(p).is_relative_to(cwd) else p


def _canonical_row(row: dict[str, Any]) -> dict[str, Any]:
    """A sheet row with its slide, annotation and mask paths in `canonical_path` form."""
    row = dict(row)
    for key in ("path", "labels"):
        if _clean(row.get(key)) is not None:
            row[key] = canonical_path(str(row[key]))
    if row.get("masks"):
        row["masks"] = {cls: canonical_path(str(m)) for cls, m in row["masks"].items()}
    return row


def _check_one_file_one_slide(rows: list[dict[str, Any]], where: str) -> None:
    """Refuse one slide file under two ids: as two slides of two groups it could be trained
    on in one fold and tested on in another."""
    first: dict[str, str] = {}
    for row in rows:
        real = os.path.realpath(row["path"])
        if real in first:
            raise ConfigError(
                f"slide sheet {where}: slides {first[real]!r} and {row['slide']!r} are one file "
                f"({row['path']}): as two slides it could be trained on and tested on; keep one "
                "row"
            )
        first[real] = row["slide"]


def _warn_groups_alike(rows: list[dict[str, Any]], where: str) -> None:
    """Warn of groups that differ only in case (`P1`, `p1`): two patients to the folds, which
    may put one patient's slides in two folds."""
    spelled: dict[str, set[str]] = {}
    for row in rows:
        group = str(row["group"])
        spelled.setdefault(group.casefold(), set()).add(group)
    alike = [sorted(names) for names in spelled.values() if len(names) > 1]
    if alike:
        log.warning(
            "slide sheet %s: groups %s differ only in case, so they are different patients "
            "to the folds; if each is one patient, write its group one way in the `group` "
            "column (or the folds may split its slides)",
            where,
            "; ".join(" and ".join(repr(n) for n in names) for names in alike[:5]),
        )


def check_files(rows: list[dict[str, Any]], where: str) -> None:
    """Refuse sheet rows naming slide, annotation or mask files that are not there, all named
    at once: Snakemake would stop on the first with its own error, naming no sheet or fix.
    The workflow runs it once, at the start (not in each cluster job), on the rows that are
    not its own synthetic slides."""
    gone = [
        f"slide {row['slide']!r} `{col}` {path}"
        for row in rows
        for col, path in [
            ("path", row.get("path")),
            ("labels", row.get("labels")),
            *((f"{MASK_PREFIX}{c}", m) for c, m in (row.get("masks") or {}).items()),
        ]
        if _clean(path) is not None and not Path(path).exists()
    ]
    if gone:
        raise ConfigError(
            f"slide sheet {where}: {len(gone)} file(s) it names are not there: "
            f"{'; '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}. Fix those cells (a "
            "relative path is read from the sheet's folder) or remove their rows"
        )


def read_sheet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a slide sheet; the index is the slide id.

    Errors name the sheet, the row and the column: a missing or unknown column, a duplicate slide
    id, a value that breaks `workflow/schemas/slides.schema.yaml`.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"config key `slides`: {path} does not exist (from {Path.cwd()}); give a folder of "
            "slides or a slide sheet (.tsv or .csv), absolute or relative to where snakemake runs"
        )
    if not path.is_file():
        raise ConfigError(f"slide sheet {path} is not a file; set config key `slides`")
    if path.suffix.lower() in SLIDE_SUFFIXES | {".dcm"}:
        raise ConfigError(
            f"config key `slides`: {path} is a slide, not a sheet; give the folder that holds "
            "the slides, or a slide sheet (.tsv or .csv) that lists them"
        )
    if path.suffix.lower() in {".geojson", ".xml"}:  # (.json: `dsf folds` records)
        raise ConfigError(
            f"config key `slides`: {path} is an annotation file, not a sheet; give the folder "
            "that holds the slides (annotations beside them are found by name), or a slide "
            "sheet (.tsv) with a `labels` column"
        )
    try:
        # only whole lines starting with '#' are comments: a '#' inside a path is part of it
        with open(path, encoding="utf-8-sig", newline="") as fh:
            numbered = [(n, ln) for n, ln in enumerate(fh, 1) if ln.strip() and ln[0] != "#"]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"slide sheet {path} is not a UTF-8 text file: {exc}") from exc
    if not numbered:
        raise ConfigError(f"slide sheet {path} is empty; it needs a header line {COLUMNS}")
    sep, sep_name = _separator(path, numbered[0][1])
    table = [_cells(ln, sep) for _, ln in numbered]
    cols = [c.strip() for c in table[0]]
    while len(cols) > 1 and not cols[-1]:
        cols.pop()  # a spreadsheet's trailing tabs, after the header too (an empty column)
    for (n, _), cells in zip(numbered[1:], table[1:], strict=True):
        while len(cells) > len(cols) and not cells[-1].strip():
            cells.pop()  # a spreadsheet's trailing tabs
        if len(cells) > len(cols):
            raise ConfigError(
                f"slide sheet {path}, line {n} (slide {cells[0]!r}): {len(cells)} "
                f"{sep_name}-separated cells but the header has {len(cols)} columns; remove the "
                f"stray {sep_name}, or name the extra column in the header"
            )
        cells += [""] * (len(cols) - len(cells))  # empty cells at the end of a short row
    dup_cols = sorted({c for c in cols if cols.count(c) > 1})
    if dup_cols:
        raise ConfigError(f"slide sheet {path}: column(s) {dup_cols} appear more than once")
    for col in ("slide", "path"):
        if col not in cols:
            other = next((n for c, n in _SEPARATORS.items() if c != sep and c in cols[0]), None)
            hint = (
                f"; its header is {other}-separated: name it .csv (commas or semicolons) or "
                "save it as tab-separated .tsv"
                if other and len(cols) == 1
                else ""
            )
            raise ConfigError(
                f"slide sheet {path}: required column `{col}` is missing (columns: {cols}); "
                f"the sheet needs {sep_name}-separated columns {list(COLUMNS)}{hint}"
            )
    unknown = [c for c in cols if c not in COLUMNS and not _mask_class(c)]
    if unknown:
        raise ConfigError(
            f"slide sheet {path}: unknown column(s) {unknown}; allowed {COLUMNS} and "
            f"`{MASK_PREFIX}<class>` columns of per-class masks"
        )
    rows = []
    for raw in (dict(zip(cols, cells, strict=True)) for cells in table[1:]):
        masks = {_mask_class(c): raw.pop(c) for c in cols if _mask_class(c)}
        rows.append({**raw, "masks": {k: v for k, v in masks.items() if _clean(v) is not None}})
    table = validate_rows(rows, str(path), path.parent, [n for n, _ in numbered[1:]])
    # once per sheet (load_sheet validates its rows again, with the synthetic slides)
    records = table.to_dict("records")
    _check_one_file_one_slide(records, str(path))
    _warn_groups_alike(records, str(path))
    return table


#: Cell separators of a sheet, by name.
_SEPARATORS = {"\t": "tab", ",": "comma", ";": "semicolon"}


def _separator(path: Path, header: str) -> tuple[str, str]:
    """A sheet's cell separator and its name: tabs, or in a .csv (a spreadsheet's export)
    commas, or semicolons where the header has them and no comma (a spreadsheet in a locale
    that writes decimal commas)."""
    if path.suffix.lower() != ".csv":
        return "\t", "tab"
    sep = ";" if ";" in header and "," not in header else ","
    return sep, _SEPARATORS[sep]


def _cells(line: str, sep: str) -> list[str]:
    """A sheet line's cells ("quoted" cells as a spreadsheet writes them)."""
    return next(csv.reader([line.rstrip("\r\n")], delimiter=sep))


def _mask_class(column: str) -> str:
    """The class of a `mask:<class>` column, else ''."""
    return column[len(MASK_PREFIX) :].strip() if column.startswith(MASK_PREFIX) else ""


def validate_rows(
    rows: list[dict[str, Any]], where: str, base: Path, lines: list[int] | None = None
) -> pd.DataFrame:
    """Validate sheet rows (dicts), resolve paths against `base`, return the sheet. Errors
    name a row by its line in the sheet file when `lines` gives them, else by its number."""
    # one compiled validator: `jsonschema.validate` checks the schema itself at every call,
    # which dominated reading a sheet of thousands of slides (in every cluster job's start)
    validator = jsonschema.Draft202012Validator(load_schema("slides"))
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    own: list[str] = []  # slides without a group: each is a group of its own, by its id
    for n, raw in enumerate(rows, start=1):
        i = f"line {lines[n - 1]}" if lines is not None else f"row {n}"
        masks = dict(raw.get("masks") or {})
        row = {k: _clean(v) for k, v in raw.items() if k != "masks"}
        for num in ("mpp", "fold"):
            if isinstance(row.get(num), str):
                try:
                    value = float(row[num])
                    row[num] = int(value) if num == "fold" and value.is_integer() else value
                except ValueError:
                    pass  # the schema reports the bad value below
        for col in ("slide", "path"):
            if row.get(col) is None:
                raise ConfigError(
                    f"slide sheet {where}, {i} (slide {row.get('slide')!r}): the `{col}` cell "
                    "is empty; fill it or remove the line"
                )
        try:
            validator.validate(row)
        except jsonschema.ValidationError as exc:
            col = ".".join(str(p) for p in exc.path) or "row"
            raise ConfigError(
                f"slide sheet {where}, {i} (slide {row.get('slide')!r}), column `{col}`: "
                f"{schema_problem(exc)}"
            ) from exc
        sid = row["slide"]
        if sid in seen:
            raise ConfigError(
                f"slide sheet {where}: slide id {sid!r} appears twice ({seen[sid]} and {i}); "
                "slide ids must be unique"
            )
        seen[sid] = i
        row["path"] = _resolve(base, row["path"])
        row["labels"] = _resolve(base, row.get("labels"))
        if masks and row["labels"]:
            raise ConfigError(
                f"slide sheet {where}, {i} (slide {sid!r}): both a `labels` annotation and "
                f"per-class masks ({', '.join(masks)}); keep one of them"
            )
        row["masks"] = {cls: _resolve(base, str(m)) for cls, m in masks.items()}
        row.setdefault("mpp", None)
        # a slide without a group: its TCGA patient (as in a folder), else a group of its own
        if row.get("group") is None and patient_group(sid) is None:
            own.append(sid)
        row["group"] = row.get("group") or patient_group(sid) or sid
        row.setdefault("fold", None)
        out.append(row)
    if not out:
        raise ConfigError(f"slide sheet {where} lists no slides")
    given = {str(r["group"]) for r in out if r["slide"] not in set(own)}
    if note := group_clash_note(sorted(set(own) & given), where):
        log.warning(note)
    df = pd.DataFrame(out, columns=[*COLUMNS, "masks"], dtype=object)
    return df.set_index("slide", drop=False)


def check_mask_classes(sheet: pd.DataFrame, classes: list[str], where: str) -> None:
    """Every per-class mask of the sheet names a class of `classes` (else a ConfigError naming
    the sheet's column)."""
    lower = [c.lower() for c in classes]
    for cls in sorted({c for m in sheet["masks"] for c in m}):
        if cls.lower() not in lower[1:]:
            raise ConfigError(
                f"slide sheet {where}: column `{MASK_PREFIX}{cls}` names class {cls!r}, which is "
                f"not one of labels.classes {classes[1:]}: rename the column to one of them, or "
                "add the class to labels.classes"
            )


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
                "fold": spec.get("fold"),
            }
        )
    return rows


def folder_rows(
    folder: Path, results: str | os.PathLike[str], masks: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Sheet rows of every slide under `folder` (`dsf.scan`), the workflow's results excluded,
    with the per-class masks named by the `masks` patterns.

    Plain images state no resolution and a folder has no `mpp` column to give it, so they stop
    here, with the command that writes a sheet to fill.
    """
    rows = scan_folder(folder, exclude=[results], masks=masks)
    images = [r["path"] for r in rows if Path(r["path"]).suffix.lower() in IMAGE_SUFFIXES]
    if images:
        shown = some(images)
        raise ConfigError(
            f"config key `slides` is the folder {folder}, which holds plain images ({shown}) "
            "that state no resolution: write a sheet that gives it, `dsf sheet "
            f"{shlex.quote(str(folder))} --mpp <um/px> --out slides.tsv`, and set `slides` to "
            "that sheet"
        )
    return rows


def load_sheet(config: dict[str, Any]) -> pd.DataFrame:
    """The sheet of a validated config: its `slides` sheet (or every slide in its `slides`
    folder) plus its synthetic slides."""
    rows: list[dict[str, Any]] = []
    sheet = Path(config["slides"])
    if config["slides"] and sheet.is_dir():
        rows += folder_rows(sheet, config["results"], config["labels"]["masks"])
    elif config["slides"]:
        rows += read_sheet(sheet).to_dict("records")
    rows = [_canonical_row(row) for row in rows]
    rows += synthetic_rows(config)
    if not rows:
        raise ConfigError(
            "config key `slides` is empty and synth.slides names none: give a folder of slides "
            "or a slide sheet (.tsv or .csv)"
        )
    table = validate_rows(rows, f"{sheet} + synth.slides", Path("."))
    check_mask_classes(table, list(config["labels"]["classes"]), str(sheet))
    return table


def check_sheet_out(out: Path, rows: list[dict[str, Any]]) -> None:
    """Refuse a sheet path that is a slide or annotation of the folder, or named like one: `dsf
    sheet FOLDER --out FOLDER/a.svs` had replaced the slide with the sheet."""
    named = [(r["path"], r.get("labels"), *(r.get("masks") or {}).values()) for r in rows]
    check_outputs([out], [p for paths in named for p in paths])
    if out.suffix.lower() in SLIDE_SUFFIXES | {".geojson", ".xml"}:
        raise ConfigError(
            f"--out {out} is named like a slide or an annotation; a sheet is a .tsv file"
        )


def write_sheet(rows: list[dict[str, Any]], out: Path | None) -> None:
    """Write sheet rows as a TSV with every column (comma-separated for an `out` named .csv),
    to `out` (atomically, paths relative to its folder when they lie under it) or to standard
    output (absolute paths)."""
    classes = list(dict.fromkeys(c for r in rows for c in r.get("masks") or {}))
    table = pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)
    for cls in classes:
        table[MASK_PREFIX + cls] = [(r.get("masks") or {}).get(cls) for r in rows]
    if out is not None:
        base = out.resolve().parent
        table["path"] = [_relative(p, base) for p in table["path"]]
        for col in ["labels", *(MASK_PREFIX + c for c in classes)]:
            table[col] = [None if _clean(p) is None else _relative(p, base) for p in table[col]]
        with atomic_path(out) as tmp:
            table.to_csv(tmp, sep="," if out.suffix.lower() == ".csv" else "\t", index=False)
    else:
        table.to_csv(sys.stdout, sep="\t", index=False)


def _earlier_folds(folds_tsv: Path) -> pd.DataFrame:
    """The folds table `--folds` names (an earlier run's), or a ConfigError saying what to give."""
    from dsf.folds import read_folds

    if not Path(folds_tsv).is_file():
        raise ConfigError(
            f"--folds {folds_tsv} not found: give the folds.tsv an earlier run wrote "
            "(results/folds.tsv), whose folds the sheet keeps"
        )
    return read_folds(folds_tsv)


def keep_folds(rows: list[dict[str, Any]], folds_tsv: Path, found: set[str] | None = None) -> None:
    """Set the `fold` and `group` of every row whose slide an earlier run's folds.tsv lists,
    so adding slides to a project keeps its folds (and so its trained fold models) where they
    were; new slides are left for the run to place (around the fixed ones, patients kept
    together). The earlier groups are kept too (they may have been edited by hand, and the
    split was made with them); a scan that now groups a slide otherwise is warned about.
    `found`: the ids of every slide in the folder, readable or not (default: the rows')."""
    known = _earlier_folds(folds_tsv)
    fold_of = dict(zip(known["slide"], known["fold"], strict=True))
    group_of = dict(zip(known["slide"], known["group"], strict=True))
    kept = [r for r in rows if r["slide"] in fold_of]
    regrouped = []
    for row in kept:
        sid = row["slide"]
        row["fold"] = int(fold_of[sid])
        earlier = group_of[sid]
        if row["group"] and row["group"] != earlier:
            regrouped.append(f"{sid} ({earlier}, now {row['group']})")
        # kept even where it is the slide's own (the default): regrouping kept slides could
        # put one group in two folds, which the run refuses
        row["group"] = earlier
    if regrouped:
        log.warning(
            "the folder groups %d slides otherwise than %s (%s): their earlier groups are "
            "kept, as the split was made with them",
            len(regrouped),
            folds_tsv,
            ", ".join(regrouped[:5]) + (" ..." if len(regrouped) > 5 else ""),
        )
    gone = sorted(set(fold_of) - (found if found is not None else {r["slide"] for r in rows}))
    log.info(
        "folds of %d slides kept from %s; %d new slides get theirs when the run starts",
        len(kept),
        folds_tsv,
        len(rows) - len(kept),
    )
    if not kept:
        log.warning(
            "none of the %d slides of %s is in the folder: is it this project's folds table?",
            len(fold_of),
            folds_tsv,
        )
    if gone:
        log.warning(
            "%d slides of %s are not in the folder (%s): they are left out",
            len(gone),
            folds_tsv,
            ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""),
        )


def _aligned(rows: list[dict[str, Any]]) -> str:
    """Rows as a text table, columns left-aligned (names read from the left)."""
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [cols, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(ln, widths, strict=True)).rstrip() for ln in lines
    )


def _next_step(out: Path | None, masks: dict[str, str]) -> str:
    """How to run a written sheet (with masks, in a config that has their classes): one
    setting added to the user's own command, whose --config it joins (a second --config
    would replace the first's values)."""
    if out is None:
        return ""
    slides = shlex.quote(f"slides={out.resolve()}")
    add = (
        f"add `{slides}` to your usual command's --config (or `--config {slides}` at its end "
        "if it has none; in dsf's folder)"
    )
    if masks:
        return (
            f"; edit it, then {add}, with a config whose labels.classes has {list(masks)} "
            "(PAIP: --configfile config/presets/paip.yaml)"
        )
    return (
        f"; edit it, then {add}; without a --configfile the schema's settings run, the "
        "paper's protocol is --configfile config/presets/bcss.yaml, or paip.yaml"
    )


def _relative(path: str, base: Path) -> str:
    """`path` relative to `base` when under it, else absolute; `..` resolved either way."""
    p = Path(os.path.normpath(os.path.abspath(path)))
    return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf sheet",
        description="Write the slide sheet of a folder of slides, to edit and run: every slide "
        "file under FOLDER (searched recursively), its annotation found by name, TCGA slides "
        "grouped by patient. Each slide is opened to report its format, size and resolution.",
    )
    p.add_argument("folder", type=Path, help="folder of slides")
    p.add_argument(
        "--labels",
        type=Path,
        help="folder of annotations named like their slides (BCSS masks/ beside images/, "
        "CAMELYON16 lesion_annotations/)",
    )
    p.add_argument(
        "--labels-name",
        metavar="PATTERN",
        help="how the files in --labels are named, with {slide} for the slide id, when not "
        "like their slides (PANDA: --labels train_label_masks --labels-name '{slide}_mask.tiff')",
    )
    p.add_argument(
        "--mask",
        dest="masks",
        action="append",
        default=[],
        metavar="CLASS=PATTERN",
        help="per-class binary masks named by PATTERN with {slide} for the slide id, found "
        "anywhere under FOLDER or --labels (PAIP: --mask whole_tumour={slide}_whole.tif "
        "--mask viable_tumour={slide}_viable.tif); written as `mask:CLASS` columns",
    )
    mpp = p.add_mutually_exclusive_group()
    mpp.add_argument(
        "--mpp",
        type=float,
        help="level-0 um/px of the slides that state none (PNG/JPEG regions); a resolution a "
        "file states is kept",
    )
    mpp.add_argument(
        "--mpp-override",
        type=float,
        metavar="MPP",
        help="level-0 um/px of every slide, over what the files state (a scanner known to "
        "write a wrong one)",
    )
    p.add_argument("--out", type=Path, help="sheet to write (default: standard output)")
    p.add_argument(
        "--folds",
        type=Path,
        metavar="FOLDS_TSV",
        help="keep the folds of an earlier run (its results/folds.tsv): its slides keep their "
        "fold in the `fold` column, new slides get theirs when the run starts",
    )
    p.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out slides dsf cannot open (default: list them and write nothing)",
    )
    return p


def _same(a: float, b: float) -> bool:
    """Two resolutions equal within 1% (a rounded value in a header)."""
    return abs(a - b) <= 0.01 * max(a, b)


def main(argv: list[str] | None = None) -> int:
    """`dsf sheet`: a folder of slides -> a slide sheet."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        for flag, value in (("--mpp", args.mpp), ("--mpp-override", args.mpp_override)):
            if value is not None and not value > 0:
                raise ConfigError(f"{flag} {value} is not a positive number of um/px")
        masks: dict[str, str] = {}
        for item in args.masks:
            cls, sep, pattern = item.partition("=")
            if not sep or not cls or cls in masks:
                raise ConfigError(f"--mask {item!r}: give each class once, as CLASS=PATTERN")
            masks[cls] = pattern
        earlier: set[str] = set()
        if args.folds is not None:
            earlier = set(_earlier_folds(args.folds)["slide"])
        rows = scan_folder(
            args.folder,
            args.labels,
            args.mpp_override,
            exclude=[args.folds.parent] if args.folds is not None else [],
            masks=masks,
            labels_name=args.labels_name,
            unique_ids=True,
            keep_ids=earlier,
        )
        kept, bad, unresolved, table = [], [], [], []
        with logging_redirect_tqdm():
            for row in tqdm(rows, desc="sheet", unit="slide", disable=len(rows) < 20):
                try:
                    facts = describe_slide(row["path"], row["slide"])
                except SlideError as exc:
                    bad.append(str(exc))
                    log.error("%s", exc)
                    continue
                if facts.mpp is None and args.mpp is not None:
                    row["mpp"] = args.mpp  # only where the file states none
                elif (
                    facts.mpp is not None
                    and args.mpp is not None
                    and not _same(facts.mpp, args.mpp)
                ):
                    log.info(
                        "%s states %.4g um/px, kept (--mpp gives slides that state none theirs; "
                        "--mpp-override replaces every slide's)",
                        row["slide"],
                        facts.mpp,
                    )
                elif (
                    row["mpp"] is not None
                    and facts.mpp is not None
                    and not _same(facts.mpp, row["mpp"])
                ):
                    log.warning(
                        "%s states %.4g um/px; --mpp-override gives it %.4g",
                        row["slide"],
                        facts.mpp,
                        row["mpp"],
                    )
                mpp = row["mpp"] if row["mpp"] is not None else facts.mpp
                if mpp is None:
                    unresolved.append(row["slide"])
                table.append(
                    {
                        "slide": row["slide"],
                        "reader": facts.reader,
                        "size (px)": f"{facts.width} x {facts.height}",
                        "levels": facts.levels,
                        "um/px": "none" if mpp is None else f"{mpp:.4g}",
                        "labels": Path(row["labels"]).name
                        if row["labels"]
                        else " + ".join(Path(m).name for m in row["masks"].values()),
                        "group": row["group"] or "",
                    }
                )
                kept.append(row)
        if table:
            log.info("slides found:\n%s", _aligned(table))
        if bad and not args.skip_unreadable:
            raise ConfigError(
                f"{len(bad)} of {len(rows)} slides cannot be read (above); fix or remove them, "
                "or pass --skip-unreadable to leave them out of the sheet"
            )
        if not kept:
            raise ConfigError(f"no readable slide under {args.folder}")
        if args.folds is not None:
            keep_folds(kept, args.folds, {r["slide"] for r in rows})
        if args.out is not None:
            check_sheet_out(args.out, rows)
        write_sheet(kept, args.out)
        log.info(
            "%d slides, %d with annotations%s -> %s%s",
            len(kept),
            sum(1 for r in kept if r["labels"] or r["masks"]),
            f", {len(bad)} unreadable left out" if bad else "",
            args.out or "standard output",
            _next_step(args.out, masks),
        )
        if unresolved:
            log.warning(
                "%d slides state no resolution (%s): fill their `mpp` column (um/px), or "
                "rerun with --mpp (given to slides that state none)",
                len(unresolved),
                ", ".join(unresolved[:5]) + (" ..." if len(unresolved) > 5 else ""),
            )

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
