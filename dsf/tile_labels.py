"""Labels of a slide's patch tiles: the store `patches/{slide}.labels.zarr` beside the tiles.

A patch store holds pixels only (`dsf.patches`): every tissue tile, whatever the annotation.
Its labels store holds, for the tiles whose labelled fraction passes `patches.min_label_frac`,
their tile numbers (`index`), their labels at the target mpp (`labels`, the tile's size),
their class fractions (`label_frac`) and the labelled share of their centre block
(`target_frac`: fine-tuning skips tiles whose target block holds no label). Fine-tuning and
the tile protocol read the two together (`pair_stores`); self-supervised pretraining reads the
patch store alone (DESIGN section 5: it uses no labels). So editing an annotation, a class
name or `min_label_frac` rebuilds this small store, and with it fine-tuning and evaluation,
never the slide's tiles or a pretraining (in the paper's setting days of GPU time per fold).

DESIGN section 3 has the labels inside the patch store; they live here instead for that reason.
A labels store names the build of the patch store it was cut from (`tiles_store_id`), so one
left from an earlier build is refused, not read against other tiles.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsf import __version__
from dsf.annotations import (
    GEOJSON_SUFFIXES,
    LabelSource,
    add_annotation_argument,
    class_fractions,
    open_labels,
)
from dsf.atomic import atomic_path, check_outputs, remove
from dsf.config import add_section_arguments, section_from_args, section_schema
from dsf.errors import ConfigError, SlideError
from dsf.label_settings import base_class, check_base_painted, class_index
from dsf.runner import progress_bar, run, setup_logging
from dsf.slide import BOUNDS_SUFFIXES, file_bounds
from dsf.stores import LABELS_SUFFIX, REBUILD_LABELS

log = logging.getLogger(__name__)

#: Under this share of a slide's annotated area in its tissue tiles, the annotation is warned
#: about: misplaced (another scale or slide) or over tissue the tissue mask missed.
MIN_ANNOTATED_IN_TILES = 0.5
#: The longest side of the grid (pixels) the annotated area is measured on.
COVER_PX = 2048


def labels_store_path(store: str | Path) -> Path:
    """The labels store beside patch store `store`: `x.zarr` -> `x.labels.zarr`."""
    store = Path(store)
    return store.with_name(store.name.removesuffix(".zarr") + LABELS_SUFFIX)


def tile_origins(attrs: dict[str, Any], coords: np.ndarray) -> np.ndarray:
    """(N, 2) top-left x, y of each tile in target pixels, on the store's grid.

    The store records level-0 coordinates rounded to whole pixels; the grid (offset and stride
    in target pixels) recovers the exact origins the tiles were cut at, so labels are read at
    the same sub-pixel position as the tiles."""
    f0 = float(attrs["target_mpp"]) / float(attrs["mpp"])
    grid, stride = attrs["grid"], int(attrs["stride"])
    offset = np.array([grid["offset_x"], grid["offset_y"]], np.int64)
    cells = np.rint((coords / f0 - offset) / stride).astype(np.int64)
    return offset + cells * stride


def centre_offset(block: int, scale: int) -> int:
    """Row (and column) of the centre block in a tile of `scale` x `scale` blocks: the target
    HookNet trains and the tile protocol scores on (DESIGN section 5)."""
    return block * (scale - 1) // 2


def annotated_in_tiles(
    labels: LabelSource, attrs: dict[str, Any], origins: np.ndarray, base: int | None = None
) -> float:
    """The share of the slide's annotated area (any class but 0 and the `base` class, which
    `dsf labels` paints wherever the pixel rule finds tissue, dust and pen too) that lies in
    its tissue tiles (`origins` in target pixels, the store's `attrs`), measured on a grid of
    at most `COVER_PX` a side; 1 where nothing is annotated. An annotation exported at another
    scale or for another slide mostly misses the tiles, whose labels it would still give."""
    w0, h0 = (int(v) for v in attrs["level0_size"])
    mpp0, target_mpp = float(attrs["mpp"]), float(attrs["target_mpp"])
    mpp = max(target_mpp, max(w0, h0) * mpp0 / COVER_PX)
    w, h = math.ceil(w0 * mpp0 / mpp), math.ceil(h0 * mpp0 / mpp)
    read = labels.read(0.0, 0.0, w, h, mpp)
    annotated = (read > 0) & (read != base) if base is not None else read > 0
    total = int(np.count_nonzero(annotated))
    if not total:
        return 1.0
    covered = np.zeros((h, w), bool)
    step, size = target_mpp / mpp, int(attrs["tile"]) * target_mpp / mpp
    for tx, ty in origins:
        x, y = tx * step, ty * step
        covered[
            max(0, math.floor(y)) : math.ceil(y + size), max(0, math.floor(x)) : math.ceil(x + size)
        ] = True
    return int(np.count_nonzero(annotated & covered)) / total


def build(
    store: Path,
    labels: LabelSource,
    out: Path,
    label_settings: dict[str, Any],
    min_label_frac: float,
    attrs: dict[str, Any] | None = None,
    progress: bool = True,
) -> int:
    """Write the labels store of patch store `store` from the annotation `labels` to `out`
    (atomically); return how many tiles it keeps."""
    import zarr

    from dsf.patches import ShardWriter, create_array
    from dsf.stores import open_store, store_array

    g = open_store(store)
    check_out(out, store)
    st = dict(g.attrs)
    slide = str(st["slide_id"])
    if slide != labels.slide_id:
        raise ConfigError(
            f"patch store {store} is slide {slide!r}, the annotation is for {labels.slide_id!r}: "
            "give the annotation of the store's slide"
        )
    classes = list(label_settings["classes"])
    tile, target_mpp = int(st["tile"]), float(st["target_mpp"])
    f0 = target_mpp / float(st["mpp"])
    origins = tile_origins(st, store_array(g, "coords", store)[:])
    n_all = len(origins)
    shard = int((g["tiles"].shards or g["tiles"].chunks)[0])
    block, scale = int(st["block"]), int(st["scale"])
    c0 = centre_offset(block, scale)
    index: list[int] = []
    label_frac: list[np.ndarray] = []
    target_frac: list[float] = []  # labelled share of the centre block (fine-tuning's target)
    best = 0.0  # the largest labelled fraction of a tile, for the message when none passes
    with atomic_path(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        arr = create_array(group, "labels", (n_all, tile, tile), (1, tile, tile), shard, np.uint8)
        writer = ShardWriter({"labels": arr}, shard)
        bar = progress_bar(n_all, f"tile labels {slide}", "tile", progress)
        try:
            for i, (tx, ty) in enumerate(origins):
                bar.update(1)
                slot = writer.slot()["labels"]
                slot[...] = labels.read(tx * f0, ty * f0, tile, tile, target_mpp)
                fr = class_fractions(slot, len(classes))
                best = max(best, 1.0 - float(fr[0]))
                if 1.0 - fr[0] < min_label_frac:
                    continue
                writer.commit()
                index.append(i)
                label_frac.append(fr)
                target_frac.append(float(np.count_nonzero(slot[c0 : c0 + block, c0 : c0 + block])))
        finally:
            bar.close()
            n = writer.close()
        if n == 0:
            raise SlideError(
                slide,
                f"none of the {n_all} tissue tiles has a labelled fraction >= "
                f"patches.min_label_frac ({min_label_frac}; the best tile has {best:.3g}): "
                "check that the annotation belongs to this slide (and that its classes map to "
                "labels.classes), lower patches.min_label_frac, or leave the slide's `labels` "
                "cell in the sheet empty to use it unannotated",
            )
        base = base_class(label_settings)  # matched to the classes as dsf labels does
        base_idx = class_index(base, classes, "labels.base") if base else None
        share = annotated_in_tiles(labels, st, origins, base_idx)
        if share < MIN_ANNOTATED_IN_TILES:
            log.warning(
                "%s: only %.0f%% of the annotated area lies in the slide's tissue tiles "
                "(patches.min_tissue %s): the annotation may be at another scale or of another "
                "slide (its coordinates must be this slide's level-0 pixels), or the tissue "
                "mask misses the annotated tissue (see its overlay, tissue/%s.jpg). Only the "
                "tiles are labelled: the rest of the annotation is unused",
                slide,
                100 * share,
                st.get("settings", {}).get("min_tissue"),
                slide,
            )
        arr.resize((n, tile, tile))
        # filled with -1, so a lost chunk reads as no tile number (dsf.stores checks it)
        idx = group.create_array("index", shape=(n,), dtype=np.int64, chunks=(n,), fill_value=-1)
        idx[:] = np.asarray(index, np.int64)
        group.create_array(
            "label_frac", data=np.stack(label_frac).astype(np.float32), chunks=(n, len(classes))
        )
        group.create_array(
            "target_frac",
            data=np.asarray(target_frac, np.float32) / (block * block),
            chunks=(max(1, n),),
            config={"write_empty_chunks": True},  # all 0 is a store's value, not a lost chunk
        )
        group.attrs.update(
            {
                "slide_id": slide,
                "store_id": uuid.uuid4().hex,
                "tiles_store_id": st.get("store_id"),
                "class_names": classes,
                "label_settings": label_settings,
                "settings": {"min_label_frac": min_label_frac},
                "tile": tile,
                "target_mpp": target_mpp,
                "n_tissue_tiles": n_all,
                "annotated_in_tiles": round(share, 4),
                "dsf_version": __version__,
                "n_tiles": n,
                "every_chunk": ["target_frac"],  # checked by `dsf.stores` when opened
                **(attrs or {}),
            }
        )
    log.info(
        "%s: %d of the %d tissue tiles are labelled (labelled fraction >= "
        "patches.min_label_frac %s): %s",
        slide,
        n,
        n_all,
        min_label_frac,
        out,
    )
    return n


@dataclass(frozen=True)
class LabelledStore:
    """A slide's patch store and the labels store cut from it (`pair_stores`)."""

    slide: str
    tiles: Path
    labels: Path


def check_out(out: Path, store: Path) -> None:
    """`dsf tile-labels` replaces its output whole: refuse an `out` that is the patch store
    itself or any existing folder that is not a labels store (a mistyped path would be
    deleted)."""
    import json

    out, store = Path(out), Path(store)
    if out.resolve() == store.resolve():
        raise ConfigError(
            f"--out {out} is the patch store itself: write the labels store beside it, "
            f"{labels_store_path(store)}"
        )
    if not out.exists():
        return
    try:
        attrs = json.loads((out / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        attrs = {}
    if "tiles_store_id" not in attrs:
        raise ConfigError(
            f"--out {out} exists and is not a labels store, and dsf tile-labels replaces its "
            f"output: give a new path such as {labels_store_path(store)} (or delete {out} "
            "yourself if it is a broken labels store)"
        )


def labels_store_classes(path: Path) -> list[str]:
    """The class names a labels store was labelled with."""
    from dsf.stores import open_store

    return [str(c) for c in open_store(path, kind="labels").attrs["class_names"]]


def pair_stores(
    stores: list[Path], label_stores: list[Path], classes: list[str] | None = None
) -> list[LabelledStore]:
    """Match patch stores with their labels stores by slide id, in the order of `stores`.

    Every patch store needs its labels store and every labels store its patch store, of the
    build it was cut from (and, given `classes`, labelled with those classes); else a
    ConfigError naming the store and the fix."""
    from dsf.stores import once_per_slide, open_store

    tiles: dict[str, tuple[Path, Any]] = {}
    seen: dict[str, Path] = {}
    for path in stores:
        attrs = open_store(path).attrs
        slide = str(attrs["slide_id"])
        once_per_slide(seen, slide, path)
        tiles[slide] = (Path(path), attrs)
    labels: dict[str, Path] = {}
    for path in label_stores:
        attrs = open_store(path, kind="labels").attrs
        slide = str(attrs["slide_id"])
        once_per_slide(labels, slide, path, labels=True)
        if classes is not None and list(attrs["class_names"]) != list(classes):
            raise ConfigError(
                f"labels store {path} has classes {list(attrs['class_names'])}, labels.classes "
                f"(option --classes) is {list(classes)}: the class indices would mean other "
                "classes. Set labels.classes back, or rebuild the labels store with these "
                "classes (delete it and rerun tile-labels; the workflow does so itself when "
                "labels.classes changes)"
            )
        if slide not in tiles:
            raise ConfigError(
                f"labels store {path} is slide {slide!r}, whose patch store was not given: give "
                "each slide's patch store with its labels store"
            )
        store, store_attrs = tiles[slide]
        if attrs["tiles_store_id"] != store_attrs.get("store_id"):
            raise ConfigError(
                f"labels store {path} was cut from an earlier build of the patch store {store} "
                f"of slide {slide!r}, so its tile numbers name other tiles: {REBUILD_LABELS}"
            )
    missing = [s for s in tiles if s not in labels]
    if missing:
        raise ConfigError(
            f"no labels store was given for the patch stores of slides {missing}: give each "
            "annotated slide's `<slide>.labels.zarr` too (an unannotated slide has none)"
        )
    return [LabelledStore(s, path, labels[s]) for s, (path, _) in tiles.items()]


def labelled_store_ids(pairs: list[LabelledStore]) -> dict[str, str | None]:
    """Slide id -> the `store_id`s of its patch and labels stores, joined: what a fine-tuning
    checkpoint records (`dsf.checkpoints.check_stores`), so rebuilt tiles or labels both tell."""
    from dsf.stores import store_ids

    tiles = store_ids([p.tiles for p in pairs])
    labels = store_ids([p.labels for p in pairs])
    return {s: f"{tiles[s]}+{labels[s]}" for s in tiles}


# -- command line -----------------------------------------------------------------------------


def _bounds(store: Path, attrs: Any, annotation: Path) -> tuple[int, int, int, int] | None:
    """The slide's `Slide.bounds`, as its store records them. A store of an earlier dsf
    records none: then its slide is asked, where the annotation is GeoJSON (the only kind
    counted from their corner) and the slide may have bounds."""
    if "bounds" in attrs:
        given = attrs["bounds"]
        return (int(given[0]), int(given[1]), int(given[2]), int(given[3])) if given else None
    if annotation.suffix.lower() not in GEOJSON_SUFFIXES:
        return None
    source = Path(str(attrs["source"]))
    if source.is_file():
        return file_bounds(source, str(attrs["slide_id"]))
    if source.suffix.lower() in BOUNDS_SUFFIXES:
        raise ConfigError(
            f"{store} was cut by an earlier dsf that did not record the scanned region QuPath "
            f"counts coordinates from, and its slide {source} is gone: put the slide back there "
            "for this job (only its properties are read), or delete the store to cut it again "
            "(which reruns the pretraining that read it)"
        )
    # a slide moved since (`snakemake --touch` kept its results), of a format without bounds
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf tile-labels",
        description="Label the tiles of one slide's patch store from its annotation: the "
        "labels store fine-tuning and the tile protocol read beside the patch store.",
    )
    p.add_argument("--store", required=True, type=Path, help="the slide's patch store (.zarr)")
    add_annotation_argument(p)
    p.add_argument("--out", required=True, type=Path, help="labels store to write (.labels.zarr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # of the patches settings only min_label_frac: the tiles are cut already
    others = tuple(k for k in section_schema("patches")["properties"] if k != "min_label_frac")
    add_section_arguments(p, "patches", skip=others)
    add_section_arguments(p, "labels", skip=("masks",))  # the workflow's file patterns
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf tile-labels`: one patch store and its annotation -> `{slide}.labels.zarr`."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        from dsf.stores import open_store

        check_outputs([args.out], [args.store, args.labels])
        remove(args.out)  # a failed rerun must not leave the previous store looking current
        min_label_frac = section_from_args(args, "patches")["min_label_frac"]
        label_settings = section_from_args(args, "labels")
        check_base_painted(label_settings, args.labels, "tile-labels")
        attrs = open_store(args.store).attrs
        labels = open_labels(
            args.labels,
            str(attrs["slide_id"]),
            tuple(attrs["level0_size"]),
            float(attrs["mpp"]),
            label_settings,
            _bounds(args.store, attrs, args.labels),
        )
        build(
            args.store,
            labels,
            args.out,
            label_settings,
            min_label_frac,
            {"labels_source": str(args.labels)},
            progress=not args.no_progress,
        )

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
