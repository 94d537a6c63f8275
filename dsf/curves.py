"""Plots and pages of the Snakemake report (`snakemake --report`, workflow/rules/report.smk).

`dsf curves pretrain`: a pretraining run's log.tsv as a PNG: the total, context, target and
fusion losses per epoch, the collapse monitor `z_std` per epoch, and the throughput with the
share of each epoch spent waiting for tiles (`data_wait`; logs of older dsf lack it).
`dsf curves finetune`: a fine-tuning run's history.tsv as a PNG: training loss per epoch, and the
selection macro F1 and accuracy per epoch with the epoch kept in model.pt marked.
`dsf curves tables`: eval/tables.md as a self-contained HTML page (the report shows HTML, not
markdown).
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dsf.atomic import atomic_path
from dsf.errors import DsfError
from dsf.runner import run, setup_logging

PRETRAIN_COLUMNS = ["epoch", "loss", "context", "target", "fusion", "z_std", "samples_per_s"]
#: colour of the waiting-for-tiles line (none of the loss panel's)
WAIT_COLOUR = "tab:brown"
FINETUNE_COLUMNS = ["epoch", "train_loss", "select_macro_f1", "select_accuracy"]
#: pretraining losses: column, legend label
LOSSES = [
    ("loss", "total"),
    ("context", "context group"),
    ("target", "target group"),
    ("fusion", "fusion group"),
]


class CurvesError(DsfError):
    """A training log cannot be read or plotted; the message names the file."""


def read_log(
    path: str | Path, columns: Sequence[str], optional: Sequence[str] = ()
) -> pd.DataFrame:
    """A per-epoch TSV with at least `columns` (and those of `optional` it has: columns that
    older dsf versions did not write), numeric, sorted by epoch.

    Raises CurvesError naming the file when it is missing, not a TSV with those columns, or has
    non-numeric values.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t")
    except FileNotFoundError as exc:
        raise CurvesError(f"{path}: no such file; run the training stage first") from exc
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CurvesError(
            f"{path}: not a readable tab-separated table ({exc}); rerun the training stage that "
            "wrote it"
        ) from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CurvesError(
            f"{path}: columns {missing} are missing (it has {list(df.columns)}); expected a "
            f"tab-separated table with {list(columns)}: was it written by another dsf version? "
            "rerun the training stage that wrote it"
        )
    columns = [*columns, *(c for c in optional if c in df.columns)]
    out = df[columns].copy()
    for c in columns:
        values = pd.to_numeric(out[c], errors="coerce")
        bad = values.isna() & out[c].notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise CurvesError(
                f"{path}: column {c!r} has a non-numeric value {out[c].iloc[row]!r} in data row "
                f"{row + 1}; the file is damaged: rerun the training stage that wrote it"
            )
        out[c] = values
    return out.sort_values("epoch").reset_index(drop=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, what: str) -> None:
    ax.text(
        0.5, 0.5, f"no epoch logged yet\n({what})", ha="center", va="center", transform=ax.transAxes
    )


def _epoch_axis(ax, epochs: pd.Series) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:  # one point: keep it off the frame
        e = float(epochs.iloc[0])
        ax.set_xlim(e - 1, e + 1)
    ax.grid(alpha=0.3)


def _frame(axes: tuple, df: pd.DataFrame, source: str) -> None:
    """Epoch axes on every panel, or the 'no epoch logged yet' text when `df` is empty."""
    for ax in axes:
        if len(df):
            _epoch_axis(ax, df["epoch"])
        else:
            _empty(ax, source)


def _save(fig, out: Path, dpi: int) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def plot_pretrain(
    log: str | Path, out: str | Path, init: str, fold: int | None, dpi: int = 100
) -> None:
    """PNG of a pretraining run: group losses, the collapse monitor, and throughput with the
    time spent waiting for tiles, per epoch. `fold` None: the run pretrained on every slide
    (pretrain.scope all)."""
    df = read_log(log, PRETRAIN_COLUMNS, optional=["data_wait"])
    plt = _pyplot()
    fig, (ax_loss, ax_std, ax_rate) = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    scope = "all slides" if fold is None else f"fold {fold} (its training slides)"
    fig.suptitle(f"Pretraining {init}, {scope}: {len(df)} epoch(s)")
    marker = "o" if len(df) <= 30 else None
    if len(df):
        for col, label in LOSSES:
            ax_loss.plot(df["epoch"], df[col], marker=marker, label=label)
        ax_loss.legend(fontsize=8)
        ax_std.plot(df["epoch"], df["z_std"], marker=marker, color="tab:purple")
        ax_std.set_ylim(bottom=0)
        _plot_rate(ax_rate, df, marker)
    _frame((ax_loss, ax_std, ax_rate), df, str(log))
    ax_loss.set_title("SimSiam losses (weighted stage sums; total = sum of groups)", fontsize=10)
    ax_loss.set_ylabel("loss (mean over the epoch's steps)")
    ax_std.set_title(
        "Collapse monitor: about 1/sqrt(d) when healthy, 0 when collapsed", fontsize=10
    )
    ax_std.set_ylabel("z_std (std of normalised projections)")
    ax_rate.set_title("Throughput, and time spent waiting for tiles", fontsize=10)
    ax_rate.set_ylabel("samples (tiles) per second")
    _save(fig, Path(out), dpi)
    plt.close(fig)


def _plot_rate(ax, df: pd.DataFrame, marker: str | None) -> None:
    """samples/s per epoch; on a right-hand axis, the share of the epoch the training loop
    waited for the tile loader, where the log has it (high: more pretrain.workers)."""
    ax.plot(df["epoch"], df["samples_per_s"], marker=marker, color="tab:blue", label="samples/s")
    top = float(df["samples_per_s"].max())
    ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)  # room above the fastest epoch's point
    if "data_wait" not in df.columns:
        return
    wait = ax.twinx()
    wait.plot(
        df["epoch"],
        df["data_wait"] * 100,
        marker=marker,
        color=WAIT_COLOUR,
        linestyle="--",
        label="waiting for tiles",
    )
    wait.set_ylim(0, 100)
    wait.set_ylabel("% of the epoch waiting for tiles", color=WAIT_COLOUR)
    lines = ax.get_lines() + wait.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")


def plot_finetune(
    history: str | Path, out: str | Path, init: str, fraction: float, fold: int, dpi: int = 100
) -> None:
    """PNG of a fine-tuning run: training loss and selection scores per epoch."""
    df = read_log(history, FINETUNE_COLUMNS)
    plt = _pyplot()
    fig, (ax_loss, ax_sel) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    fig.suptitle(
        f"Fine-tuning {init}, label fraction {fraction * 100:g}%, fold {fold}: {len(df)} epoch(s)"
    )
    marker = "o" if len(df) <= 30 else None
    # without selection slides (finetune.held_out 0) every score is NaN
    selected = len(df) == 0 or bool(df["select_macro_f1"].notna().any())
    if len(df):
        ax_loss.plot(df["epoch"], df["train_loss"], marker=marker, color="tab:blue")
        # model.pt keeps the first epoch of the best finite macro F1 (dsf.finetune), or the
        # last one without selection slides
        score = df["select_macro_f1"].where(df["select_macro_f1"].notna(), 0.0)
        best = int(score.to_numpy().argmax()) if selected else len(df) - 1
        if selected:
            ax_sel.plot(df["epoch"], df["select_macro_f1"], marker=marker, label="macro F1")
            ax_sel.plot(df["epoch"], df["select_accuracy"], marker=marker, label="accuracy")
        else:
            ax_sel.set_xlim(ax_loss.get_xlim())
        ax_sel.axvline(
            df["epoch"].iloc[best],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"kept: epoch {int(df['epoch'].iloc[best])}",
        )
        ax_sel.set_ylim(0, 1)
        ax_sel.legend(fontsize=8)
    _frame((ax_loss, ax_sel), df, str(history))
    ax_loss.set_title("Training loss", fontsize=10)
    ax_loss.set_ylabel("loss (mean over the epoch)")
    ax_sel.set_title(
        "Model selection on held-out training slides"
        if selected
        else "No model selection (finetune.held_out 0): the last epoch kept",
        fontsize=10,
    )
    ax_sel.set_ylabel("score")
    _save(fig, Path(out), dpi)
    plt.close(fig)


# -- tables.md as HTML ------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; font-size: 14px; background: #fff; color: #111; margin: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eee; }
tr:nth-child(even) td { background: #f7f7f7; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 1.5em; } h3 { font-size: 1.05em; }
.footnotes { font-size: 0.9em; border-top: 1px solid #bbb; margin-top: 2em; }
"""


def _inline(text: str) -> str:
    """Escaped text with the markdown tables.md uses: **bold**, *italic*, `code`, [^n]."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", out)
    return re.sub(r"\[\^(\d+)\]", r'<sup><a href="#fn\1" id="ref\1">\1</a></sup>', out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


def _is_rule(line: str) -> bool:
    return bool(re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", line))


def markdown_html(text: str, title: str = "Evaluation") -> str:
    """A self-contained HTML page of the markdown subset tables.md is written in: headings,
    paragraphs, bullet lists, pipe tables and footnotes."""
    body: list[str] = []
    notes: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
        elif m := re.match(r"\[\^(\d+)\]:\s*(.*)", line):
            notes.append(f'<li id="fn{m.group(1)}" value="{m.group(1)}">{_inline(m.group(2))}</li>')
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(line))
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])))
                i += 1
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
            body += [r + "</tr>" for r in rows]
            body.append("</tbody></table>")
        elif re.match(r"\s*[-*]\s+", line):
            items = []
            while i < len(lines) and (m := re.match(r"\s*[-*]\s+(.*)", lines[i])):
                items.append(f"<li>{_inline(m.group(1))}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while (
                i < len(lines)
                and lines[i].strip()
                and not re.match(r"(#{1,6}\s|\[\^\d+\]:|\s*\||\s*[-*]\s)", lines[i])
            ):
                para.append(lines[i].strip())
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    if notes:
        body.append('<ol class="footnotes">' + "".join(notes) + "</ol>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def tables_page(markdown: str | Path, out: str | Path) -> None:
    """Write tables.md as an HTML page."""
    markdown = Path(markdown)
    try:
        text = markdown.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurvesError(f"{markdown}: cannot read the evaluation tables ({exc})") from exc
    with atomic_path(out) as tmp:
        tmp.write_text(markdown_html(text, title=f"Evaluation tables ({markdown.name})"))


# -- CLI --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf curves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    pre = sub.add_parser(
        "pretrain",
        help="a pretraining log.tsv as a PNG",
        description="a pretraining log.tsv as a PNG",
    )
    pre.add_argument(
        "--log", required=True, type=Path, help="pretrain/{init}/{fold{k} or all}/log.tsv"
    )
    pre.add_argument("--init", required=True, help="pretraining method, for the title")
    pre.add_argument(
        "--fold", type=int, default=None, help="fold, for the title (none: all slides)"
    )
    fine = sub.add_parser(
        "finetune",
        help="a fine-tuning history.tsv as a PNG",
        description="a fine-tuning history.tsv as a PNG",
    )
    fine.add_argument(
        "--history", required=True, type=Path, help="finetune/{init}/frac{f}/fold{k}/history.tsv"
    )
    fine.add_argument("--init", required=True, help="fine-tuning init, for the title")
    fine.add_argument("--fraction", required=True, type=float, help="label fraction (0-1]")
    fine.add_argument("--fold", required=True, type=int, help="fold, for the title")
    for s in (pre, fine):
        s.add_argument("--out", required=True, type=Path, help="PNG to write")
        s.add_argument("--dpi", type=int, default=100, help="resolution (default 100)")
    tab = sub.add_parser(
        "tables",
        help="eval/tables.md as an HTML page",
        description="eval/tables.md as an HTML page",
    )
    tab.add_argument("--markdown", required=True, type=Path, help="eval/tables.md")
    tab.add_argument("--out", required=True, type=Path, help="HTML page to write")
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf curves pretrain|finetune|tables`."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        if args.what == "pretrain":
            plot_pretrain(args.log, args.out, args.init, args.fold, args.dpi)
        elif args.what == "finetune":
            plot_finetune(args.history, args.out, args.init, args.fraction, args.fold, args.dpi)
        else:
            tables_page(args.markdown, args.out)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
