"""Fine-tuning inputs: centre crop geometry, label fractions, held-out selection slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from dsf.errors import ConfigError
from dsf.finetune_data import LabelledTiles, label_subset, selection_split


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory: pytest.TempPathFactory, make_store) -> Path:  # noqa: ANN001
    return make_store(tmp_path_factory.mktemp("ft"), "s", 4, block=16, stride=32, labelled=True)


def test_items_are_context_and_the_centre_block(labelled_store: Path) -> None:
    data = LabelledTiles([labelled_store])
    g = zarr.open_group(str(labelled_store), mode="r")
    assert len(data) == g.attrs["n_tiles"]
    ctx, tgt, lab = data[3]
    assert ctx.shape == (16, 16, 3) and tgt.shape == (16, 16, 3) and lab.shape == (16, 16)
    tile = g["tiles"][3]
    np.testing.assert_array_equal(tgt.numpy(), tile[24:40, 24:40])  # (64 - 16) / 2 = 24
    np.testing.assert_array_equal(lab.numpy(), g["labels"][3][24:40, 24:40])
    np.testing.assert_array_equal(ctx.numpy(), g["context"][3])
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
    with pytest.raises(ConfigError):
        label_subset(10, 0.0, 0)


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
    with pytest.raises(ConfigError, match="at least 2"):
        selection_split(folds.iloc[:3], 0, 0.2, 0)
