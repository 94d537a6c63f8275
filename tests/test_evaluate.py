"""Evaluation: the tile protocol on stores, the whole-slide protocol on maps, the tables."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from dsf.class_map import open_map
from dsf.colours import class_colours
from dsf.errors import ConfigError
from dsf.evaluate import (
    confusion_columns,
    confusion_of,
    evaluate_slide,
    evaluate_tiles,
    main,
    map_confusion,
    panel,
    score_row,
)
from dsf.predict import Predictor
from dsf.stores import open_store
from dsf.tables import build_tables, mean_std, tile_fold_scores
from dsf.tile_labels import LabelledStore

CLASSES = ["ignore", "TUM", "STR", "LYM"]


# -- colours ----------------------------------------------------------------------------------


def test_class_colours_are_distinct_with_black_background() -> None:
    c = class_colours(20)
    assert c.shape == (20, 3) and c.dtype == np.uint8
    assert tuple(c[0]) == (0, 0, 0)
    assert len({tuple(v) for v in c}) == 20
    assert np.array_equal(class_colours(4), c[:4])


# -- tile protocol ----------------------------------------------------------------------------


class BrightnessStub(nn.Module):
    """HookNet-shaped stub: class TUM where the target pixel's mean RGB is above 0.5, else LYM;
    channel 0 (ignore) always scores highest, so only an argmax over 1..K gives those."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(
        self, ctx: torch.Tensor, tgt: torch.Tensor, context_logits: bool = True
    ) -> tuple[torch.Tensor, None]:
        self.seen.append(tuple(ctx.shape))
        b, _, h, w = tgt.shape
        logits = torch.zeros(b, 4, h, w)
        logits[:, 0] = 5.0  # (not so high that the softmax underflows the others)
        logits[:, 1] = tgt.mean(1)
        logits[:, 2] = -5.0
        logits[:, 3] = 0.5
        return logits, None


def _predictor(model: nn.Module, **meta: object) -> Predictor:
    return Predictor(
        model=model,
        init="random",
        classes=CLASSES,
        scale=4,
        block=64,
        target_mpp=1.0,
        mean=torch.zeros(1, 3, 1, 1),
        std=torch.ones(1, 3, 1, 1),
        device=torch.device("cpu"),
        amp=None,
        meta={"fold": 0, "fraction": 0.5, "fit_slides": ["B"], "select_slides": ["C"]} | meta,
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, make_store) -> dict[str, Any]:  # noqa: ANN001
    d = tmp_path_factory.mktemp("evstores")
    out = {
        name: make_store(d, name, seed, block=64, stride=128, labelled=True)
        for name, seed in (("A", 1), ("B", 2), ("D", 4))
    }
    (d / "folds.tsv").write_text("slide\tgroup\tfold\nA\tA\t0\nD\tD\t0\nB\tB\t1\nC\tC\t1\n")
    out["folds"] = d / "folds.tsv"
    return out


def _expected_brightness_cm(
    store: LabelledStore, index: np.ndarray | None = None
) -> tuple[int, np.ndarray]:
    """The stub's confusion by hand: centre block (rows/cols 96..160 of the 256 px tile) of
    the tiles the labels store keeps (or, given `index`, of those patch-store tiles)."""
    g, lab = open_store(store.tiles), open_store(store.labels, kind="labels")
    index = np.asarray(lab["index"][:]) if index is None else index
    tiles = np.asarray(g["tiles"][:, 96:160, 96:160])[index].astype(np.float32) / 255.0
    labels = np.asarray(lab["labels"][:, 96:160, 96:160])
    pred = np.where(tiles.mean(-1) > 0.5, 1, 3)
    cm = np.zeros((3, 4), np.int64)
    for t in (1, 2, 3):
        for p in (1, 3):
            cm[t - 1, p - 1] = int(((labels == t) & (pred == p)).sum())
    return len(tiles), cm


def test_tile_protocol_matches_hand_computed_confusion(stores) -> None:  # noqa: ANN001
    stub = BrightnessStub()
    df = evaluate_tiles(_predictor(stub), [stores["A"], stores["D"]], 5, Path("m.pt"))
    assert list(df["slide"]) == ["A", "D"]
    assert set(df["fold"]) == {0} and set(df["init"]) == {"random"}
    assert set(df["fraction"]) == {0.5}
    assert all(s == (s[0], 3, 64, 64) for s in stub.seen)  # the context, one block
    for _, row in df.iterrows():
        n, cm = _expected_brightness_cm(stores[row["slide"]])
        assert row["n_tiles"] == n > 0
        np.testing.assert_array_equal(confusion_of(row, CLASSES), cm)
        assert cm[:, 1].sum() == 0 < cm[:, [0, 2]].sum()  # never STR, never background
        assert row["n_pixels"] == cm.sum() > 0
        assert row["micro_f1"] == pytest.approx(np.trace(cm[:, :3]) / cm.sum())
        assert row["pixel_accuracy"] == row["micro_f1"]
        tp, fp, fn = cm[0, 0], cm[1:, 0].sum(), cm[0, 1:].sum()
        assert row["f1_TUM"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        if cm[1].sum():  # STR in the truth but never predicted: F1 0
            assert row["f1_STR"] == 0.0
        else:  # absent from truth and prediction: NaN, never a silent 0
            assert np.isnan(row["f1_STR"])


class _RightHalf:
    """An annotation cut to the right half of the slide: `labels` where level-0 x >= `x0`,
    unlabelled to the left (the tiles there are left out of the labels store)."""

    def __init__(self, labels: Any, x0: float, mpp0: float) -> None:
        self.labels, self.x0, self.mpp0 = labels, x0, mpp0
        self.slide_id = labels.slide_id

    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        out = self.labels.read(x, y, width, height, mpp)
        out[:, x + np.arange(width) * (mpp / self.mpp0) < self.x0] = 0
        return out


def test_tile_protocol_scores_the_tiles_the_labels_store_names(stores, tmp_path) -> None:  # noqa: ANN001
    """Labelled tile j is patch-store tile `index[j]`: with an annotation of half the slide
    the labels store keeps a strict subset of the tissue tiles, so predicting tile j instead
    would score other pixels against these labels (the fixture's stores label every tile,
    where `index` is 0..n-1 and the two are one tile)."""
    from dsf.annotations import open_labels
    from dsf.config import defaults
    from dsf.tile_labels import build

    a = stores["A"]
    classes = defaults("labels") | {"classes": CLASSES}
    full = open_labels(a.tiles.with_name("A.labels.tiff"), "A", (1024, 1024), 0.5, classes)
    out = tmp_path / "A.labels.zarr"
    n = build(a.tiles, _RightHalf(full, 512.0, 0.5), out, classes, 0.01, progress=False)
    pair = LabelledStore("A", a.tiles, out)
    index = np.asarray(open_store(out, kind="labels")["index"][:])
    n_tissue = int(open_store(a.tiles).attrs["n_tiles"])
    assert 0 < n < n_tissue and not np.array_equal(index, np.arange(n))
    want_n, want = _expected_brightness_cm(pair)
    # the test can tell: the first n tissue tiles give other counts against these labels
    assert not np.array_equal(_expected_brightness_cm(pair, np.arange(n))[1], want)
    for batch in (2, n):  # several batches, and one
        row = evaluate_tiles(_predictor(BrightnessStub()), [pair], batch, Path("m.pt")).iloc[0]
        assert row["n_tiles"] == want_n == n
        np.testing.assert_array_equal(confusion_of(row, CLASSES), want)
        assert row["n_pixels"] == want.sum() > 0


def test_tile_protocol_refuses_nan_probabilities(stores) -> None:  # noqa: ANN001
    """NaN probabilities had been argmaxed into a class (torch takes NaN for the largest)."""
    pred = _predictor(BrightnessStub())
    pred.probabilities = lambda ctx, tgt: torch.full((len(tgt), 3, 4, 4), float("nan"))
    with pytest.raises(ConfigError, match=r"NaN or infinite probabilities on the tiles of"):
        evaluate_tiles(pred, [stores["A"]], 8, Path("m.pt"))


def test_tile_protocol_refuses_training_slides(stores) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=r"\['B'\] are training data"):
        evaluate_tiles(_predictor(BrightnessStub()), [stores["A"], stores["B"]], 8, Path("m.pt"))
    # with folds.tsv: a slide of another fold is refused too, even if the model never saw it
    folds = pd.read_csv(stores["folds"], sep="\t")
    pred = _predictor(BrightnessStub(), fit_slides=["X"], select_slides=["Y"], fold=1)
    with pytest.raises(ConfigError, match=r"not in validation fold 1"):
        evaluate_tiles(pred, [stores["A"]], 8, Path("m.pt"), folds)


def _tiny_model(path: Path, fold: int = 0) -> Path:
    from dsf import checkpoints
    from dsf.models.hooknet import HookNet

    torch.manual_seed(0)
    net = HookNet(len(CLASSES), scale=4, input_size=64)
    meta = {
        "state_dict": net.state_dict(),
        "init": "dsf",
        "fraction": 1.0,
        "classes": CLASSES,
        "scale": 4,
        "block": 64,
        "target_mpp": 1.0,
        "mean": [0.6998, 0.4785, 0.6609],
        "std": [0.2203, 0.2407, 0.1983],
        "fold": fold,
        "fit_slides": ["B"],
        "select_slides": ["C"],
    }
    checkpoints.save(meta, path)
    return path


def _store_args(*pairs: LabelledStore) -> list[str]:
    """`--stores ... --label-stores ...` of `dsf evaluate tiles` for these slides."""
    return [
        "--stores", *(str(p.tiles) for p in pairs),
        "--label-stores", *(str(p.labels) for p in pairs),
    ]  # fmt: skip


def test_tiles_cli_writes_rows_and_refuses_train_stores(stores, tmp_path) -> None:  # noqa: ANN001
    model = _tiny_model(tmp_path / "model.pt")
    common = ["--model", str(model), "--folds", str(stores["folds"]), "--device", "cpu"]
    out = tmp_path / "fold0.tsv"
    assert main(["tiles", *common, *_store_args(stores["A"]), "--out", str(out)]) == 0
    df = pd.read_csv(out, sep="\t")
    assert list(df["slide"]) == ["A"] and df.loc[0, "init"] == "dsf"
    assert df.loc[0, "n_pixels"] == sum(df.loc[0, c] for c in confusion_columns(CLASSES))
    assert 0 <= df.loc[0, "micro_f1"] <= 1
    bad = tmp_path / "bad.tsv"
    assert main(["tiles", *common, *_store_args(stores["B"]), "--out", str(bad)]) == 2
    assert not bad.exists()
    # each patch store with its own labels store, of the same build
    a, d = stores["A"], stores["D"]
    mixed = ["--stores", str(a.tiles), "--label-stores", str(d.labels)]
    assert main(["tiles", *common, *mixed, "--out", str(bad)]) == 2
    alone = ["--stores", str(a.tiles), "--label-stores"]
    assert main(["tiles", *common, *alone, "--out", str(bad)]) == 2
    assert not bad.exists()
    # a fold without labelled validation stores: a header-only table, not a crash
    empty = tmp_path / "empty.tsv"
    assert main(["tiles", *common, "--stores", "--out", str(empty)]) == 0
    e = pd.read_csv(empty, sep="\t")
    assert len(e) == 0 and "f1_LYM" in e.columns and "cm_TUM_bg" in e.columns


# -- whole-slide protocol ---------------------------------------------------------------------

SLIDE_MPP, MAP_MPP = 0.5, 2.0  # a 512 px slide, a 128 px map; the mask is the map's grid


def _truth() -> np.ndarray:
    """Top half TUM, bottom-left quarter STR, bottom-right unlabelled (128 x 128)."""
    t = np.zeros((128, 128), np.uint8)
    t[:64] = 1
    t[64:, :64] = 2
    return t


def _write_map(
    path: Path, level0: np.ndarray, level1: np.ndarray | None = None, **meta: object
) -> Path:
    level1 = level0[::2, ::2] if level1 is None else level1
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, arr in enumerate((level0, level1)):
            tw.write(
                arr,
                tile=(32, 32),
                resolution=(1e4 / (MAP_MPP * 2**i),) * 2,
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                compression="zlib",
            )
    desc = {
        "slide": "S",
        "init": "dsf",
        "fraction": 1.0,
        "mpp": MAP_MPP,
        "width": level0.shape[1],
        "height": level0.shape[0],
        "classes": CLASSES,
        "models": ["model.pt"],
        "folds": [0],
        "routing": "out_of_fold",
    } | meta
    path.with_suffix(".json").write_text(json.dumps(desc))
    return path


@pytest.fixture()
def slide_files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(tmp_path / "S.png")
    Image.fromarray(_truth()).save(tmp_path / "S.labels.png")
    (tmp_path / "folds.tsv").write_text("slide\tgroup\tfold\nS\tS\t0\nT\tT\t1\n")
    return {
        "slide": tmp_path / "S.png",
        "labels": tmp_path / "S.labels.png",
        "folds": tmp_path / "folds.tsv",
    }


def _open(files: dict[str, Path]):  # noqa: ANN202
    from dsf.annotations import open_labels
    from dsf.config import defaults
    from dsf.slide import open_slide

    slide = open_slide(files["slide"], SLIDE_MPP, "S")
    st = defaults("labels") | {"classes": CLASSES}
    return slide, open_labels(files["labels"], "S", slide.dimensions, slide.mpp, st)


def test_oracle_map_scores_one_and_shifted_map_does_not(slide_files, tmp_path) -> None:  # noqa: ANN001
    slide, labels = _open(slide_files)
    folds = pd.read_csv(slide_files["folds"], sep="\t")
    oracle = open_map(_write_map(tmp_path / "oracle.tiff", _truth()), tmp_path / "oracle.json")
    row = evaluate_slide(oracle, slide, labels, folds, CLASSES, band_rows=7).iloc[0]
    assert row["n_pixels"] == 64 * 128 + 64 * 64
    assert row["f1_TUM"] == row["f1_STR"] == row["pixel_accuracy"] == row["macro_f1"] == 1.0
    assert np.isnan(row["f1_LYM"])  # absent from truth and prediction: not a 0
    shifted = open_map(
        _write_map(tmp_path / "shift.tiff", np.roll(_truth(), 8, axis=0)), tmp_path / "shift.json"
    )
    row = evaluate_slide(shifted, slide, labels, folds, CLASSES, band_rows=1024).iloc[0]
    assert row["f1_TUM"] < 1 and row["pixel_accuracy"] < 1


def test_imperfect_map_hand_checked(slide_files, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    slide, labels = _open(slide_files)
    m = np.ones((128, 128), np.uint8)  # TUM everywhere ...
    m[:16] = 2  # ... but STR in the first 16 rows
    m[:, 96:] = 0  # ... and nothing predicted in the last 32 columns
    cmap = open_map(_write_map(tmp_path / "m.tiff", m), tmp_path / "m.json")
    # TUM truth (rows 0-63): 16 x 96 -> STR, 64 x 32 -> background, 48 x 96 -> TUM
    # STR truth (rows 64-127, cols 0-63): all 64 x 64 -> TUM; the unlabelled quarter is ignored
    want = np.array([[4608, 1536, 0, 2048], [4096, 0, 0, 0], [0, 0, 0, 0]])
    for band in (1, 5, 64, 1000):  # any band height gives the same counts
        np.testing.assert_array_equal(map_confusion(cmap, labels, SLIDE_MPP, band), want)
    monkeypatch.setattr("dsf.evaluate.SCORE_PIXELS", 300)  # bands scored 2 rows at a time
    np.testing.assert_array_equal(map_confusion(cmap, labels, SLIDE_MPP, 1000), want)
    folds = pd.read_csv(slide_files["folds"], sep="\t")
    row = evaluate_slide(cmap, slide, labels, folds, CLASSES, 16).iloc[0]
    assert row["f1_TUM"] == pytest.approx(6 / 11)  # 2*4608 / (2*4608 + 4096 + 3584)
    assert row["f1_STR"] == 0.0
    assert row["pixel_accuracy"] == pytest.approx(4608 / 12288)
    assert row["macro_f1"] == pytest.approx(3 / 11)
    assert row["fold"] == 0 and row["routing"] == "out_of_fold"


def test_map_contract_is_checked(slide_files, tmp_path) -> None:  # noqa: ANN001
    slide, labels = _open(slide_files)
    folds = pd.read_csv(slide_files["folds"], sep="\t")
    seen = open_map(_write_map(tmp_path / "a.tiff", _truth(), folds=[1]), tmp_path / "a.json")
    with pytest.raises(ConfigError, match="validation fold 0"):
        evaluate_slide(seen, slide, labels, folds, CLASSES, 64)
    ens = open_map(
        _write_map(tmp_path / "e.tiff", _truth(), folds=[0, 1], routing="ensemble"),
        tmp_path / "e.json",
    )
    with pytest.raises(ConfigError, match="out-of-fold maps only"):
        evaluate_slide(ens, slide, labels, folds, CLASSES, 64)
    # the slide's own fold by folds.tsv, but its model trained on the slide (folds.tsv made
    # again with another seed after the models, or a map made by hand): refused by the model
    torch.save({"fold": 0, "fit_slides": ["S"], "select_slides": []}, tmp_path / "f0.pt")
    stale = _write_map(tmp_path / "st.tiff", _truth(), folds=[0], models=[str(tmp_path / "f0.pt")])
    with pytest.raises(ConfigError, match=r"slide 'S' is training data of .*f0\.pt"):
        evaluate_slide(open_map(stale, None), slide, labels, folds, CLASSES, 64)
    _write_map(tmp_path / "b.tiff", _truth(), width=129)
    with pytest.raises(ConfigError, match="different runs"):
        open_map(tmp_path / "b.tiff", tmp_path / "b.json")
    _write_map(tmp_path / "c.tiff", _truth(), mpp=1.0)
    with pytest.raises(ConfigError, match="X resolution tag gives"):
        open_map(tmp_path / "c.tiff", tmp_path / "c.json")
    # pixels twice as tall as the JSON says (only the X tag had been compared)
    _write_map(tmp_path / "d.tiff", _truth())
    with tifffile.TiffFile(tmp_path / "d.tiff", mode="r+b") as tf:
        tf.pages.first.tags["YResolution"].overwrite((round(1e4 / (MAP_MPP * 2)), 1))
    with pytest.raises(ConfigError, match=r"its Y resolution tag gives 4 um/px, its JSON 2"):
        open_map(tmp_path / "d.tiff", tmp_path / "d.json")


def test_panel_reads_the_lower_level(slide_files, tmp_path) -> None:  # noqa: ANN001
    slide, labels = _open(slide_files)
    marker = np.full((64, 64), 3, np.uint8)  # level 1 deliberately unlike level 0
    cmap = open_map(_write_map(tmp_path / "p.tiff", _truth(), marker), tmp_path / "p.json")
    pan = panel(cmap, slide, labels, size=64)  # 64 px for 256 um: 4 um/px = level 1
    assert pan["thumbnail"].shape == (64, 64, 3)
    assert (pan["prediction"] == 3).all()
    np.testing.assert_array_equal(pan["truth"], _truth()[::2, ::2])


def test_slide_cli_writes_row_and_panel(slide_files, tmp_path) -> None:  # noqa: ANN001
    mp = _write_map(tmp_path / "S.tiff", _truth())
    out, pan = tmp_path / "S.tsv", tmp_path / "S.panel.npz"
    args = ["slide", "--map", str(mp), "--slide", str(slide_files["slide"]), "--slide-id", "S"]
    args += ["--sheet-mpp", "0.5", "--labels", str(slide_files["labels"])]
    args += ["--folds", str(slide_files["folds"]), "--out", str(out), "--panel", str(pan)]
    args += ["--classes", *CLASSES, "--band-rows", "10", "--panel-size", "128"]
    assert main(args) == 0
    row = pd.read_csv(out, sep="\t").iloc[0]
    assert row["slide"] == "S" and row["pixel_accuracy"] == 1.0 and row["cm_TUM_TUM"] == 8192
    with np.load(pan) as z:
        assert z["prediction"].shape == z["truth"].shape == (128, 128)
        assert json.loads(str(z["meta"]))["init"] == "dsf"


# -- tables -----------------------------------------------------------------------------------

TWO = ["ignore", "A", "B"]


def _row(slide: str, fold: int, init: str, cm: list[list[int]], frac: float = 1.0) -> dict:
    return {"slide": slide, "fold": fold, "init": init, "fraction": frac, "n_tiles": 3} | score_row(
        np.asarray(cm, np.int64), TWO
    )


def _tile_tsvs(folder: Path) -> list[Path]:
    rows = [
        _row("s1", 0, "m1", [[8, 2, 0], [0, 10, 0]]),  # micro 0.9
        _row("s2", 0, "m1", [[10, 10, 0], [0, 20, 0]]),  # micro 0.75
        _row("s3", 1, "m1", [[10, 0, 0], [0, 10, 0]]),  # micro 1.0
        _row("s4", 2, "m1", [[6, 4, 0], [4, 6, 0]]),  # micro 0.6
        _row("s1", 0, "m2", [[5, 5, 0], [5, 5, 0]]),  # m2 has fold 0 only
    ]
    paths = []
    for i, r in enumerate(rows):
        p = folder / f"t{i}.tsv"
        pd.DataFrame([r]).to_csv(p, sep="\t", index=False)
        paths.append(p)
    empty = folder / "empty.tsv"
    pd.DataFrame(columns=list(rows[0])).to_csv(empty, sep="\t", index=False)
    return [*paths, empty]


def test_paper_accuracy_is_one_vs_rest_accuracy_averaged_over_three_classes() -> None:
    """The paper's accuracy (Table III): per class one-vs-rest (TP + TN) / all, i.e.
    (all - FN - FP) / all, averaged over the K classes. With K = 2 it equals the micro F1,
    so the tables' two-class tests cannot tell the two apart; with K = 3 they differ."""
    three = ["ignore", "A", "B", "C"]
    # rows: true A, B, C; columns: predicted A, B, C and background
    cm = np.array([[5, 1, 0, 0], [2, 6, 1, 0], [0, 1, 3, 0]])
    # 19 pixels. A: FN 1, FP 2 -> 16/19; B: FN 3, FP 2 -> 14/19; C: FN 1, FP 1 -> 17/19
    row = score_row(cm, three)
    assert row["paper_accuracy"] == pytest.approx((16 + 14 + 17) / (3 * 19))
    assert row["micro_f1"] == row["pixel_accuracy"] == pytest.approx(14 / 19)
    # no pixel predicted background: 1 - 2 (1 - micro F1) / K, the docstring's relation
    assert row["paper_accuracy"] == pytest.approx(1 - 2 * (1 - 14 / 19) / 3)
    # background predictions are misses (FN) of their class but no class's FP
    bg = np.array([[5, 1, 0, 2], [2, 6, 1, 0], [0, 1, 3, 1]])
    # 22 pixels. A: FN 3, FP 2 -> 17/22; B: FN 3, FP 2 -> 17/22; C: FN 2, FP 1 -> 19/22
    row = score_row(bg, three)
    assert row["paper_accuracy"] == pytest.approx((17 + 17 + 19) / (3 * 22))
    assert row["micro_f1"] == pytest.approx(2 * 14 / (2 * 14 + 5 + 8))  # TP 14, FP 5, FN 8
    assert row["pixel_accuracy"] == pytest.approx(14 / 22)


def test_mean_std_ddof1_and_na() -> None:
    assert mean_std([1.0, 2.0, 4.0])[:2] == pytest.approx((7 / 3, np.sqrt(7 / 3)))
    m, s, n = mean_std([0.5, float("nan")])
    assert (m, n) == (0.5, 1) and np.isnan(s)
    assert np.isnan(mean_std([])[0])


def test_tile_fold_scores_hand_computed(tmp_path) -> None:  # noqa: ANN001
    from dsf.tables import read_results

    raw, classes = read_results(_tile_tsvs(tmp_path))
    assert classes == TWO
    ts = tile_fold_scores(raw, classes, ["m1", "m2"], [1.0], [0, 1, 2])
    m1 = ts[ts["init"] == "m1"].set_index("fold")
    # fold 0: the slides' micro F1 averaged (0.9 + 0.75) / 2; pixel accuracy pooled 48 / 60
    assert m1.loc["0", "f1"] == pytest.approx(0.825)
    assert m1.loc["0", "pixel_accuracy"] == pytest.approx(0.8)
    assert m1.loc["0", "f1_A"] == pytest.approx(36 / 48)  # pooled [[18, 12], [0, 30]]
    assert m1.loc["0", "f1_B"] == pytest.approx(60 / 72)
    assert m1.loc["0", "paper_accuracy"] == pytest.approx((0.9 + 0.75) / 2)  # K = 2: = F1
    assert m1.loc["0", "n_slides"] == 2 and m1.loc["0", "n_tiles"] == 6
    # over folds (0.825, 1.0, 0.6): mean 0.808333, sample std 0.200520
    assert m1.loc["mean", "f1"] == pytest.approx(0.8083333, abs=1e-6)
    assert m1.loc["std", "f1"] == pytest.approx(0.2005200, abs=1e-6)
    m2 = ts[ts["init"] == "m2"].set_index("fold")
    assert np.isnan(m2.loc["1", "f1"]) and m2.loc["1", "n_slides"] == 0
    assert m2.loc["mean", "f1"] == pytest.approx(0.5) and np.isnan(m2.loc["std", "f1"])


def test_whole_slide_folds_and_models_pool_their_slides_confusions(tmp_path) -> None:  # noqa: ANN001
    """The whole-slide protocol's fold rows (and a prediction run's per-model rows) score the
    summed confusion of their slides, as the paper pools a fold: a large slide weighs more
    than a small one (the mean of the slides' scores would give each the same weight)."""
    from dsf.cohort_tables import model_cohort_scores
    from dsf.tables import slide_fold_scores

    big = [[90, 10, 0], [0, 0, 0]]  # 100 px, 90 right; class B absent from truth
    small = [[0, 0, 0], [5, 5, 0]]  # 10 px, 5 right
    df = pd.DataFrame([_row("s1", 0, "m1", big), _row("s2", 0, "m1", small)])
    fold = slide_fold_scores(df, TWO, ["m1"], [0])
    fold = fold[fold["level"] == "fold"].iloc[0]
    assert fold["pixel_accuracy"] == pytest.approx(95 / 110)  # not (0.9 + 0.5) / 2
    # pooled [[90, 10], [5, 5]]: F1 A = 180 / 195, F1 B = 10 / 25
    assert fold["f1_A"] == pytest.approx(180 / 195) and fold["f1_B"] == pytest.approx(10 / 25)
    assert fold["n_pixels"] == 110
    # and the paper's F1 and ACC, as the tile protocol's: the slides' averaged
    assert fold["f1"] == pytest.approx((0.9 + 0.5) / 2)
    assert fold["paper_accuracy"] == pytest.approx((0.9 + 0.5) / 2)  # K = 2: = micro F1
    every = slide_fold_scores(df, TWO, ["m1"], [0])
    assert list(every.loc[every["level"] == "slide", "f1"]) == pytest.approx([0.9, 0.5])
    members = df.assign(models="a.pt", routing="given")
    one = model_cohort_scores(members, TWO, ["m1"])
    one = one[one["level"] == "model"].iloc[0]
    assert one["pixel_accuracy"] == pytest.approx(95 / 110)
    assert one["f1_B"] == pytest.approx(10 / 25)


def test_score_tables_name_pixel_accuracy_and_earlier_ones_still_read(tmp_path) -> None:  # noqa: ANN001
    """A per-slide row's pixel accuracy is `pixel_accuracy` (`accuracy` had read as the
    paper's accuracy, `paper_accuracy`); tables of earlier dsf, with `accuracy`, still read."""
    from dsf.tables import read_results

    row = _row("s1", 0, "m1", [[8, 2, 0], [0, 10, 0]])
    assert "accuracy" not in row and row["pixel_accuracy"] == pytest.approx(0.9)
    old = tmp_path / "old.tsv"
    pd.DataFrame([row]).rename(columns={"pixel_accuracy": "accuracy"}).to_csv(
        old, sep="\t", index=False
    )
    raw, _ = read_results([old, *_tile_tsvs(tmp_path)])
    assert raw["pixel_accuracy"].notna().all() and "accuracy" not in raw.columns


def test_damaged_score_tables_are_named(tmp_path) -> None:  # noqa: ANN001
    """An empty file (a full disk), a truncated TSV or another table: one line naming the file
    and the fix, not a pandas error."""
    from dsf.tables import read_results

    good = _tile_tsvs(tmp_path)[0]
    empty = tmp_path / "empty0.tsv"
    empty.write_text("")
    other = tmp_path / "other.tsv"
    other.write_text("slide\tfold\ns1\t0\n")
    torn = tmp_path / "torn.tsv"
    torn.write_text("\n".join(good.read_text().splitlines()[:1]).replace("cm_", "cm__", 1) + "\n")
    for bad, words in (
        (empty, "is not a readable TSV"),
        (other, "no f1_<class> columns"),
        (torn, "has no per-class scores and confusion counts"),
        (tmp_path / "gone.tsv", "not found; run the evaluate stage"),
    ):
        with pytest.raises(ConfigError, match=rf"score table {bad}.*{words}"):
            read_results([good, bad])


def test_build_tables_markdown_tsvs_and_figure(tmp_path) -> None:  # noqa: ANN001
    tiles = _tile_tsvs(tmp_path)
    slides = []
    for i, (slide, fold, cm) in enumerate(
        [("s1", 0, [[9, 1, 0], [1, 9, 0]]), ("s3", 1, [[10, 0, 0], [0, 5, 5]])]
    ):
        r = _row(slide, fold, "m1", cm) | {"routing": "out_of_fold", "mpp": 2.0}
        p = tmp_path / f"s{i}.tsv"
        pd.DataFrame([r]).to_csv(p, sep="\t", index=False)
        slides.append(p)
    pan = tmp_path / "s1.panel.npz"
    np.savez(
        pan,
        thumbnail=np.full((20, 30, 3), 200, np.uint8),
        truth=np.ones((20, 30), np.uint8),
        prediction=np.full((20, 30), 2, np.uint8),
        mpp=np.float64(8.0),
        classes=np.asarray(TWO),
        meta=json.dumps({"slide": "s1", "init": "m1"}),
    )
    folds = pd.DataFrame({"slide": ["s1", "s2", "s3", "s4"], "group": list("abcd")})
    folds["fold"] = [0, 0, 1, 2]
    out = {k: tmp_path / "eval" / v for k, v in
           dict(markdown="tables.md", tile_scores="tile_scores.tsv",
                slide_scores="slide_scores.tsv", figure="figure.png").items()}  # fmt: skip
    build_tables(
        tiles=tiles,
        slides=slides,
        panels=[pan],
        folds=folds,
        methods=["m1", "m2"],
        fractions=[1.0],
        panel_slides=2,
        **out,
    )
    md = out["markdown"].read_text()
    assert "## Tile protocol" in md and "## Whole-slide protocol" in md
    assert "| Method | Fold 0 | Fold 1 | Fold 2 | Mean (Std) |" in md
    assert "| m1 | 0.8250 | 1.0000 | 0.6000 | 0.8083 (0.2005) |" in md
    m2_line = next(ln for ln in md.splitlines() if ln.startswith("| m2 | 0.5000 |"))
    assert "n/a[^" in m2_line and "0.5000 (n/a[^" in m2_line
    # a mean over some of the folds says so: m2's over 1 of 3, the whole-slide one over the
    # 2 of 3 folds with a labelled slide; m1's tile mean has all three and no such note
    assert "over the 1 of 3 folds that have this score" in md
    assert "over the 2 of 3 folds that have this score" in md
    m1_line = next(ln for ln in md.splitlines() if ln.startswith("| m1 | 0.8250 |"))
    assert m1_line.endswith("0.8083 (0.2005) |")
    assert "[^1]: " in md and "fold 1: no tile-protocol result" in md
    assert "F1 100%" in md  # Table IV header
    assert "fold 0: 2 validation slide(s) (s1, s2), 6 tiles, 60 labelled pixels" in md
    ts = pd.read_csv(out["tile_scores"], sep="\t", dtype={"fold": str})
    assert set(ts["fold"]) == {"0", "1", "2", "mean", "std"}
    ss = pd.read_csv(out["slide_scores"], sep="\t", dtype={"fold": str})
    per_fold = ss[ss["level"] == "fold"].set_index("fold")
    assert per_fold.loc["0", "pixel_accuracy"] == pytest.approx(0.9)
    assert per_fold.loc["1", "f1_B"] == pytest.approx(10 / 15)  # tp 5, fn 5 (background)
    assert np.isnan(per_fold.loc["2", "pixel_accuracy"])  # no labelled slide in fold 2
    mean = ss[ss["level"] == "mean"].iloc[0]
    assert mean["pixel_accuracy"] == pytest.approx((0.9 + 0.75) / 2)
    std = ss[ss["level"] == "std"].iloc[0]
    assert std["pixel_accuracy"] == pytest.approx(np.std([0.9, 0.75], ddof=1))
    assert "| m1 (100%) | s3 | 1 | 20 |" in md  # the fraction named, as in the summary
    with Image.open(out["figure"]) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_whole_slide_na_cells_say_why_per_row(tmp_path) -> None:  # noqa: ANN001
    """A fold whose slides lack a class says the class is absent (it had said the fold has
    no labelled slide, the note of a fold without results, such as fold 2 here)."""
    slides = []
    for i, (slide, fold, cm) in enumerate(
        [("s1", 0, [[10, 0, 0], [0, 0, 0]]), ("s3", 1, [[10, 0, 0], [0, 5, 5]])]
    ):
        r = _row(slide, fold, "m1", cm) | {"routing": "out_of_fold", "mpp": 2.0}
        slides.append(tmp_path / f"s{i}.tsv")
        pd.DataFrame([r]).to_csv(slides[-1], sep="\t", index=False)
    folds = pd.DataFrame({"slide": ["s1", "s3", "s4"], "group": list("abc"), "fold": [0, 1, 2]})
    md_path = tmp_path / "tables.md"
    build_tables(tiles=[], slides=slides, panels=[], folds=folds, methods=["m1"],
                 fractions=[1.0], markdown=md_path, tile_scores=tmp_path / "t.tsv",
                 slide_scores=tmp_path / "s.tsv")  # fmt: skip
    md = md_path.read_text()
    per_fold = md[md.index("### Per fold") : md.index("### Per slide")].splitlines()
    notes = dict(ln[2:].split("]: ", 1) for ln in md.splitlines() if ln.startswith("[^"))

    def said(fold: str) -> set[str]:
        line = next(ln for ln in per_fold if ln.startswith(f"| m1 (100%) | {fold} |"))
        return {notes[n] for n in re.findall(r"n/a\[\^(\d+)\]", line)}

    assert said("0") == {"class absent from both truth and prediction"}
    assert said("2") == {"fold 2: no labelled slide in this fold"}


def test_tables_cli_with_no_results_anywhere_is_na_not_zero(tmp_path) -> None:  # noqa: ANN001
    empty = tmp_path / "e.tsv"
    pd.DataFrame(columns=list(_row("x", 0, "m", [[1, 0, 0], [0, 1, 0]]))).to_csv(
        empty, sep="\t", index=False
    )
    (tmp_path / "folds.tsv").write_text("slide\tgroup\tfold\nx\tx\t0\ny\ty\t1\n")
    md = tmp_path / "t.md"
    args = ["tables", "--tiles", str(empty), "--folds", str(tmp_path / "folds.tsv")]
    args += ["--methods", "m", "--fractions", "1.0", "--markdown", str(md)]
    args += ["--tile-scores", str(tmp_path / "t.tsv"), "--slide-scores", str(tmp_path / "s.tsv")]
    assert main([*args, "--figure", str(tmp_path / "f.png")]) == 0
    text = md.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| m |"))
    assert "0.0000" not in line and line.count("n/a") == 3
    assert "No whole-slide results." in text
    assert (tmp_path / "f.png").stat().st_size > 0


def test_a_given_models_map_is_scored_without_folds(slide_files, tmp_path) -> None:  # noqa: ANN001
    """A prediction run's map (routing `given`) needs no folds.tsv, takes its row's name from
    --method, and a fold model's map without folds is refused."""
    slide, labels = _open(slide_files)
    given = _write_map(tmp_path / "g.tiff", _truth(), routing="given", folds=[0, 1])
    row = evaluate_slide(open_map(given, None), slide, labels, None, CLASSES, 64, "cohort")
    assert (row["fold"].iloc[0], row["init"].iloc[0], row["pixel_accuracy"].iloc[0]) == (
        -1,
        "cohort",
        1,
    )
    assert row["models"].iloc[0] == "model.pt"  # the map's models, naming each model alone
    # a model that trained on the slide (by id, its model.pt says) is refused: not validation
    torch.save({"fit_slides": ["other"], "select_slides": ["S"]}, tmp_path / "m.pt")
    seen = _write_map(
        tmp_path / "s.tiff", _truth(), routing="given", models=[str(tmp_path / "m.pt")]
    )
    with pytest.raises(ConfigError, match=r"slide 'S' is training data of .*m\.pt"):
        evaluate_slide(open_map(seen, None), slide, labels, None, CLASSES, 64, "cohort")
    own = open_map(_write_map(tmp_path / "o.tiff", _truth()), None)
    with pytest.raises(ConfigError, match="not at their recorded paths.*give --folds"):
        evaluate_slide(own, slide, labels, None, CLASSES, 64)
    # a fold model that names its training slides, the slide not among them: the model says
    # the map is out of fold, so a map made by hand is scored without folds.tsv
    torch.save({"fold": 1, "fit_slides": ["other"], "select_slides": []}, tmp_path / "f1.pt")
    oof = _write_map(tmp_path / "f.tiff", _truth(), folds=[1], models=[str(tmp_path / "f1.pt")])
    row = evaluate_slide(open_map(oof, None), slide, labels, None, CLASSES, 64)
    assert (row["fold"].iloc[0], row["pixel_accuracy"].iloc[0]) == (1, 1)


def test_cohort_tables_average_over_slides(tmp_path) -> None:  # noqa: ANN001
    slides = []
    for i, (slide, init, cm) in enumerate(
        [
            ("s1", "m1", [[9, 1, 0], [1, 9, 0]]),  # pixel accuracy 0.9
            ("s2", "m1", [[10, 0, 0], [0, 5, 5]]),  # 0.75, B has 5 misses to background
            ("s1", "m2", [[5, 5, 0], [5, 5, 0]]),  # 0.5, one slide: std n/a
        ]
    ):
        r = _row(slide, -1, init, cm) | {"routing": "given", "mpp": 2.0}
        pd.DataFrame([r]).to_csv(tmp_path / f"s{i}.tsv", sep="\t", index=False)
        slides.append(tmp_path / f"s{i}.tsv")
    out = tmp_path / "eval"
    args = ["cohort", "--slides", *map(str, slides), "--methods", "m1", "m2"]
    args += ["--markdown", str(out / "tables.md"), "--slide-scores", str(out / "scores.tsv")]
    assert main([*args, "--figure", str(out / "figure.png")]) == 0
    cs = pd.read_csv(out / "scores.tsv", sep="\t").set_index(["init", "level"])
    assert cs.loc[("m1", "mean"), "pixel_accuracy"] == pytest.approx((0.9 + 0.75) / 2)
    assert cs.loc[("m1", "std"), "pixel_accuracy"] == pytest.approx(np.std([0.9, 0.75], ddof=1))
    assert cs.loc[("m1", "all"), "pixel_accuracy"] == pytest.approx(33 / 40)  # pooled
    assert cs.loc[("m1", "all"), "f1_B"] == pytest.approx(2 * 14 / (2 * 14 + 1 + 6))
    assert np.isnan(cs.loc[("m2", "std"), "pixel_accuracy"])
    md = (out / "tables.md").read_text()
    assert "| m1 (100%) | 2 | " in md and "0.8250 (0.1061)" in md
    assert "needs results of at least two slides" in md and "Tile protocol" not in md
    with Image.open(out / "figure.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def _cohort_tsvs(folder: Path, rows: list[tuple[str, str, str, list[list[int]]]]) -> list[Path]:
    """One whole-slide TSV per (slide, set, models, confusion) of a prediction run."""
    paths = []
    for i, (slide, init, models, cm) in enumerate(rows):
        r = _row(slide, -1, init, cm) | {"routing": "given", "models": models, "mpp": 2.0}
        paths.append(folder / f"{folder.name}{i}.tsv")
        pd.DataFrame([r]).to_csv(paths[-1], sep="\t", index=False)
    return paths


def test_cohort_tables_score_each_model_alone(tmp_path) -> None:  # noqa: ANN001
    """apply.each_model: each model's slides pooled, then mean (std) over the set's models;
    models that scored different slides are refused."""
    (tmp_path / "e").mkdir()
    (tmp_path / "m").mkdir()
    ensemble = _cohort_tsvs(
        tmp_path / "e",
        [
            ("s1", "m1", "a.pt;b.pt", [[9, 1, 0], [1, 9, 0]]),
            ("s2", "m1", "a.pt;b.pt", [[10, 0, 0], [0, 10, 0]]),
        ],
    )
    members = _cohort_tsvs(
        tmp_path / "m",
        [
            ("s1", "m1", "a.pt", [[9, 1, 0], [1, 9, 0]]),  # a: 36 of 40 right overall
            ("s2", "m1", "a.pt", [[10, 0, 0], [0, 8, 2]]),
            ("s1", "m1", "b.pt", [[5, 5, 0], [5, 5, 0]]),  # b: 25 of 40 right overall
            ("s2", "m1", "b.pt", [[10, 0, 0], [5, 5, 0]]),
        ],
    )
    out = tmp_path / "eval"
    args = ["cohort", "--slides", *map(str, ensemble), "--model-slides", *map(str, members)]
    args += ["--methods", "m1", "--markdown", str(out / "tables.md")]
    assert main([*args, "--slide-scores", str(out / "scores.tsv")]) == 0
    cs = pd.read_csv(out / "scores.tsv", sep="\t")
    per_model = cs[cs["level"] == "model"].set_index("model")
    assert per_model.loc["a.pt", "pixel_accuracy"] == pytest.approx(36 / 40)
    assert per_model.loc["b.pt", "pixel_accuracy"] == pytest.approx(25 / 40)
    assert (per_model["n_slides"] == 2).all() and (per_model["n_pixels"] == 40).all()
    mean = cs[cs["level"] == "models_mean"].iloc[0]
    std = cs[cs["level"] == "models_std"].iloc[0]
    assert float(mean["pixel_accuracy"]) == pytest.approx((36 + 25) / 80)
    assert float(std["pixel_accuracy"]) == pytest.approx(np.std([0.9, 0.625], ddof=1), rel=1e-5)
    assert (int(mean["n_models"]), int(mean["n_slides"]), int(mean["n_pixels"])) == (2, 2, 40)
    ens = cs[cs["level"] == "all"].iloc[0]  # the averaged maps' row says how many it averages
    assert pd.isna(ens["model"]) and int(ens["n_models"]) == 2
    md = (out / "tables.md").read_text()
    assert "## Each model alone" in md and "| m1 (100%) | 2 | 2 | " in md
    assert "0.7625 (0.1945)" in md and "| m1 (100%) | `b.pt` | 40 | " in md
    odd = _cohort_tsvs(tmp_path / "m", [("s1", "m1", "c.pt", [[1, 0, 0], [0, 1, 0]])])
    args = ["cohort", "--slides", *map(str, ensemble), "--model-slides", *map(str, members + odd)]
    args += ["--markdown", str(out / "t2.md"), "--slide-scores", str(out / "s2.tsv")]
    assert main(args) != 0 and not (out / "t2.md").exists()


def test_cohort_tables_tile_protocol_per_model(tmp_path) -> None:  # noqa: ANN001
    """apply.tile_protocol: per model the slides' micro F1 averaged (the paper's F1), then mean
    (std) over the set's models, in tables.md and tile_scores.tsv."""
    (tmp_path / "e").mkdir()
    (tmp_path / "t").mkdir()
    ensemble = _cohort_tsvs(
        tmp_path / "e",
        [("s1", "m1", "a.pt;b.pt", [[9, 1, 0], [1, 9, 0]])],
    )
    tiles = []
    for i, (slide, model, cm) in enumerate(
        [
            ("s1", "a.pt", [[8, 2, 0], [0, 10, 0]]),  # micro F1 0.9
            ("s2", "a.pt", [[10, 10, 0], [0, 20, 0]]),  # 0.75 -> a: F1 0.825
            ("s1", "b.pt", [[10, 0, 0], [0, 10, 0]]),  # 1.0
            ("s2", "b.pt", [[6, 4, 0], [4, 6, 0]]),  # 0.6 -> b: F1 0.8
        ]
    ):
        r = _row(slide, i % 2, "m1", cm) | {"model": model}
        tiles.append(tmp_path / "t" / f"{i}.tsv")
        pd.DataFrame([r]).to_csv(tiles[-1], sep="\t", index=False)
    out = tmp_path / "eval"
    args = ["cohort", "--slides", *map(str, ensemble), "--tiles", *map(str, tiles)]
    args += ["--markdown", str(out / "tables.md"), "--slide-scores", str(out / "s.tsv")]
    assert main(args) != 0 and not (out / "tables.md").exists()  # --tile-scores is needed
    args += ["--tile-scores", str(out / "tiles.tsv")]
    assert main([*args, "--figure", str(out / "figure.png")]) == 0
    ts = pd.read_csv(out / "tiles.tsv", sep="\t", dtype={"fold": str})
    per_model = ts[ts["fold"].isna()].set_index("model")
    assert per_model.loc["a.pt", "f1"] == pytest.approx(0.825, rel=1e-5)
    assert per_model.loc["b.pt", "f1"] == pytest.approx(0.8, rel=1e-5)
    assert per_model.loc["a.pt", "n_tiles"] == 6 and per_model.loc["a.pt", "n_slides"] == 2
    assert per_model.loc["b.pt", "pixel_accuracy"] == pytest.approx(32 / 40, rel=1e-5)  # pooled
    mean = ts[ts["fold"] == "mean"].iloc[0]
    std = ts[ts["fold"] == "std"].iloc[0]
    assert mean["f1"] == pytest.approx(0.8125, rel=1e-5) and mean["n_models"] == 2
    assert (mean["n_slides"], mean["n_tiles"]) == (2, 6)  # one model's, not summed over models
    assert std["f1"] == pytest.approx(np.std([0.825, 0.8], ddof=1), rel=1e-4)
    md = (out / "tables.md").read_text()
    assert "## Tile protocol (the paper's" in md and "| m1 (100%) | 2 | 0.8125 (0.0177) |" in md
    assert "| m1 (100%) | `a.pt` | 6 | 0.8250 |" in md and "No tile protocol" not in md
    with Image.open(out / "figure.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    # no kept tile anywhere (header-only results): said so, and an empty tile_scores.tsv
    empty = tmp_path / "t" / "empty.tsv"
    pd.read_csv(tiles[0], sep="\t").iloc[:0].to_csv(empty, sep="\t", index=False)
    args = ["cohort", "--slides", *map(str, ensemble), "--tiles", str(empty)]
    args += ["--markdown", str(out / "e.md"), "--slide-scores", str(out / "e.tsv")]
    assert main([*args, "--tile-scores", str(out / "e_tiles.tsv")]) == 0
    assert "No result: no tile" in (out / "e.md").read_text()
    assert len(pd.read_csv(out / "e_tiles.tsv", sep="\t")) == 0


def test_a_method_has_one_colour_in_both_bar_panels(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Colours had followed each panel's own order: with dsf alone in the whole-slide panel,
    its bars took the colour random had in the tile panel."""
    import matplotlib.colors as mcolors

    import dsf.figures as figures

    seen: dict[str, dict[str, str]] = {}
    real = figures._bars

    def spy(ax, df, classes, title, colours):  # noqa: ANN001, ANN202
        real(ax, df, classes, title, colours)
        seen[title] = {c.get_label(): mcolors.to_hex(c.patches[0].get_facecolor())
                       for c in ax.containers if hasattr(c, "patches") and c.patches}  # fmt: skip

    monkeypatch.setattr(figures, "_bars", spy)

    def rows(inits: list[str]) -> pd.DataFrame:
        base = {"f1": 0.55, "f1_A": 0.5, "f1_B": 0.6, "fraction": 1.0}
        return pd.DataFrame([base | {"init": i, "fold": f} for i in inits for f in ("mean", "std")])

    slide = rows(["dsf"]).assign(level=lambda d: d["fold"])
    figures.evaluation_figure(
        rows(["random", "dsf"]), slide, TWO, [], tmp_path / "f.png", panel_slides=0
    )
    tile, whole = (seen[t] for t in sorted(seen, key=lambda t: not t.startswith("Tile")))
    assert set(tile) == {"random", "dsf"} and set(whole) == {"dsf"}
    assert whole["dsf"] == tile["dsf"] != tile["random"]


def test_method_colours_stay_clear_of_the_class_colours() -> None:
    """The figure shows bars per method and overlays per class: no method colour is within
    reach of a class colour (the first method had TUM's vermillion exactly)."""
    from dsf.colours import class_colours
    from dsf.figures import PALETTE

    methods = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in PALETTE], float)
    classes = class_colours(14)[1:].astype(float)
    gap = np.linalg.norm(methods[:, None] - classes[None], axis=-1).min()
    assert gap > 60, gap
    assert len({tuple(m) for m in methods}) == len(PALETTE)


def test_the_tables_say_what_each_method_is() -> None:
    """Inits are config keys (random, dsf, unet): the tables' legend gives the paper's names;
    names dsf does not know (a prediction run's model sets) stay as they are."""
    from dsf.tables import method_legend

    legend = method_legend(["random", "dsf", "m1"])
    assert legend.startswith("random (HookNet from random init, the supervised baseline), dsf (")
    assert "DSF-WSI encoders, the paper's method), m1" in legend
    assert method_legend([]) == "none"


def test_slides_named_like_missing_values_keep_their_names_in_the_tables(tmp_path) -> None:  # noqa: ANN001
    """Slide ids `NA`, `nan` and `null` are valid (folds.tsv keeps them): the score tables read
    them as names, not as missing values, which had merged them and crashed the tables; a
    score written as `nan` is still missing."""
    from dsf.evaluate import write_tsv
    from dsf.tables import read_results

    paths = []
    for i, (slide, fold) in enumerate((("NA", 0), ("nan", 0), ("null", 1), ("s2", 1))):
        row = _row(slide, fold, "m1", [[10, 0, 0], [0, 0, 0]])  # B absent: f1_B is nan
        write_tsv(pd.DataFrame([row]), tmp_path / f"t{i}.tsv")
        paths.append(tmp_path / f"t{i}.tsv")
    raw, classes = read_results(paths)
    assert list(raw["slide"]) == ["NA", "nan", "null", "s2"] and classes == TWO
    assert raw["f1_B"].isna().all() and raw["f1_A"].notna().all()
    folds = pd.DataFrame({"slide": ["NA", "nan", "null", "s2"], "group": list("abcd")})
    folds["fold"] = [0, 0, 1, 1]
    out = {k: tmp_path / "eval" / v for k, v in
           dict(markdown="tables.md", tile_scores="tile_scores.tsv",
                slide_scores="slide_scores.tsv", figure="figure.png").items()}  # fmt: skip
    build_tables(tiles=paths, slides=[], panels=[], folds=folds, methods=["m1"],
                 fractions=[1.0], panel_slides=0, **out)  # fmt: skip
    md = out["markdown"].read_text()
    assert "fold 0: 2 validation slide(s) (NA, nan)" in md
