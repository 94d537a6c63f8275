"""The model sets of a prediction run (`apply.models`): their model.pt files, the slides each
was trained on, and the checks a run makes of them before it starts. No torch at import, so
the workflow parses without it; only `check_given_models` loads (maps) the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsf.errors import ConfigError


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
                inside = sorted(str(p) for p in path.rglob("model.pt"))
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
        found[name] = list(dict.fromkeys(models))
    return found


def trained_on(meta: dict[str, Any]) -> set[str]:
    """The slides a fine-tuned model was fitted or selected on (its model.pt says)."""
    return set(meta.get("fit_slides", [])) | set(meta.get("select_slides", []))


def check_given_models(
    models: dict[str, list[str]],
    scored: set[str],
    patches: dict[str, Any] | None,
    classes: list[str],
    one_fraction: bool,
) -> None:
    """Refuse at the start what would stop a prediction run midway (metadata only, the weights
    mapped, not read): an annotated slide (`scored`) among a model's fit or selection slides
    (scoring it would not be validation); with `patches` (the tile protocol) a model whose
    target mpp, block, scale or classes differ from the `patches` and `labels` sections; with
    `one_fraction` (each model scored alone) a set whose models differ in label fraction."""
    from dsf.checkpoints import load  # torch: only a prediction run pays for it

    for name, paths in models.items():
        fractions = set()
        for path in paths:
            meta = load(Path(path), mmap=True)
            fractions.add(float(meta.get("fraction", 1.0)))
            seen = sorted(scored & trained_on(meta))
            if seen:
                raise ConfigError(
                    f"apply.models.{name}: {path} was fitted or selected on annotated slides "
                    f"{seen} of this run: scoring them would not be validation; drop their "
                    "annotations (labels) from the sheet, or give models that did not train "
                    "on them"
                )
            if patches is not None:
                _check_geometry(name, path, meta, patches, classes)
        if one_fraction and len(fractions) > 1:
            raise ConfigError(
                f"apply.models.{name} mixes models fine-tuned on label fractions "
                f"{sorted(fractions)}: scored one by one they would not form one set; give one "
                "fraction's folder (results/finetune/<init>/frac<f>) per name"
            )


def _check_geometry(
    name: str, path: str, meta: dict[str, Any], patches: dict[str, Any], classes: list[str]
) -> None:
    """The tile protocol's stores must be cut with the model's geometry and classes."""
    want = (float(patches["target_mpp"]), int(patches["block"]), int(patches["scale"]))
    got = (float(meta["target_mpp"]), int(meta["block"]), int(meta["scale"]))
    if got[1:] != want[1:] or abs(got[0] - want[0]) > 1e-3 * want[0]:
        raise ConfigError(
            f"apply.models.{name}: {path} was fine-tuned on target_mpp, block, scale "
            f"{got}, but patches.target_mpp, patches.block, patches.scale are {want}: "
            "set the patches section to the models' geometry for the tile protocol"
        )
    if list(meta["classes"]) != list(classes):
        raise ConfigError(
            f"apply.models.{name}: {path} predicts classes {list(meta['classes'])}, "
            f"labels.classes is {list(classes)}: set labels.classes to the models'"
        )
