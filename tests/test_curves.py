"""`dsf curves`: training-curve PNGs and the tables page of the Snakemake report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsf.cli import main as dsf_main
from dsf.curves import (
    WAIT_COLOUR,
    CurvesError,
    markdown_html,
    plot_finetune,
    plot_pretrain,
    read_log,
    tables_page,
)
from dsf.errors import DsfError

PRETRAIN_LOG = (
    "epoch\tloss\tcontext\ttarget\tfusion\tz_std\tsamples_per_s\tseconds\tlr\n"
    "1\t-0.11\t0.003\t-0.05\t-0.06\t0.035\t0.9\t50.0\t0.0005\n"
    "2\t-0.66\t-0.02\t-0.23\t-0.41\t0.034\t1.0\t48.0\t0.0005\n"
    "3\t-0.90\t-0.10\t-0.35\t-0.45\t0.030\t1.0\t47.0\t0.0005\n"
)
HISTORY = (
    "epoch\ttrain_loss\tselect_macro_f1\tselect_accuracy\tseconds\n"
    "1\t0.65\t0.27\t0.36\t9.4\n"
    "2\t0.54\t0.62\t0.60\t8.6\n"
    "3\t0.51\t0.48\t0.55\t7.1\n"
)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _check_png(path: Path, width: float = 11) -> None:
    img = _png(path)
    # width x 4.2 inches at 100 dpi
    assert img.shape == (420, round(width * 100), 3)
    assert img.std() > 10  # something was drawn, not a blank canvas
    assert not path.with_name(path.name + ".partial").exists()


def test_pretrain_png(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    log.write_text(PRETRAIN_LOG)
    out = tmp_path / "curves" / "pretrain" / "dsf" / "fold0.png"
    plot_pretrain(log, out, "dsf", 0)
    _check_png(out, 16)
    assert _wait_pixels(out) == 0  # a log from before data_wait: no waiting line


def _wait_pixels(path: Path) -> int:
    """Pixels of the waiting-for-tiles line's colour."""
    from matplotlib.colors import to_rgb

    want = np.array(to_rgb(WAIT_COLOUR)) * 255
    return int((np.abs(_png(path).astype(float) - want).max(axis=2) < 12).sum())


def test_pretrain_png_shows_the_time_spent_waiting_for_tiles(tmp_path: Path) -> None:
    lines = PRETRAIN_LOG.splitlines()
    waits = ["data_wait", "0.6", "0.05", "0.02"]
    log = tmp_path / "log.tsv"
    log.write_text("\n".join(f"{line}\t{w}" for line, w in zip(lines, waits, strict=True)) + "\n")
    df = read_log(log, ["epoch"], optional=["data_wait", "not_there"])
    assert list(df.columns) == ["epoch", "data_wait"] and df["data_wait"].iloc[0] == 0.6
    out = tmp_path / "fold0.png"
    plot_pretrain(log, out, "dsf", 0)
    _check_png(out, 16)
    assert _wait_pixels(out) > 200


def test_pretrain_png_scope_all_and_one_epoch_via_cli(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    log.write_text("\n".join(PRETRAIN_LOG.splitlines()[:2]) + "\n")
    out = tmp_path / "all.png"
    assert (
        dsf_main(["curves", "pretrain", "--log", str(log), "--init", "dsf", "--out", str(out)]) == 0
    )
    _check_png(out, 16)


def test_finetune_png_via_cli(tmp_path: Path) -> None:
    hist = tmp_path / "history.tsv"
    # a NaN selection score (no selection slide) must not break the plot
    hist.write_text(HISTORY + "4\t0.50\tnan\t0.5\t7.0\n")
    out = tmp_path / "fold1.png"
    argv = ["curves", "finetune", "--history", str(hist), "--init", "random"]
    argv += ["--fraction", "0.25", "--fold", "1", "--out", str(out)]
    assert dsf_main(argv) == 0
    _check_png(out)


def test_header_only_log_gives_a_placeholder_png(tmp_path: Path) -> None:
    hist = tmp_path / "history.tsv"
    hist.write_text(HISTORY.splitlines()[0] + "\n")
    out = tmp_path / "empty.png"
    plot_finetune(hist, out, "unet", 1.0, 0)
    _check_png(out)


def test_read_log_sorts_by_epoch(tmp_path: Path) -> None:
    hist = tmp_path / "history.tsv"
    lines = HISTORY.splitlines()
    hist.write_text("\n".join([lines[0], lines[3], lines[1], lines[2]]) + "\n")
    df = read_log(hist, ["epoch", "train_loss"])
    assert list(df["epoch"]) == [1, 2, 3]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("epoch\ttrain_loss\n1\t0.5\n", r"columns \['select_macro_f1', 'select_accuracy'\]"),
        (HISTORY.replace("0.54", "oops"), r"column 'train_loss' has a non-numeric value 'oops'"),
        ("", "not a readable tab-separated table"),
        (
            "epoch\ttrain_loss\tselect_macro_f1\tselect_accuracy\n1\t2\t3\n4\t5\t6\t7\t8\n",
            "not a readable",
        ),
    ],
)
def test_malformed_history_names_the_file(tmp_path: Path, text: str, match: str) -> None:
    hist = tmp_path / "finetune" / "random" / "history.tsv"
    hist.parent.mkdir(parents=True)
    hist.write_text(text)
    out = tmp_path / "x.png"
    with pytest.raises(CurvesError, match=match) as err:
        plot_finetune(hist, out, "random", 1.0, 0)
    assert isinstance(err.value, DsfError)
    assert str(hist) in str(err.value)
    assert not out.exists() and not out.with_name("x.png.partial").exists()


def test_missing_log_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "pretrain" / "dsf" / "fold0" / "log.tsv"
    argv = ["curves", "pretrain", "--log", str(missing), "--init", "dsf", "--fold", "0"]
    assert dsf_main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err  # dsf's logging writes to stderr
    assert f"{missing}: no such file" in err and "Traceback" not in err


def test_pretrain_log_missing_z_std_names_the_file(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    log.write_text("epoch\tloss\tcontext\ttarget\tfusion\n1\t0\t0\t0\t0\n")
    missing = r"log\.tsv: columns \['z_std', 'samples_per_s'\] are missing"
    with pytest.raises(CurvesError, match=missing):
        plot_pretrain(log, tmp_path / "x.png", "dsf", 0)


TABLES_MD = """# Evaluation

Classes: TUM, STR (index 0, ignore, is unlabelled and ignored). **F1** is `micro` <F1>.

- fold 0: 1 validation slide(s) (synth-01), 10 tiles
- fold 1: 1 validation slide(s) (synth-02), 12 tiles

## Tile protocol

### Label fraction 100%: F1 (Table II)

| Method | Fold 0 | Fold 1 | Mean (std) |
|---|---|---|---|
| dsf | 0.5000 | 0.6000 | 0.5500 (0.0707) |
| random | n/a[^1] | 0.4000 | 0.4000 (n/a[^2]) |

[^1]: the fold has no labelled validation slide
[^2]: std (ddof 1) needs results of at least two folds
"""


def test_markdown_html_renders_tables_and_footnotes() -> None:
    page = markdown_html(TABLES_MD)
    assert page.startswith("<!DOCTYPE html>")
    assert "<h1>Evaluation</h1>" in page and "<h3>Label fraction 100%: F1 (Table II)</h3>" in page
    assert "<th>Method</th><th>Fold 0</th>" in page
    assert "<td>dsf</td><td>0.5000</td>" in page
    assert page.count("<tr>") == 3  # header and two rows; the |---| rule is not a row
    assert '<sup><a href="#fn1" id="ref1">1</a></sup>' in page
    assert '<li id="fn2" value="2">std (ddof 1)' in page
    assert "<strong>F1</strong>" in page and "<code>micro</code>" in page
    assert "&lt;F1&gt;" in page  # escaped
    assert page.count("<li>") == 2  # the bullet list


def test_tables_page_via_cli(tmp_path: Path) -> None:
    md = tmp_path / "tables.md"
    md.write_text(TABLES_MD)
    out = tmp_path / "report" / "tables.html"
    argv = ["curves", "tables", "--markdown", str(md), "--out", str(out)]
    assert dsf_main(argv) == 0
    assert "<table>" in out.read_text()
    with pytest.raises(CurvesError, match="tables.md"):
        tables_page(tmp_path / "none" / "tables.md", out)
