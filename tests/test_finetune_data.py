"""Fine-tuning inputs: centre crop geometry, label fractions, held-out selection slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from dsf.config import defaults
from dsf.errors import ConfigError
from dsf.finetune_data import LabelledTiles, label_subset, selection_split


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsf.annotations import open_labels
    from dsf.patches import extract
    from dsf.slide import open_slide
    from dsf.synth import write_synthetic_slide
    from dsf.tissue import detect_tissue

    d = tmp_path_factory.mktemp("ft")
    write_synthetic_slide(
        d / "s.tiff",
        seed=4,
        width=1024,
        height=1024,
        mpp=0.5,
        tile=256,
        quality=90,
        region_um=150,
        labels_tiff=d / "s.labels.tiff",
    )
    slide = open_slide(d / "s.tiff", slide_id="s")
    mask, _ = detect_tissue(slide.thumbnail(8.0), 8.0, defaults("tissue"))
    classes = defaults("labels") | {"classes": ["ignore", "TUM", "STR", "LYM"]}
    labels = open_labels(d / "s.labels.tiff", "s", slide.dimensions, slide.mpp, classes)
    st = defaults("patches") | {"target_mpp": 1.0, "block": 16, "stride": 32, "min_tissue": 0.3}
    extract(slide, mask, 8.0, d / "s.zarr", st, classes, labels, progress=False)
    return d / "s.zarr"


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
