"""The model sets of a prediction run (`apply.models`): their model.pt files, the slides each
was trained on, and the checks a run makes of them before it starts. No torch at import, so
the workflow parses without it; only `check_given_models` loads (maps) the models.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from dsf.errors import ConfigError
from dsf.windows import out_factor

#: The backbone of models whose model.pt names none (written before there was a choice).
LEGACY_BACKBONE = "resnet18"


def find_models(spec: dict[str, list[str]], key: str = "apply.models") -> dict[str, list[str]]:
    """The model.pt files of each name of `spec` (files, or folders searched for `model.pt`),
    sorted per folder; a missing path or a folder without models is a ConfigError naming
    `key`."""
    found: dict[str, list[str]] = {}
    for name, paths in spec.items():
        models: list[str] = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                inside = sorted((str(p) for p in path.rglob("model.pt")), key=_natural)
                if not inside:
                    raise ConfigError(
                        f"{key}.{name}: folder {raw} holds no model.pt; give the fine-tuning "
                        "folder of an earlier run (results/finetune/<init>/frac<f>) or the files"
                    )
                models += inside
            elif path.is_file():
                models.append(str(path))
            else:
                raise ConfigError(
                    f"{key}.{name}: {raw} not found (paths are relative to the working "
                    f"directory {Path.cwd()}); give model.pt files or folders holding them"
                )
        # one file named twice (a folder and its file, a relative and an absolute path) is one
        # model, not two votes in the average
        unique: dict[Path, str] = {}
        for model in models:
            unique.setdefault(Path(model).resolve(), model)
        found[name] = list(unique.values())
    return found


def _natural(path: str) -> list[Any]:
    """Sort key reading numbers as numbers: fold2 before fold10, so model<i> follows the folds."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def check_results_apart(models: dict[str, list[str]], results: str) -> None:
    """A prediction run's `results` must not hold its models: its maps, folds and scores would
    overwrite the training run's, and Snakemake, seeing the training rules' inputs changed
    (every slide of the new sheet), would retrain the very models it was given."""
    root = Path(results).resolve()
    trained = [p.name for p in (root / "folds.tsv", root / "finetune") if p.exists()]
    if trained:
        raise ConfigError(
            f"results: {results} holds a training run ({', '.join(trained)}): a prediction run "
            "there would overwrite its maps and scores (and its tissue masks, for slides of "
            "the same name); set `results` to a folder of the prediction run's own "
            "(results: results_cohort)"
        )
    for name, paths in models.items():
        for path in paths:
            if Path(path).resolve().is_relative_to(root):
                raise ConfigError(
                    f"apply.models.{name}: {path} lies under this run's results folder "
                    f"{results}: a prediction run would overwrite that training run's outputs "
                    "and retrain its models; set `results` to a folder of its own "
                    "(results: results_cohort)"
                )


def trained_on(meta: dict[str, Any]) -> set[str]:
    """The slides a fine-tuned model was fitted or selected on (its model.pt says)."""
    return set(meta.get("fit_slides", [])) | set(meta.get("select_slides", []))


def check_given_models(
    models: dict[str, list[str]],
    scored: set[str],
    patches: dict[str, Any] | None,
    classes: list[str],
    out_mpp: float | None = None,
    mpp_tolerance: float | None = None,
) -> dict[str, float]:
    """Refuse at the start what would stop a prediction run midway or average what does not
    belong together (metadata only, the weights mapped, not read): a file that is not a
    fine-tuned model; a name whose models differ in init, classes, geometry or label fraction
    (a whole results/finetune/<init> folder: its fractions would be averaged into one map);
    with annotated slides (`scored`), a model fitted or selected on one of them (scoring it
    would not be validation) or predicting other classes than `labels.classes`; with `patches`
    (the tile protocol) a model whose target mpp, block or scale differ from that section;
    an `infer.out_mpp` that is no whole multiple of the models' target mpp. Target mpp
    within `mpp_tolerance` (patches.mpp_tolerance) are one geometry. Returns each name's
    target mpp (its first model's)."""
    from dsf.checkpoints import load  # torch: only a prediction run pays for it
    from dsf.predict import REQUIRED
    from dsf.slide import tolerance

    tol = tolerance(mpp_tolerance)
    target_mpps: dict[str, float] = {}
    for name, paths in models.items():
        first: tuple[str, dict[str, Any]] | None = None
        seen: dict[str, list[str]] = {}  # annotated slide: the models that trained on it
        of_fold: dict[int, str] = {}  # fold: its model
        for path in paths:
            try:
                meta = load(Path(path), mmap=True)
            except ConfigError as exc:
                raise ConfigError(
                    f"apply.models.{name}: {path} is not a model.pt of `dsf finetune` that "
                    f"can be read ({exc}); give the fine-tuned models of a finished run"
                ) from exc
            missing = [k for k in REQUIRED if k not in meta] if isinstance(meta, dict) else REQUIRED
            if missing:
                raise ConfigError(
                    f"apply.models.{name}: {path} is not a model.pt of `dsf finetune` (it lacks "
                    f"{list(missing)}): give fine-tuned models (results/finetune/<init>/"
                    "frac<f>), not encoders or checkpoints"
                )
            if first is None:
                first = (path, meta)
                target_mpps[name] = _geometry(meta)[0]
                try:
                    out_factor(out_mpp, _geometry(meta)[0], tol)
                except ConfigError as exc:
                    raise ConfigError(f"apply.models.{name} ({path}): {exc}") from exc
            else:
                _check_alike(name, first, (path, meta), tol)
            if (fold := meta.get("fold")) is not None:
                if int(fold) in of_fold:
                    raise ConfigError(
                        f"apply.models.{name}: {of_fold[int(fold)]} and {path} are both fold "
                        f"{fold}'s model (one left from an earlier split, such as fold2 after "
                        "folds.k went from 3 to 2?); a name's models are one split's folds, "
                        "each once: remove the leftover or list the models one by one"
                    )
                of_fold[int(fold)] = path
            for slide in scored & trained_on(meta):
                seen.setdefault(slide, []).append(path)
            if scored and list(meta["classes"]) != list(classes):
                raise ConfigError(
                    f"apply.models.{name}: {path} predicts classes {list(meta['classes'])}, "
                    f"but labels.classes is {list(classes)}, which the annotated slides are "
                    "scored in: set labels.classes (and labels.names) to the models' training "
                    "config's"
                )
            if patches is not None:
                _check_geometry(name, path, meta, patches, tol)
        if seen:
            models_seen = sorted({m for ms in seen.values() for m in ms}, key=_natural)
            raise ConfigError(
                f"apply.models.{name}: {len(models_seen)} of its {len(paths)} models were "
                f"fitted or selected on annotated slides of this run (by slide id), "
                f"{len(seen)} of them: {sorted(seen)} (models: {models_seen}). Scoring them "
                "would not be validation; drop their annotations (labels) from the sheet, or "
                "give models that did not train on them. If they are other slides that share "
                "those names, give them other ids (the sheet's `slide` column)"
            )
    return target_mpps


def _geometry(meta: dict[str, Any]) -> tuple[float, int, int]:
    return float(meta["target_mpp"]), int(meta["block"]), int(meta["scale"])


def _check_alike(
    name: str,
    first: tuple[str, dict[str, Any]],
    other: tuple[str, dict[str, Any]],
    mpp_tolerance: float,
) -> None:
    """The models of one name are one fine-tuning configuration's folds: averaged (or scored
    as one set) only when they share init, backbone, target block, classes, geometry and label
    fraction (target mpp within `mpp_tolerance`: older models hold an actual mpp, 0.2527 for
    0.25)."""
    (a, ma), (b, mb) = first, other

    def facts(meta: dict[str, Any]) -> dict[str, Any]:
        mpp, block, scale = _geometry(meta)
        return {
            "init": meta["init"],
            "backbone": meta.get("backbone", LEGACY_BACKBONE),
            "target_block": meta.get("target_block"),
            "classes": list(meta["classes"]),
            "target_mpp": mpp,
            "block": block,
            "scale": scale,
            "fraction": float(meta.get("fraction", 1.0)),
        }

    fa, fb = facts(ma), facts(mb)

    def alike(key: str) -> bool:
        if key == "target_mpp":
            return math.isclose(fa[key], fb[key], rel_tol=mpp_tolerance)
        return fa[key] == fb[key]

    differ = [k for k in fa if not alike(k)]
    if differ:
        key = differ[0]
        raise ConfigError(
            f"apply.models.{name} mixes models of different {', '.join(differ)}: {a} has "
            f"{key} {fa[key]}, {b} {fb[key]}; a name's models are the folds of one "
            "fine-tuning (give one fraction's folder, results/finetune/<init>/frac<f>, per name)"
        )


def _check_geometry(
    name: str, path: str, meta: dict[str, Any], patches: dict[str, Any], mpp_tolerance: float
) -> None:
    """The tile protocol's stores must be cut with the model's geometry."""
    want = (float(patches["target_mpp"]), int(patches["block"]), int(patches["scale"]))
    got = _geometry(meta)
    if got[1:] != want[1:] or not math.isclose(got[0], want[0], rel_tol=mpp_tolerance):
        raise ConfigError(
            f"apply.models.{name}: {path} was fine-tuned on target_mpp, block, scale "
            f"{got}, but patches.target_mpp, patches.block, patches.scale are {want}: "
            "set the patches section to the models' geometry for the tile protocol"
        )
