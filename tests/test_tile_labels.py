"""Labels stores: the labels of a patch store's tiles, kept apart from the tiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from dsf.annotations import open_labels
from dsf.config import defaults
from dsf.errors import ConfigError
from dsf.patches import extract
from dsf.slide import open_slide
from dsf.tile_labels import (
    annotated_in_tiles,
    build,
    labels_store_path,
    pair_stores,
    tile_origins,
)

from conftest import rgb_slide

CLASSES = defaults("labels") | {"classes": ["ignore", "A", "B"]}


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 600 x 400 slide, all tissue, at 0.5 um/px; its patch store at 0.75 um/px (tiles not on
    whole level-0 pixels); a GeoJSON labelling its left third A and a square of B."""
    d = tmp_path_factory.mktemp("tile-labels")
    rgb = np.full((400, 600, 3), 150, np.uint8)
    rgb_slide(d / "s.tif", rgb, 0.5, tile=64)
    slide = open_slide(d / "s.tif")

    def feature(name: str, x0: int, y0: int, x1: int, y1: int) -> dict:
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"classification": {"name": name}},
        }

    ann = d / "s.geojson"
    feats = [feature("A", 0, 0, 200, 400), feature("B", 400, 100, 500, 200)]
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    st = defaults("patches") | {"target_mpp": 0.75, "block": 16, "stride": 24, "min_tissue": 0.5}
    store = d / "s.zarr"
    n_all = extract(slide, np.ones((50, 75), bool), 8.0, store, st, progress=False)
    return {"dir": d, "slide": slide, "ann": ann, "store": store, "n_all": n_all, "st": st}


def _labels(cut: dict, out: Path, min_frac: float = 0.1) -> int:
    src = open_labels(cut["ann"], "s", cut["slide"].dimensions, cut["slide"].mpp, CLASSES)
    return build(cut["store"], src, out, CLASSES, min_frac, progress=False)


def test_labels_store_keeps_the_labelled_tiles_of_an_unfiltered_patch_store(
    cut: dict, tmp_path: Path
) -> None:
    out = tmp_path / "s.labels.zarr"
    n = _labels(cut, out)
    g = zarr.open_group(str(cut["store"]), mode="r")
    lab = zarr.open_group(str(out), mode="r")
    # the patch store holds every tissue tile, labelled or not, and no labels
    assert "labels" not in g and "label_frac" not in g and g.attrs["n_tiles"] == cut["n_all"]
    index, labels, frac = lab["index"][:], lab["labels"][:], lab["label_frac"][:]
    assert 0 < n < cut["n_all"] and len(index) == len(labels) == len(frac) == n
    assert np.all(np.diff(index) > 0) and index[-1] < cut["n_all"]
    # the labels are those of the annotation where each kept tile lies
    src = open_labels(cut["ann"], "s", cut["slide"].dimensions, cut["slide"].mpp, CLASSES)
    origins = tile_origins(dict(g.attrs), g["coords"][:])
    f0 = 0.75 / cut["slide"].mpp
    for j in (0, n // 2, n - 1):
        x, y = origins[index[j]]
        np.testing.assert_array_equal(labels[j], src.read(x * f0, y * f0, 64, 64, 0.75))
    np.testing.assert_allclose(frac.sum(1), 1.0, atol=1e-5)
    assert (1 - frac[:, 0] >= 0.1).all()
    # every dropped tile is labelled under the threshold
    dropped = sorted(set(range(cut["n_all"])) - set(index))
    for i in dropped[:: max(1, len(dropped) // 5)]:
        x, y = origins[i]
        assert (src.read(x * f0, y * f0, 64, 64, 0.75) > 0).mean() < 0.1
    assert set(np.unique(labels)) == {0, 1, 2}
    assert lab.attrs["tiles_store_id"] == g.attrs["store_id"] != lab.attrs["store_id"]
    assert lab.attrs["class_names"] == CLASSES["classes"]
    assert lab.attrs["settings"] == {"min_label_frac": 0.1}
    # a higher min_label_frac keeps fewer tiles: only the labels store changes
    assert _labels(cut, tmp_path / "strict.labels.zarr", 0.9) < n


def test_tile_origins_recover_the_grid_from_rounded_coords(cut: dict) -> None:
    g = zarr.open_group(str(cut["store"]), mode="r")
    attrs = dict(g.attrs)
    origins = tile_origins(attrs, g["coords"][:])
    grid = attrs["grid"]
    assert ((origins[:, 0] - grid["offset_x"]) % attrs["stride"] == 0).all()
    assert ((origins[:, 1] - grid["offset_y"]) % attrs["stride"] == 0).all()
    # the stored level-0 coords are these origins, rounded
    f0 = attrs["target_mpp"] / attrs["mpp"]
    np.testing.assert_array_equal(np.rint(origins * f0).astype(np.int64), g["coords"][:])


def test_a_labels_store_belongs_to_one_build_of_its_patch_store(cut: dict, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(cut["store"], store)
    labels = labels_store_path(store)
    assert labels == tmp_path / "s.labels.zarr"
    src = open_labels(cut["ann"], "s", cut["slide"].dimensions, cut["slide"].mpp, CLASSES)
    build(store, src, labels, CLASSES, 0.1, progress=False)
    (pair,) = pair_stores([store], [labels])
    assert (pair.slide, pair.tiles, pair.labels) == ("s", store, labels)
    with pytest.raises(ConfigError, match="no labels store was given.*'s'"):
        pair_stores([store], [])
    with pytest.raises(ConfigError, match="not a labels store"):
        pair_stores([store], [store])
    # the patch store rebuilt: its tile numbers may name other tiles now
    extract(cut["slide"], np.ones((50, 75), bool), 8.0, store, cut["st"], progress=False)
    with pytest.raises(ConfigError, match="earlier build of the patch store.*tile-labels"):
        pair_stores([store], [labels])
    with pytest.raises(ConfigError, match="whose patch store was not given"):
        pair_stores([], [labels])
    # an annotation of another slide is refused
    other = open_labels(cut["ann"], "t", cut["slide"].dimensions, cut["slide"].mpp, CLASSES)
    with pytest.raises(ConfigError, match="slide 's', the annotation is for 't'"):
        build(store, other, tmp_path / "t.labels.zarr", CLASSES, 0.1, progress=False)
    assert not (tmp_path / "t.labels.zarr").exists()


def test_read_rows_reads_runs_of_rows_as_slices(cut: dict) -> None:
    from dsf.stores import open_store, read_rows, store_array

    tiles = store_array(open_store(cut["store"]), "tiles", cut["store"])
    full = tiles[:]
    for rows in ([0], [0, 1, 2], [1, 2, 5, 6, 7, 9], list(range(cut["n_all"]))):
        np.testing.assert_array_equal(read_rows(tiles, np.array(rows)), full[rows])
    np.testing.assert_array_equal(
        read_rows(tiles, np.array([2, 3, 7]), slice(8, 24), slice(8, 24)),
        full[[2, 3, 7], 8:24, 8:24],
    )


def test_labels_and_patch_stores_are_not_taken_for_each_other(cut: dict, tmp_path: Path) -> None:
    """A labels store given where a patch store belongs (a glob of results/patches/*.zarr),
    or labelled with other classes than the run's, is refused by name with the fix."""
    from dsf.stores import open_store

    labels = tmp_path / "s.labels.zarr"
    _labels(cut, labels)
    with pytest.raises(ConfigError, match=r"s.labels.zarr is a labels store .*not a patch store"):
        open_store(labels)
    with pytest.raises(ConfigError, match=r"give the slide's patch store"):
        build(labels, None, tmp_path / "x.labels.zarr", CLASSES, 0.1)  # type: ignore[arg-type]
    assert open_store(labels, kind=None).attrs["n_tiles"] > 0
    (pair,) = pair_stores([cut["store"]], [labels], ["ignore", "A", "B"])
    assert pair.labels == labels
    with pytest.raises(ConfigError, match=r"has classes \['ignore', 'A', 'B'\], labels.classes"):
        pair_stores([cut["store"]], [labels], ["ignore", "B", "A"])
    with pytest.raises(ConfigError, match="both slide 's'"):
        pair_stores([cut["store"]], [labels, labels])


def test_a_labels_store_with_a_lost_chunk_is_refused_as_a_labels_store(
    cut: dict, tmp_path: Path
) -> None:
    """A lost index chunk would read as zeros (every labelled tile paired with tile 0's pixels),
    a lost labels shard as unlabelled tiles and a lost target_frac chunk as tiles without a
    labelled centre (which fine-tuning skips): all are refused, naming the labels store and
    the tile_labels fix, not the patch store."""
    from dsf.stores import open_store

    labels = tmp_path / "s.labels.zarr"
    _labels(cut, labels)
    assert zarr.open_group(str(labels), mode="r")["index"].fill_value == -1
    for lost in ("index/c/0", "labels/c/0/0/0", "label_frac/c/0/0", "target_frac/c/0"):
        broken = tmp_path / f"broken-{lost.split('/')[0]}.labels.zarr"
        shutil.copytree(labels, broken)
        (broken / lost).unlink()
        with pytest.raises(ConfigError, match=r"^labels store .*broken.*tile_labels stage") as e:
            open_store(broken, kind="labels")
        assert "patches stage" not in str(e.value)
    with pytest.raises(ConfigError, match=r"labels store .*gone.labels.zarr not found.*labels"):
        open_store(tmp_path / "gone.labels.zarr", kind="labels")


def test_tile_labels_never_replaces_what_is_not_its_own_output(cut: dict, tmp_path: Path) -> None:
    """--out is replaced whole: the patch store itself, or a folder that is not a labels store
    (a mistyped path), is refused and left as it was; an earlier labels store is replaced."""
    store = tmp_path / "s.zarr"
    shutil.copytree(cut["store"], store)
    with pytest.raises(ConfigError, match="is the patch store itself.*s.labels.zarr"):
        _labels(cut | {"store": store}, store)
    other = tmp_path / "results"
    (other / "keep").mkdir(parents=True)
    with pytest.raises(ConfigError, match="exists and is not a labels store"):
        _labels(cut | {"store": store}, other)
    assert (other / "keep").is_dir() and (store / "tiles").is_dir()
    labels = labels_store_path(store)
    first = _labels(cut | {"store": store}, labels)
    assert _labels(cut | {"store": store}, labels, min_frac=0.9) < first  # replaced


def test_no_labelled_tile_says_the_best_fraction_and_how_to_go_on(
    cut: dict, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match=r"the best tile has 1\): .*leave the slide's `labels`"):
        _labels(cut, tmp_path / "s.labels.zarr", min_frac=1.01)


def test_base_is_refused_where_it_would_be_ignored(cut: dict, tmp_path: Path) -> None:
    """`--base` paints the tissue no annotation covers, which `dsf labels` does: given to
    `dsf tile-labels` (or `dsf evaluate slide`) with an annotation it had been ignored
    silently; now it is refused with the way to the painted mask, which it accepts."""
    from dsf.class_tiff import write_tiff
    from dsf.label_settings import check_base_painted
    from dsf.tile_labels import main

    out = tmp_path / "b.labels.zarr"
    argv = ["--store", str(cut["store"]), "--labels", str(cut["ann"]), "--out", str(out)]
    argv += ["--classes", "ignore", "A", "B"]
    assert main([*argv, "--base", "B"]) == 2 and not out.exists()
    with pytest.raises(ConfigError, match=r"--base B: `dsf evaluate slide` .*dsf labels --slide"):
        check_base_painted(CLASSES | {"base": "B"}, cut["ann"], "evaluate slide")
    painted = tmp_path / "painted.tiff"
    mask = np.zeros((400, 600), np.uint8)
    write_tiff(painted, [mask], 0.5, 3, tile=64, threads=1, classes=["ignore", "A", "B"])
    check_base_painted(CLASSES | {"base": "B"}, painted, "evaluate slide")  # the painted mask
    check_base_painted(CLASSES, cut["ann"], "tile-labels")  # no base: any annotation
    assert main(argv) == 0 and out.is_dir()


def test_an_annotation_that_mostly_misses_the_tissue_tiles_is_warned_about(
    cut: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where most of the annotated area lies outside the tissue tiles (an annotation at another
    scale or of another slide), the labels store says how much lies in them and warns; the
    annotation of the fixture, whose tiles cover the whole slide, is not warned about."""
    import logging

    caplog.set_level(logging.WARNING, "dsf.tile_labels")
    _labels(cut, tmp_path / "all.labels.zarr")
    # the grid's tiles leave a margin at the slide's edges
    assert zarr.open_group(str(tmp_path / "all.labels.zarr")).attrs["annotated_in_tiles"] > 0.9
    assert not caplog.records
    # tissue only in the right half: A (the left third, 80,000 px²) lies outside every tile,
    # B (10,000 px², in the right half) inside
    mask = np.zeros((50, 75), bool)
    mask[:, 19:] = True  # the mask is 8 um/px, the slide 300 um wide
    store = tmp_path / "right.zarr"
    extract(cut["slide"], mask, 8.0, store, cut["st"], progress=False)
    _labels(cut | {"store": store}, tmp_path / "right.labels.zarr")
    share = zarr.open_group(str(tmp_path / "right.labels.zarr")).attrs["annotated_in_tiles"]
    assert 0.09 < share < 0.14
    [warned] = caplog.records
    assert "s: only 1" in warned.getMessage() and "another scale" in warned.getMessage()
    # a base class (painted wherever the pixel rule sees tissue, dust too) is not counted
    g = zarr.open_group(str(store), mode="r")
    src = open_labels(cut["ann"], "s", cut["slide"].dimensions, cut["slide"].mpp, CLASSES)
    origins = tile_origins(dict(g.attrs), g["coords"][:])
    assert annotated_in_tiles(src, dict(g.attrs), origins, base=1) > 0.9
    # labels.base in another case than labels.classes, as dsf labels accepts it: not a crash
    # at the end of the job (`classes.index` had matched the case)
    lower = CLASSES | {"base": "a"}
    build(store, src, tmp_path / "base.labels.zarr", lower, 0.1, progress=False)
    assert zarr.open_group(str(tmp_path / "base.labels.zarr")).attrs["annotated_in_tiles"] > 0.9
