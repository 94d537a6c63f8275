"""The `labels` section's class settings, checked before any annotation is read.

Class names (`labels.classes`), the raster code map (`class_map`, `other_class`), annotation
names (`names`), per-class masks and the base class (`base`) must agree with one another and
with the score tables' columns; each problem is a ConfigError naming its config key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dsf.errors import ConfigError

log = logging.getLogger(__name__)


def check_label_settings(settings: dict[str, Any]) -> None:
    """Every class index of the `labels` section must name one of `labels.classes`, and every
    `class_map` key must be a raster code 0-255; else a ConfigError naming the key."""
    classes = list(settings["classes"])
    _check_class_names(classes)
    _check_name_keys(settings)
    n = len(classes)
    fix = f"class indices are 0..{n - 1} of labels.classes {classes}"
    for key in ("class_map", "names", "geojson_names"):
        for name, cls in settings.get(key, {}).items():
            if not 0 <= int(cls) < n:
                raise ConfigError(f"config key labels.{key}: {name!r} -> {cls}, but {fix}")
    for code in settings["class_map"]:
        if not str(code).isdigit() or int(code) > 255:
            raise ConfigError(
                f"config key labels.class_map: {code!r} is not a raster code; keys are mask "
                "codes 0-255 written as strings"
            )
    if settings.get("geojson_names"):
        log.warning(
            "config key labels.geojson_names is the older name of labels.names (it also maps "
            "XML annotation names now); it is still read: rename it"
        )
    if not 0 <= int(settings["other_class"]) < n:
        raise ConfigError(f"config key labels.other_class: {settings['other_class']}, but {fix}")
    for name in settings.get("masks", {}):
        class_index(name, classes, f"labels.masks.{name}")
    for key in ("base", "masks_base"):
        if settings.get(key) is not None:
            class_index(settings[key], classes, f"labels.{key}")
    if settings.get("masks_base") is not None:
        log.warning(
            "config key labels.masks_base is the older name of labels.base (it applies to "
            "every annotation now); it is still read: rename it"
        )


def _check_name_keys(settings: dict[str, Any]) -> None:
    """`labels.names` keys are matched like class names (case and outer spaces aside): two
    keys that read alike for different classes, or a key that reads as a class name but maps
    elsewhere, would leave the class to the order the keys come in."""
    own = {c.strip().lower(): i for i, c in enumerate(settings["classes"])}
    seen: dict[str, tuple[str, int]] = {}
    for key in ("geojson_names", "names"):
        for name, cls in (settings.get(key) or {}).items():
            low = str(name).strip().lower()
            if low in own and own[low] != int(cls):
                raise ConfigError(
                    f"config key labels.{key}: {name!r} -> {cls}, but {name!r} is the class "
                    f"name of index {own[low]} in labels.classes: map only names that are not "
                    "class names (or rename the class)"
                )
            if low in seen and seen[low][1] != int(cls):
                raise ConfigError(
                    f"config key labels.{key}: {seen[low][0]!r} and {name!r} read as one name "
                    f"(names are matched case-insensitively) but map to {seen[low][1]} and "
                    f"{cls}: keep one"
                )
            seen[low] = (str(name), int(cls))


def _check_class_names(classes: list[str]) -> None:
    """Class names are matched case-insensitively and name the score columns (`f1_<class>`,
    and `cm_<true>_<predicted>` with `bg` for pixels predicted as background,
    `evaluate.confusion_columns`): two that read alike would merge their scores."""
    seen: dict[str, str] = {}
    for name in classes:
        if not name.strip() or name.strip() != name or name.startswith("-"):
            raise ConfigError(
                f"config key labels.classes: {name!r} cannot be a class name (empty, outer "
                "spaces, or a leading `-`, which reads as an option on a command line); "
                "rename it, e.g. 'negative' for '-ve'"
            )
        if name.lower() in seen:
            raise ConfigError(
                f"config key labels.classes: {seen[name.lower()]!r} and {name!r} are one class "
                "name (names are matched case-insensitively); give every class its own name"
            )
        seen[name.lower()] = name
    if "bg" in seen:
        raise ConfigError(
            f"config key labels.classes: {seen['bg']!r} is reserved (the score tables' column "
            "of pixels predicted as background); rename that class, e.g. background"
        )
    if "mapped" in classes[1:]:  # areas.tsv's `mapped_mm2` is every class's area together
        raise ConfigError(
            "config key labels.classes: 'mapped' is reserved (areas.tsv's column of the area "
            "that got any class); rename that class"
        )
    fg = classes[1:]
    pairs: dict[str, tuple[str, str]] = {}
    for t in fg:
        for p in [*fg, "bg"]:
            column = f"{t}_{p}".lower()
            if column in pairs:
                raise ConfigError(
                    f"config key labels.classes: the pairs {pairs[column]} and {(t, p)} give "
                    f"one score column (cm_{column}); rename a class so that its name and "
                    "another's joined by `_` do not spell a third pair"
                )
            pairs[column] = (t, p)


def fold_older_keys(settings: dict[str, Any]) -> None:
    """Move the older keys' values to the keys that replace them (`geojson_names` into
    `names`, `masks_base` into `base`), in place: renamed as the warning asks, a config then
    gives the stages the same options, so the rename reruns nothing."""
    if settings.get("geojson_names"):
        settings["names"] = {**settings["geojson_names"], **settings.get("names", {})}
        settings["geojson_names"] = {}
    if settings.get("masks_base") is not None:
        if settings.get("base") is None:
            settings["base"] = settings["masks_base"]
        settings["masks_base"] = None


def base_class(settings: dict[str, Any]) -> str | None:
    """The class of tissue no annotation covers (`labels.base`, or its older name)."""
    base = settings.get("base")
    return base if base is not None else settings.get("masks_base")


def check_base_painted(settings: dict[str, Any], labels: str | Path, stage: str) -> None:
    """A ConfigError when `--base` is given to a stage that reads labels (`stage`) with an
    annotation rather than the label mask `dsf labels` painted over the base class: such a
    stage reads the base class from that mask and would have ignored the option."""
    from dsf.class_tiff import described_codes

    base = base_class(settings)
    path = Path(labels)
    painted = path.suffix.lower() in {".tif", ".tiff"} and described_codes(path) is not None
    if base is not None and not painted:
        raise ConfigError(
            f"--base {base}: `dsf {stage}` reads the base class from the label mask `dsf "
            f"labels` paints, not from {path}: run `dsf labels --slide SLIDE --annotation "
            f"{path} --base {base} --out mask.tiff` and give mask.tiff as --labels (or leave "
            "--base out)"
        )


def class_index(name: str, classes: list[str], key: str) -> int:
    """The index of class `name` in `classes` (case-insensitive); a ConfigError naming `key`
    when it is not one of them (0, the ignore class, is no class to paint either)."""
    lower = [c.lower() for c in classes]
    if name.lower() not in lower[1:]:
        raise ConfigError(
            f"config key {key}: {name!r} is not a class of labels.classes {classes[1:]} "
            "(index 0 is the unlabelled class)"
        )
    return lower.index(name.lower(), 1)
