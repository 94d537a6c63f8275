"""Fine-tuning inputs: centre crop geometry, label fractions, held-out selection slides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

from dsf.errors import ConfigError
from dsf.finetune_data import LabelledTiles, label_subset, selection_split
from dsf.tile_labels import LabelledStore


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory: pytest.TempPathFactory, make_store) -> LabelledStore:  # noqa: ANN001
    return make_store(tmp_path_factory.mktemp("ft"), "s", 4, block=16, stride=32, labelled=True)


def _groups(store: LabelledStore) -> tuple[zarr.Group, zarr.Group, np.ndarray]:
    g = zarr.open_group(str(store.tiles), mode="r")
    lab = zarr.open_group(str(store.labels), mode="r")
    return g, lab, lab["index"][:]


def test_items_are_context_and_the_centre_block(labelled_store: LabelledStore) -> None:
    data = LabelledTiles([labelled_store])
    g, lab, index = _groups(labelled_store)
    assert len(data) == lab.attrs["n_tiles"] == len(index)
    ctx, tgt, labels, clab = data[3]
    assert ctx.shape == (16, 16, 3) and tgt.shape == (16, 16, 3) and labels.shape == (16, 16)
    tile = g["tiles"][index[3]]
    np.testing.assert_array_equal(tgt.numpy(), tile[24:40, 24:40])  # (64 - 16) / 2 = 24
    np.testing.assert_array_equal(labels.numpy(), lab["labels"][3][24:40, 24:40])
    np.testing.assert_array_equal(ctx.numpy(), g["context"][index[3]])
    # context labels: the tile's labels at the centre pixel of each 4 x 4 context cell
    assert clab.shape == (16, 16)
    np.testing.assert_array_equal(clab.numpy(), lab["labels"][3][2::4, 2::4])
    assert clab.numpy()[9, 7] == lab["labels"][3][9 * 4 + 2, 7 * 4 + 2]
    # the target's field of view is the centre 1/scale of the context's
    centre = ctx.numpy()[6:10, 6:10].astype(float)
    down = tgt.numpy().reshape(4, 4, 4, 4, 3).mean((1, 3))
    assert np.abs(centre - down).mean() < 12


def test_label_fractions_are_seeded_subsets() -> None:
    a = label_subset(1000, 0.1, 7)
    assert len(a) == 100 and np.array_equal(a, label_subset(1000, 0.1, 7))
    assert not np.array_equal(a, label_subset(1000, 0.1, 8))
    assert len(label_subset(50, 0.01, 0)) == 1
    assert set(label_subset(1000, 0.01, 7)) <= set(range(1000))
    nested = [set(label_subset(1000, f, 7)) for f in (0.01, 0.1, 0.5, 1.0)]
    assert all(small < big for small, big in zip(nested, nested[1:], strict=False))
    assert nested[-1] == set(range(1000))
    with pytest.raises(ConfigError):
        label_subset(10, 0.0, 0)


def test_a_label_fraction_is_of_the_tiles_pooled_over_the_slides(
    tmp_path: Path, make_store: Any, labelled_store: LabelledStore
) -> None:
    """Paper IV-D: a fraction of the labelled tiles, drawn from all fit slides together (not
    a fraction of the slides with all their tiles), seeded and nested in the larger ones."""
    other = make_store(tmp_path, "t", 5, block=16, stride=32, labelled=True)
    full = LabelledTiles([labelled_store, other])
    n = len(full)
    assert {k for k, _ in full.index} == {0, 1}
    half = LabelledTiles([labelled_store, other], fraction=0.5, seed=3)
    assert half.index == [full.index[i] for i in label_subset(n, 0.5, 3)]
    assert len(half) == round(n * 0.5) and {k for k, _ in half.index} == {0, 1}
    tenth = LabelledTiles([labelled_store, other], fraction=0.1, seed=3)
    assert set(tenth.index) < set(half.index)


def test_selection_uses_held_out_training_groups_never_the_validation_fold() -> None:
    folds = pd.DataFrame(
        {
            "slide": [f"s{i}" for i in range(10)],
            "group": ["a", "a", "b", "c", "d", "e", "f", "g", "h", "i"],
            "fold": [0, 0, 1, 1, 0, 1, 0, 1, 0, 1],
        }
    )
    fit, sel = selection_split(folds, 0, 0.2, 3)
    val = set(folds.loc[folds["fold"] == 0, "slide"])
    assert sel and fit and not (set(fit) | set(sel)) & val and not set(fit) & set(sel)
    assert set(fit) | set(sel) == set(folds["slide"]) - val
    assert selection_split(folds, 0, 0.2, 3) == (fit, sel)
    # the held-out groups are a seeded draw, not the first groups by name
    drawn = {tuple(selection_split(folds, 0, 0.2, seed)[1]) for seed in range(10)}
    assert len(drawn) > 2
    with pytest.raises(ConfigError, match="at least 2"):
        selection_split(folds.iloc[:3], 0, 0.2, 0)
    # held_out 0: every training slide fits, none selects (one training group is enough)
    assert selection_split(folds, 0, 0.0, 3) == (sorted(set(folds["slide"]) - val), [])
    assert selection_split(folds.iloc[:3], 0, 0.0, 0) == (["s2"], [])


def test_random_target_block_is_a_seeded_window_per_epoch(labelled_store: LabelledStore) -> None:
    import pickle

    data = LabelledTiles([labelled_store], seed=5, target_block="random")
    g, lab, index = _groups(labelled_store)
    n = len(data)
    first = [data.offset(i) for i in range(n)]
    assert all(0 <= y <= 48 and 0 <= x <= 48 for y, x in first)  # 64 - 16
    assert len(set(first)) > 1  # not one fixed place
    ctx, tgt, labels, clab = data[2]
    y, x = first[2]
    np.testing.assert_array_equal(tgt.numpy(), g["tiles"][index[2]][y : y + 16, x : x + 16])
    np.testing.assert_array_equal(labels.numpy(), lab["labels"][2][y : y + 16, x : x + 16])
    # the context stays the whole tile (only the U-Net baseline uses this variant)
    np.testing.assert_array_equal(ctx.numpy(), g["context"][index[2]])
    np.testing.assert_array_equal(clab.numpy(), lab["labels"][2][2::4, 2::4])
    # a worker's copy (pickled) and a fresh dataset draw the same offsets: resume stays exact
    copy = pickle.loads(pickle.dumps(data))
    again = LabelledTiles([labelled_store], seed=5, target_block="random")
    assert [copy.offset(i) for i in range(n)] == [again.offset(i) for i in range(n)] == first
    data.set_epoch(1)
    assert [data.offset(i) for i in range(n)] != first
    assert pickle.loads(pickle.dumps(data)).offset(0) == data.offset(0)
    other = LabelledTiles([labelled_store], seed=6, target_block="random")
    assert [other.offset(i) for i in range(n)] != first
    # the centre variant never moves
    centre = LabelledTiles([labelled_store], seed=5)
    centre.set_epoch(3)
    assert {centre.offset(i) for i in range(n)} == {(24, 24)}
    with pytest.raises(ConfigError, match="finetune.target_block"):
        LabelledTiles([labelled_store], target_block="corner")


class _CornerLabels:
    """An annotation labelling each tile's top-left 8 x 8 corner, and (`centres`) the centre
    block of the tiles in even grid columns."""

    def __init__(self, slide_id: str, stride: int, centres: bool = True) -> None:
        self.slide_id, self.stride, self.centres = slide_id, stride, centres

    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        out = np.zeros((height, width), np.uint8)
        out[:8, :8] = 1
        if self.centres and round(x / (mpp / 0.5) / self.stride) % 2 == 0:  # 0.5 um/px
            out[24:40, 24:40] = 2
        return out


def test_tiles_whose_target_block_holds_no_label_are_left_out(
    labelled_store: LabelledStore,
    tmp_path,
    caplog,  # noqa: ANN001
) -> None:
    """The labels store records each kept tile's labelled share of the centre block, and
    fine-tuning leaves out tiles without a label there (they train nothing, and took places in
    a label fraction) unless asked for every tile (a context loss reads the whole tile)."""
    from dsf.config import defaults
    from dsf.tile_labels import build

    from conftest import SYNTH_CLASSES

    out = tmp_path / "s.labels.zarr"
    classes = defaults("labels") | {"classes": SYNTH_CLASSES}
    n = build(labelled_store.tiles, _CornerLabels("s", 32), out, classes, 0.01, progress=False)
    lab = zarr.open_group(str(out), mode="r")
    frac, index = lab["target_frac"][:], lab["index"][:]
    labels = lab["labels"][:]
    np.testing.assert_allclose(frac, (labels[:, 24:40, 24:40] > 0).mean((1, 2)))
    assert n == len(frac) and 0 < int((frac > 0).sum()) < n  # both kinds of tile
    pair = LabelledStore("s", labelled_store.tiles, out)
    every = LabelledTiles([pair])
    useful = LabelledTiles([pair], labelled_target=True)
    assert len(every) == n and len(useful) == int((frac > 0).sum())
    assert all((useful[i][2].numpy() > 0).any() for i in range(len(useful)))
    assert useful.tile_of[0][[loc for _, loc in useful.index]].tolist() == [
        t for t, f in zip(index, frac, strict=True) if f > 0
    ]
    # a random target block (the U-Net baseline) may land anywhere: every tile is kept
    assert len(LabelledTiles([pair], target_block="random", labelled_target=True)) == n
    # no labelled centre at all: refused, saying why
    none = tmp_path / "none.labels.zarr"
    build(labelled_store.tiles, _CornerLabels("s", 32, False), none, classes, 0.01, progress=False)
    with pytest.raises(ConfigError, match=r"none of the \d+ labelled tiles .* target \(centre\)"):
        LabelledTiles([LabelledStore("s", labelled_store.tiles, none)], labelled_target=True)
    # a labels store of an older dsf (no target_frac) keeps every tile, with a warning
    import shutil

    shutil.rmtree(none / "target_frac")
    with caplog.at_level("WARNING", logger="dsf"):
        old = LabelledTiles([LabelledStore("s", labelled_store.tiles, none)], labelled_target=True)
    assert len(old) == n and "older dsf (no target_frac)" in caplog.text


class _RightHalfLabels:
    """An annotation of the right half of a 0.5 um/px slide only (level-0 x >= `x0`): classes
    1..3 in diagonal stripes there, nothing to the left, so the tiles of the left half are not
    labelled and the labels store's `index` skips them."""

    def __init__(self, slide_id: str, x0: float) -> None:
        self.slide_id, self.x0 = slide_id, x0

    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        f = mpp / 0.5  # level-0 px per px read
        cols = x + np.arange(width) * f
        rows = y + np.arange(height) * f
        out = ((rows[:, None] // 24 + cols[None, :] // 40) % 3 + 1).astype(np.uint8)
        out[:, cols < self.x0] = 0
        return out


def test_items_read_the_tile_their_labels_store_names(
    labelled_store: LabelledStore,
    tmp_path,  # noqa: ANN001
) -> None:
    """Item j is labelled tile j of the labels store, whose pixels are patch-store tile
    `index[j]`, not tile j. The fixture's stores label every tissue tile (`index` is 0..n-1,
    where the two are one tile), so an annotation of half the slide is needed to tell a
    context or target read from the wrong tile, paired with another tile's labels."""
    from dsf.config import defaults
    from dsf.tile_labels import build

    from conftest import SYNTH_CLASSES

    out = tmp_path / "half.labels.zarr"
    classes = defaults("labels") | {"classes": SYNTH_CLASSES}
    source = _RightHalfLabels("s", 512.0)  # the slide is 1024 px wide
    n = build(labelled_store.tiles, source, out, classes, 0.01, progress=False)
    pair = LabelledStore("s", labelled_store.tiles, out)
    g, lab, index = _groups(pair)
    assert 0 < n < int(g.attrs["n_tiles"]) and len(index) == n
    assert not np.array_equal(index, np.arange(n))
    data = LabelledTiles([pair])
    assert len(data) == n
    tiles, contexts, coords = g["tiles"][:], g["context"][:], g["coords"][:]
    moved = [j for j in range(n) if index[j] != j]
    assert moved
    for j in moved[:2] + moved[-2:]:
        ctx, tgt, labels, clab = data[j]
        # the wrong tile would be told apart: its pixels differ
        assert not np.array_equal(contexts[j], contexts[index[j]])
        np.testing.assert_array_equal(ctx.numpy(), contexts[index[j]])
        np.testing.assert_array_equal(tgt.numpy(), tiles[index[j], 24:40, 24:40])
        # the labels are those of the same tile: the annotation read at its origin (1 um/px)
        want = source.read(*coords[index[j]], 64, 64, 1.0)
        np.testing.assert_array_equal(labels.numpy(), want[24:40, 24:40])
        np.testing.assert_array_equal(clab.numpy(), want[2::4, 2::4])


def test_stores_cut_with_other_geometries_are_refused(
    labelled_store: LabelledStore,
    tmp_path,  # noqa: ANN001
) -> None:
    """A store of another scale, block or target mpp (a run by hand) had its centre block cut
    as the other stores' and its magnification taken for theirs; within the stores'
    patches.mpp_tolerance it is one geometry. Pretraining's tiles (`TileDataset`) alike, where
    block 16 x scale 4 and block 32 x scale 2 make tiles of one shape."""
    import shutil

    from dsf.tiles import TileDataset

    def copy(name: str, **attrs: Any) -> LabelledStore:
        tiles = tmp_path / f"{name}.zarr"
        shutil.copytree(labelled_store.tiles, tiles)
        zarr.open_group(str(tiles), mode="r+").attrs.update({"slide_id": name, **attrs})
        return LabelledStore(name, tiles, labelled_store.labels)

    near = copy("near", requested_target_mpp=1.01)  # within the default tolerance 0.05
    assert len(LabelledTiles([labelled_store, near])) == 2 * len(LabelledTiles([near]))
    assert len(TileDataset([labelled_store.tiles, near.tiles])) > 0
    for other in (copy("scale2", scale=2, block=32), copy("coarse", requested_target_mpp=2.0)):
        with pytest.raises(ConfigError, match=rf"{other.tiles} were cut with other geometries"):
            LabelledTiles([labelled_store, other])
        with pytest.raises(ConfigError, match="other geometries"):
            TileDataset([labelled_store.tiles, other.tiles])
