"""A prediction run's model sets (`apply.models`): what is refused before any job runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsf.config import defaults
from dsf.errors import ConfigError
from dsf.model_sets import check_given_models, check_results_apart, find_models


def _model(path: Path, **changed: object) -> Path:
    """A model.pt's metadata (no weights: the checks read metadata only)."""
    meta = {k: defaults("patches")[k] for k in ("target_mpp", "block", "scale")}
    meta |= {"classes": defaults("labels")["classes"], "fraction": 1.0, "init": "dsf"}
    meta |= {"backbone": "resnet18", "target_block": "centre", "state_dict": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(meta | changed, path)
    return path


def test_a_model_named_twice_is_one_model(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A folder and its file, or a relative and an absolute path, had counted one model twice
    in the average."""
    a, b = (
        _model(tmp_path / "m" / "fold0" / "model.pt"),
        _model(tmp_path / "m" / "fold1" / "model.pt"),
    )
    monkeypatch.chdir(tmp_path)
    found = find_models({"x": ["m", str(a), os.path.relpath(b, tmp_path)]})
    assert [Path(p).resolve() for p in found["x"]] == [a, b]


def test_a_results_folder_of_a_training_run_is_refused(tmp_path: Path) -> None:
    """A prediction run whose `results` is the training run's (the default, once the models
    were copied elsewhere) had overwritten its tables and would its maps and tissue masks."""
    models = {"dsf": [str(_model(tmp_path / "moved" / "model.pt"))]}
    check_results_apart(models, str(tmp_path / "results"))  # a new folder: fine
    for mark in ("folds.tsv", "finetune"):
        run = tmp_path / f"run-{mark}"
        run.mkdir()
        (run / mark).mkdir() if mark == "finetune" else (run / mark).write_text("slide\tfold\n")
        with pytest.raises(ConfigError, match=rf"holds a training run \({mark}\).*own"):
            check_results_apart(models, str(run))


def test_models_of_other_backbones_or_unreadable_files_are_refused_by_name(
    tmp_path: Path,
) -> None:
    a = str(_model(tmp_path / "a.pt"))
    b = str(_model(tmp_path / "b.pt", backbone="resnet34"))
    with pytest.raises(ConfigError, match=r"apply.models.x mixes models of different backbone"):
        check_given_models({"x": [a, b]}, set(), None, defaults("labels")["classes"])
    c = str(_model(tmp_path / "c.pt", target_block="whole"))
    with pytest.raises(ConfigError, match=r"different target_block"):
        check_given_models({"x": [a, c]}, set(), None, defaults("labels")["classes"])
    bad = tmp_path / "bad" / "model.pt"
    bad.parent.mkdir()
    bad.write_text("not a model")
    with pytest.raises(ConfigError, match=r"apply.models.y: .*model.pt is not a model.pt of `dsf"):
        check_given_models({"y": [str(bad)]}, set(), None, defaults("labels")["classes"])
    check_given_models({"x": [a, str(_model(tmp_path / "d.pt"))]}, set(), None,
                       defaults("labels")["classes"])  # fmt: skip


def test_models_whose_mpp_differ_within_the_tolerance_are_one_set(tmp_path: Path) -> None:
    """Older models hold their store's actual mpp (0.2527 for 0.25): within
    patches.mpp_tolerance they are one set, beyond it refused; a user's raised tolerance
    counts, as it does where the slide levels are read."""
    classes = defaults("labels")["classes"]
    a = str(_model(tmp_path / "a.pt", target_mpp=0.25))
    b = str(_model(tmp_path / "b.pt", target_mpp=0.2527))
    c = str(_model(tmp_path / "c.pt", target_mpp=0.27))
    check_given_models({"x": [a, b]}, set(), None, classes)
    with pytest.raises(ConfigError, match=r"different target_mpp"):
        check_given_models({"x": [a, c]}, set(), None, classes)
    check_given_models({"x": [a, c]}, set(), None, classes, mpp_tolerance=0.1)
    patches = defaults("patches") | {"target_mpp": 0.25}
    with pytest.raises(ConfigError, match=r"patches.target_mpp"):
        check_given_models({"x": [c]}, set(), patches, classes)
    check_given_models({"x": [c]}, set(), patches | {"mpp_tolerance": 0.1}, classes, None, 0.1)


def test_a_model_set_trained_on_scored_slides_names_every_such_slide(tmp_path: Path) -> None:
    """A cross-validation folder whose models each trained on some annotated slides: the
    refusal named the first model's slides alone, so dropping those led to the next refusal."""
    classes = defaults("labels")["classes"]
    a = str(_model(tmp_path / "fold0.pt", fit_slides=["A", "B"], select_slides=["C"]))
    b = str(_model(tmp_path / "fold1.pt", fit_slides=["C", "D"], select_slides=["A"]))
    c = str(_model(tmp_path / "fold2.pt", fit_slides=["Z"], select_slides=[]))
    with pytest.raises(ConfigError) as err:
        check_given_models({"cv": [a, b, c]}, {"A", "C", "D", "Q"}, None, classes)
    text = str(err.value)
    assert "apply.models.cv: 2 of its 3 models" in text
    assert "3 of them: ['A', 'C', 'D']" in text and f"models: [{a!r}, {b!r}]" in text
    check_given_models({"cv": [c]}, {"A", "C", "D", "Q"}, None, classes)  # Z is not scored


def test_two_models_of_one_fold_in_a_set_are_refused(tmp_path: Path) -> None:
    """A fine-tuning folder keeps fold2/ after folds.k went from 3 to 2: given as one name,
    its leftover had been averaged with the new split's models, two of them of fold 1."""
    classes = defaults("labels")["classes"]
    frac = tmp_path / "frac1.0"
    models = [str(_model(frac / f"fold{k}" / "model.pt", fold=f)) for k, f in enumerate((0, 1, 1))]
    with pytest.raises(ConfigError, match=r"fold1/model.pt and .*fold2/model.pt are both fold 1"):
        check_given_models({"dsf": models}, set(), None, classes)
    check_given_models({"dsf": models[:2]}, set(), None, classes)
    check_given_models({"a": models[:2], "b": models[2:]}, set(), None, classes)  # names apart
