"""Fine-tuning: selection never reads the validation fold, artifacts, exact resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from dsf.config import defaults
from dsf.finetune import HISTORY_COLUMNS, FineTuner, main

CLASSES = ["ignore", "TUM", "STR", "LYM"]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, make_store) -> tuple[list[Path], Path]:  # noqa: ANN001
    """Three labelled stores (A in fold 0; B, C in fold 1), 64 px blocks, scale 4 (the smallest
    block whose hook crop falls on whole cells: the centre 1/4 must be 8 px cells)."""
    d = tmp_path_factory.mktemp("ftune")
    stores = [
        make_store(d, name, seed, block=64, stride=64, labelled=True)
        for name, seed in (("A", 1), ("B", 2), ("C", 3))
    ]
    folds = d / "folds.tsv"
    folds.write_text("slide\tgroup\tfold\nA\tA\t0\nB\tB\t1\nC\tC\t1\n")
    return stores, folds


def _args(stores: list[Path], folds: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--stores",
        *map(str, stores),
        "--folds",
        str(folds),
        "--fold",
        "0",
        "--out-dir",
        str(out),
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--classes",
        *CLASSES,
        *extra,
    ]


def test_cli_fits_on_training_slides_and_selects_on_held_out_ones(three, tmp_path) -> None:  # noqa: ANN001
    stores, folds = three
    out = tmp_path / "ft"
    assert main(_args(stores[1:], folds, out)) == 0
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["fold"] == 0 and "A" not in model["fit_slides"] + model["select_slides"]
    assert sorted(model["fit_slides"] + model["select_slides"]) == ["B", "C"]
    assert len(model["select_slides"]) == 1 and 1 <= model["epoch"] <= 2
    hist = pd.read_csv(out / "history.tsv", sep="\t")
    assert list(hist.columns) == HISTORY_COLUMNS and len(hist) == 2
    assert not (out / "checkpoint.pt").exists()  # only kept while a run is unfinished
    assert model["select_macro_f1"] == pytest.approx(hist["select_macro_f1"].max())
    # a validation slide's store is refused
    assert main(_args(stores, folds, tmp_path / "bad")) == 2


def test_resume_is_exact(three, tmp_path) -> None:  # noqa: ANN001
    stores, _ = three
    st = defaults("finetune") | {
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 4,
        "workers": 0,
        "device": "cpu",
    }

    def tuner(out: Path, **kw: object) -> FineTuner:
        out.mkdir(exist_ok=True)
        return FineTuner(st | kw, [stores[1]], [stores[2]], 0.5, CLASSES, out)

    a = tuner(tmp_path / "a")
    a.fit()
    b = tuner(tmp_path / "b", epochs=1)
    b.fit()
    c = tuner(tmp_path / "b")
    assert c.resume() and c.epoch == 1
    c.fit()
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, c.model.state_dict()[k], rtol=0, atol=0, msg=k)
    assert a.best["epoch"] == c.best["epoch"]


def test_resume_under_changed_settings_is_refused(three, tmp_path) -> None:  # noqa: ANN001
    from dsf.errors import ConfigError

    stores, _ = three
    st = defaults("finetune") | {
        "epochs": 1,
        "steps_per_epoch": 1,
        "batch_size": 4,
        "workers": 0,
        "device": "cpu",
    }
    first = FineTuner(st, [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    first.fit()
    again = FineTuner(st | {"lr": 0.01}, [stores[1]], [stores[2]], 1.0, CLASSES, tmp_path)
    with pytest.raises(ConfigError, match=r"lr: \[0\.001\] then, \[0\.01\] now"):
        again.resume()
