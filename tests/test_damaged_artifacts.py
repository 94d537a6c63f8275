"""Damaged or incomplete artifacts of earlier stages (patch stores, class maps): a ConfigError
naming the file and the fix (exit status 2 from the CLI), never a Zarr, codec or TIFF error."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dsf.class_map import open_map
from dsf.class_tiff import pyramid_shapes, write_tiff
from dsf.errors import ConfigError
from dsf.stores import open_store, store_array
from dsf.tiles import TileDataset

CLASSES = ["ignore", "TUM", "STR", "LYM"]
FIX = r"damaged or incomplete: delete it and rerun the patches stage"


@pytest.fixture(scope="module")
def store(make_store: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("damaged"), "A", 1, block=16, scale=2, stride=24)


def _copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / store.name
    shutil.copytree(store, out)
    return out


def _shard(store: Path, array: str) -> Path:
    """The one shard file of an array (the synthetic stores fit one shard)."""
    (shard,) = (p for p in (store / array / "c").rglob("*") if p.is_file())
    return shard


def _raises(path: Path, what: str) -> pytest.RaisesExc[ConfigError]:
    return pytest.raises(ConfigError, match=rf"patch store {re.escape(str(path))}: {what}.*{FIX}")


def test_a_valid_store_reads_the_same_through_every_path(store: Path) -> None:
    data = TileDataset([store])
    g = open_store(store)
    tiles = store_array(g, "tiles", store)
    assert tiles.shape == tuple(g["tiles"].shape) and len(tiles) == len(data) > 4
    assert np.array_equal(data.read([3, 1]).numpy(), g["tiles"][[3, 1]])
    assert np.array_equal(data[2].numpy(), tiles[2])
    assert np.array_equal(store_array(g, "context", store)[0:4], g["context"][0:4])


def test_a_store_given_twice_is_refused(store: Path) -> None:
    """Pretraining had counted its tiles twice, and its outputs named the slide once."""
    with pytest.raises(ConfigError, match=r"patch stores .* and .* are both slide 'A'"):
        TileDataset([store, store])


def test_a_store_without_its_group_metadata(store: Path, tmp_path: Path) -> None:
    broken = _copy(store, tmp_path)
    (broken / "zarr.json").unlink()
    with _raises(broken, "cannot open its Zarr group"):
        open_store(broken)
    with _raises(broken, "cannot open its Zarr group"):
        TileDataset([broken])


def test_a_store_whose_group_metadata_is_not_json(store: Path, tmp_path: Path) -> None:
    broken = _copy(store, tmp_path)
    (broken / "zarr.json").write_text('{"zarr_format": 3, "node_')
    with _raises(broken, "cannot open its Zarr group"):
        open_store(broken)


def test_a_store_without_n_tiles_is_incomplete(store: Path, tmp_path: Path) -> None:
    broken = _copy(store, tmp_path)
    meta = json.loads((broken / "zarr.json").read_text())
    del meta["attributes"]["n_tiles"]
    (broken / "zarr.json").write_text(json.dumps(meta))
    with _raises(broken, "no n_tiles"):
        open_store(broken)


@pytest.mark.parametrize("array", ["tiles", "context"])
@pytest.mark.parametrize("lost", ["metadata", "shard"])
def test_an_array_missing_a_file(store: Path, tmp_path: Path, array: str, lost: str) -> None:
    """Found when the store is opened: an array's metadata gone (`"labels" in group` would
    read a damaged array as an absent one) or a shard file gone (a partial copy; Zarr would
    read its tiles as black ones)."""
    n = int(open_store(store).attrs["n_tiles"])
    broken = _copy(store, tmp_path)
    if lost == "metadata":
        (broken / array / "zarr.json").unlink()
        said = f"array '{array}' has no metadata"
    else:
        _shard(broken, array).unlink()
        said = rf"array '{array}' lacks its shard c/0/0/0/0 \(tiles 0 to {n - 1}\)"
    with _raises(broken, said):
        open_store(broken)
    with _raises(broken, said):
        TileDataset([broken], array=array)


@pytest.mark.parametrize(("array", "chunk"), [("coords", "c/0/0"), ("tissue", "c/0")])
def test_a_lost_coords_or_tissue_chunk(store: Path, tmp_path: Path, array: str, chunk: str) -> None:
    """Read as zeros, a lost coords chunk had put every tile at the slide's origin, and the
    labels cut for them at one place, without a word."""
    assert open_store(store).attrs["every_chunk"] == ["coords", "tissue"]
    broken = _copy(store, tmp_path)
    (broken / array / chunk).unlink()
    with _raises(broken, rf"array '{array}' lacks its chunk {chunk} .*would read as zeros"):
        open_store(broken)


def test_an_array_whose_metadata_is_not_json(store: Path, tmp_path: Path) -> None:
    broken = _copy(store, tmp_path)
    (broken / "tiles" / "zarr.json").write_text("{")
    with _raises(broken, "cannot open array 'tiles'"):
        TileDataset([broken])
    with _raises(broken, "cannot open array 'tiles'"):  # found when the store is opened
        open_store(broken)
    g = open_store(store)
    with _raises(store, "cannot open array 'labels'"):  # not in an unlabelled store
        store_array(g, "labels", store)


@pytest.mark.parametrize("keep", [0.5, 3000])
def test_a_truncated_shard(store: Path, tmp_path: Path, keep: float) -> None:
    """Every read path (one tile, a batch, another module's reads) names the store, the tile
    and the fix."""
    broken = _copy(store, tmp_path)
    for array in ("tiles", "context"):
        shard = _shard(broken, array)
        os.truncate(shard, int(shard.stat().st_size * keep) if keep < 1 else int(keep))
    data = TileDataset([broken])  # the metadata is whole: the store opens
    with _raises(broken, "tile 0 could not be read"):
        data[0]
    with _raises(broken, "tile 1 could not be read"):
        data.read([3, 1])
    out = np.empty((2, *data.tile_shape), np.uint8)
    with _raises(broken, "tile 2 could not be read"):
        data.read_into(out, [2, 5])
    context = store_array(open_store(broken), "context", broken)
    with _raises(broken, "tiles 0 to 3 could not be read"):
        context[0:4]
    with _raises(broken, "tile 4 could not be read"):
        context[4, 2:6, 2:6]


def test_a_shard_of_garbage(store: Path, tmp_path: Path) -> None:
    broken = _copy(store, tmp_path)
    shard = _shard(broken, "tiles")
    raw = bytearray(shard.read_bytes())
    raw[: len(raw) // 2] = bytes(len(raw) // 2)
    shard.write_bytes(bytes(raw))
    with _raises(broken, "tile 0 could not be read"):
        TileDataset([broken]).read([0])


def test_a_file_given_as_a_store(tmp_path: Path) -> None:
    path = tmp_path / "A.zarr"
    path.write_text("not a store")
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(path))} is a file, not a patch store folder.*rerun"
    ):
        open_store(path)
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(tmp_path / 'B.zarr'))} not found.*patches stage"
    ):
        open_store(tmp_path / "B.zarr")


def test_the_cli_exits_2_with_one_line(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dsf.norm import main

    broken = _copy(store, tmp_path)
    (broken / "zarr.json").unlink()
    rc = main(["--stores", str(broken), "--out", str(tmp_path / "n.json"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"patch store {broken}" in err and "Traceback" not in err


def _write_map(path: Path, rng_seed: int = 0, shape: tuple[int, int] = (300, 400)) -> Path:
    """A class map as `dsf infer` writes it (palette pyramid, levels halved) and its JSON;
    random classes, so its tiles do not compress to nothing."""
    level0 = np.random.default_rng(rng_seed).integers(0, len(CLASSES), shape, dtype=np.uint8)
    levels = [level0]
    for h, w in pyramid_shapes(*shape, 64)[1:]:
        levels.append(levels[-1][::2, ::2][:h, :w])
    write_tiff(path, levels, 2.0, len(CLASSES), tile=64, threads=1)
    meta = {"slide": "s", "init": "dsf", "fraction": 1.0, "mpp": 2.0, "classes": CLASSES,
            "width": shape[1], "height": shape[0], "folds": [0],
            "routing": "out_of_fold"}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


MAP_FIX = r"damaged or incomplete: delete it \(and its \.json\) and rerun infer"


@pytest.fixture(scope="module")
def class_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_map(tmp_path_factory.mktemp("maps") / "m.tiff")


def _copy_map(cmap: Path, tmp_path: Path) -> Path:
    out = tmp_path / cmap.name
    shutil.copy(cmap, out)
    shutil.copy(cmap.with_suffix(".json"), out.with_suffix(".json"))
    return out


def test_a_valid_map_reads(class_map: Path) -> None:
    cmap = open_map(class_map)
    assert len(cmap.levels) > 1
    level0 = cmap.read_level(0)
    assert level0.shape == (300, 400)
    assert np.array_equal(np.concatenate([b for _, b in cmap.bands(64)]), level0)
    rows, cols = np.arange(0, 300, 7), np.arange(0, 400, 9)
    assert np.array_equal(cmap.sample(0, rows, cols), level0[np.ix_(rows, cols)])


def test_a_missing_map_is_named_before_its_json(class_map: Path, tmp_path: Path) -> None:
    """A map and its JSON both gone (a slide never mapped): the message names the map."""
    gone = tmp_path / "never.tiff"
    with pytest.raises(ConfigError, match=r"class map .*never\.tiff not found; run infer"):
        open_map(gone)
    cmap = _copy_map(class_map, tmp_path)
    cmap.with_suffix(".json").unlink()
    with pytest.raises(ConfigError, match=r"cannot read map description .*; rerun infer"):
        open_map(cmap)


@pytest.mark.parametrize("keep", [0, 5, 3000, -100])
def test_a_truncated_map(class_map: Path, tmp_path: Path, keep: int) -> None:
    cmap = _copy_map(class_map, tmp_path)
    os.truncate(cmap, keep if keep >= 0 else cmap.stat().st_size + keep)
    with pytest.raises(ConfigError, match=rf"class map {re.escape(str(cmap))}: .*{MAP_FIX}"):
        open_map(cmap)


def test_a_map_cut_before_its_next_level(class_map: Path, tmp_path: Path) -> None:
    """Whole level 0, the next level's page gone: tifffile only logs it; dsf reports it."""
    cmap = _copy_map(class_map, tmp_path)
    with tifffile.TiffFile(cmap) as tf:
        at = tf.pages[1].offset
    os.truncate(cmap, at)
    with pytest.raises(
        ConfigError, match=rf"class map {re.escape(str(cmap))}: page 0 is followed by .*{MAP_FIX}"
    ):
        open_map(cmap)


def test_a_map_tile_that_does_not_decode(class_map: Path, tmp_path: Path) -> None:
    cmap = _copy_map(class_map, tmp_path)
    with tifffile.TiffFile(cmap) as tf:
        at = tf.pages[0].dataoffsets[0]
    with open(cmap, "r+b") as fh:
        fh.seek(at)
        fh.write(b"\x00" * 16)
    opened = open_map(cmap)  # the file is whole: only reading finds the damage
    what = rf"class map {re.escape(str(cmap))}: level 0 could not be read .*{MAP_FIX}"
    with pytest.raises(ConfigError, match=what):
        opened.read_level(0)
    with pytest.raises(ConfigError, match=what):
        list(opened.bands(64))
    with pytest.raises(ConfigError, match=what):
        opened.sample(0, np.arange(0, 60), np.arange(0, 60))


def test_polygons_exits_2_on_a_truncated_map(
    class_map: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dsf.polygons import main

    cmap = _copy_map(class_map, tmp_path)
    os.truncate(cmap, 3000)
    out = tmp_path / "m.geojson"
    rc = main(["--map", str(cmap), "--slide", str(tmp_path / "s.tif"), "--slide-id", "s",
               "--out", str(out)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert f"class map {cmap}" in err and "rerun infer" in err and "Traceback" not in err
