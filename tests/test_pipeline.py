"""The whole workflow, end to end on a tiny config: slides to maps and evaluation tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import yaml
from test_workflow import job_counts, smk, trained_config

SLIDES = {
    f"px-{i}": {"seed": 20 + i, "width": 2048, "height": 2048, "labels": kind, "group": f"p{i}"}
    for i, kind in enumerate(["mask", "geojson", "mask", "geojson"])
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, real: Path) -> Path:
    """A finished tiny run: four annotated synthetic slides and CMU-1 without annotation."""
    wd = tmp_path_factory.mktemp("pipeline")
    (wd / "sheet.tsv").write_text(
        f"slide\tpath\tgroup\ncmu\t{real / 'CMU-1-Small-Region.svs'}\tp-cmu\n"
    )
    cfg = trained_config(
        SLIDES, sheet="sheet.tsv", epochs=1, steps=2, batch=4, inits=["random", "dsf"], threads=2
    )
    (wd / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    smk("--configfile", "cfg.yaml", "--cores", "2", cwd=wd)
    return wd


def test_every_slide_gets_a_map_that_opens_at_its_scale(run: Path) -> None:
    for sid in [*SLIDES, "cmu"]:
        path = run / "out" / "maps" / "dsf" / f"{sid}.tiff"
        meta = json.loads(path.with_suffix(".json").read_text())
        osr = openslide.OpenSlide(path)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(2.0)
        assert osr.dimensions == (meta["width"], meta["height"])
        classes = tifffile.imread(path, key=0)
        assert classes.max() <= 3 and (classes > 0).mean() > 0.2  # tissue got classes
        if sid == "cmu":  # no annotation: every fold's model, averaged
            assert meta["routing"] == "ensemble" and meta["folds"] == [0, 1]
        else:
            assert meta["routing"] == "out_of_fold" and len(meta["folds"]) == 1
        assert path.with_suffix(".jpg").stat().st_size > 1000


def test_every_map_is_traced_into_polygons_over_its_slide(run: Path) -> None:
    """maps/<init>/<slide>.geojson: QuPath annotations of the predicted classes, in the slide's
    level-0 pixels."""
    dims = {sid: (2048, 2048) for sid in SLIDES} | {"cmu": (2220, 2967)}
    for sid, (w, h) in dims.items():
        doc = json.loads((run / "out" / "maps" / "dsf" / f"{sid}.geojson").read_text())
        names = {f["properties"]["classification"]["name"] for f in doc["features"]}
        assert names and names <= {"TUM", "STR", "LYM"}
        xy = np.concatenate(
            [np.asarray(r) for f in doc["features"] for r in f["geometry"]["coordinates"]]
        )
        assert xy.min() >= 0 and xy[:, 0].max() <= w and xy[:, 1].max() <= h
        assert xy[:, 0].max() > w / 2 and xy[:, 1].max() > h / 2  # not squeezed into a corner


def test_maps_of_annotated_slides_come_from_the_fold_that_held_them_out(run: Path) -> None:
    folds = pd.read_csv(run / "out" / "folds.tsv", sep="\t").set_index("slide")
    for sid in SLIDES:
        meta = json.loads((run / "out" / "maps" / "dsf" / f"{sid}.json").read_text())
        k = int(folds.loc[sid, "fold"])
        assert meta["folds"] == [k]
        model = meta["models"][0]
        assert model.endswith(f"finetune/dsf/frac1.0/fold{k}/model.pt")


def test_tables_hold_both_protocols(run: Path) -> None:
    md = (run / "out" / "eval" / "tables.md").read_text()
    assert "random" in md and "dsf" in md
    tiles = pd.read_csv(run / "out" / "eval" / "tile_scores.tsv", sep="\t")
    slides = pd.read_csv(run / "out" / "eval" / "slide_scores.tsv", sep="\t")
    assert set(tiles["init"]) >= {"random", "dsf"}
    assert "dsf" in set(slides["init"])
    assert (run / "out" / "eval" / "figure.png").stat().st_size > 10_000


def test_the_report_describes_the_run(run: Path) -> None:
    smk("--configfile", "cfg.yaml", "--report", "report.html", cwd=run)
    page = (run / "report.html").read_text()
    assert "input normalisation: computed per pretraining run from up to 1000 of its" in page
    assert "System Message" not in page  # the description's reStructuredText is valid


def test_each_init_has_a_table_of_the_predicted_areas(run: Path) -> None:
    """maps/<init>/areas.tsv: a row per slide, each class's area in mm² from its map (the
    mapped init only: infer.inits)."""
    assert not (run / "out" / "maps" / "random").exists()
    for init in ("dsf",):
        table = pd.read_csv(run / "out" / "maps" / init / "areas.tsv", sep="\t")
        assert sorted(table["slide"]) == sorted([*SLIDES, "cmu"]) and set(table["init"]) == {init}
        for row in table.itertuples():
            path = run / "out" / "maps" / init / f"{row.slide}.tiff"
            mpp = json.loads(path.with_suffix(".json").read_text())["mpp"]
            counts = np.bincount(tifffile.imread(path, key=0).ravel(), minlength=4)
            px_mm2 = (mpp / 1000) ** 2
            assert row.TUM_mm2 == pytest.approx(counts[1] * px_mm2, rel=1e-5)
            assert row.mapped_mm2 == pytest.approx(counts[1:].sum() * px_mm2, rel=1e-5)
            assert row.mapped_mm2 > 0
            assert row.TUM_pct + row.STR_pct + row.LYM_pct == pytest.approx(100, abs=1e-3)


def test_nothing_left_to_do_and_no_partial_files(run: Path) -> None:
    out = smk("-n", "--configfile", "cfg.yaml", cwd=run).stdout
    assert "Nothing to be done" in out or job_counts(out) == {}
    assert not list((run / "out").rglob("*.partial"))
    assert not list((run / "out").rglob(".*.work"))
    # the probabilities are written only when asked for
    assert not list((run / "out" / "maps").rglob("*.probs.zarr"))
    assert np.all([p.stat().st_size > 0 for p in (run / "out" / "maps" / "dsf").iterdir()])


def test_a_prediction_run_maps_new_slides_with_the_trained_models(
    run: Path, tmp_path: Path, real: Path
) -> None:
    """apply.models: a new cohort (CMU-1 and an annotated slide under other names) mapped by
    the fold models of the finished run, averaged, and the annotated one scored; nothing
    trained, no folds, no patches."""
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(real / "CMU-1-Small-Region.svs", new / "case-7.svs")
    shutil.copy(run / "out" / "synth" / "px-0.tiff", new / "case-8.tiff")
    shutil.copy(run / "out" / "synth" / "px-0.labels.tiff", new / "case-8.labels.tiff")
    models = str(run / "out" / "finetune" / "dsf" / "frac1.0")
    cfg = {
        "slides": "new",
        "results": "res",
        "tissue": {"mpp": 8.0, "method": "rgb"},
        "labels": {"classes": ["ignore", "TUM", "STR", "LYM"]},
        "infer": {"overlap": 0.0, "threads": 2, "gpus": 0, "out_mpp": 2.0},
        "apply": {
            "models": {"dsf": [models], "fold0": [models + "/fold0/model.pt"]},
            "each_model": True,
            "tile_protocol": True,
        },
        # the models' geometry, for the tile protocol
        "patches": yaml.safe_load((run / "cfg.yaml").read_text())["patches"],
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    done = smk("--configfile", "cfg.yaml", "--cores", "2", cwd=tmp_path)
    assert "prediction run (apply.models): dsf: 2 model(s); fold0: 1 model(s)" in (
        done.stdout + done.stderr
    )
    res = tmp_path / "res"
    made = sorted(p.name for p in res.iterdir())
    assert made == ["benchmarks", "eval", "logs", "maps", "patches", "report", "tissue"]
    # the annotated slide scored per model set, over slides (one here: std n/a)
    scores = pd.read_csv(res / "eval" / "slide_scores.tsv", sep="\t")
    assert set(scores["init"]) == {"dsf", "fold0"}
    per_slide = scores[scores["level"] == "slide"]
    assert list(per_slide["slide"]) == ["case-8", "case-8"]
    assert (per_slide["n_pixels"] > 0).all() and per_slide["macro_f1"].between(0, 1).all()
    md = (res / "eval" / "tables.md").read_text()
    assert "Mean (std) over slides" in md and "| dsf (100%) | case-8 |" in md
    assert (res / "eval" / "figure.png").stat().st_size > 10_000
    # apply.each_model: dsf's two fold models alone on the annotated slide; alone, fold 0's
    # model draws exactly the map of the set `fold0`
    # each set's predicted areas per slide
    for name in ("dsf", "fold0"):
        areas = pd.read_csv(res / "maps" / name / "areas.tsv", sep="\t")
        assert list(areas["slide"]) == ["case-7", "case-8"] and (areas["mapped_mm2"] > 0).all()
        assert set(areas["init"]) == {name}  # the set's name, as in slide_scores.tsv
    alone = sorted(str(p.relative_to(res / "maps")) for p in res.glob("maps/*/model*/*.tiff"))
    assert alone == ["dsf/model0/case-8.tiff", "dsf/model1/case-8.tiff"]
    assert np.array_equal(
        tifffile.imread(res / "maps" / "dsf" / "model0" / "case-8.tiff", key=0),
        tifffile.imread(res / "maps" / "fold0" / "case-8.tiff", key=0),
    )
    members = scores[scores["level"] == "model"]
    assert sorted(members["model"].str.extract(r"(fold\d)/model.pt")[0]) == ["fold0", "fold1"]
    fold0 = scores[(scores["init"] == "fold0") & (scores["level"] == "all")].iloc[0]
    alone0 = members[members["model"].str.contains("fold0/")].iloc[0]
    assert alone0["macro_f1"] == pytest.approx(fold0["macro_f1"], abs=1e-6)
    assert "## Each model alone" in md and not list(res.glob("eval/slides/*/model*/*.npz"))
    # apply.tile_protocol: the annotated slide's store scored by each model, the paper's way
    tiles = pd.read_csv(res / "eval" / "tile_scores.tsv", sep="\t", dtype={"fold": str})
    per_model = tiles[tiles["fold"].isna()]
    assert sorted(per_model["init"]) == ["dsf", "dsf", "fold0"] and (per_model["n_tiles"] > 0).all()
    f1 = {(r["init"], Path(r["model"]).parent.name): r["f1"] for _, r in per_model.iterrows()}
    assert f1[("fold0", "fold0")] == pytest.approx(f1[("dsf", "fold0")])  # the same model
    assert per_model["f1"].between(0, 1).all() and "## Tile protocol" in md
    assert sorted(p.name for p in (res / "patches").iterdir()) == [
        "case-8.labels.zarr",
        "case-8.zarr",
    ]
    smk("--configfile", "cfg.yaml", "--report", "report.html", cwd=tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "This run is a" in page and "System Message" not in page  # reStructuredText is valid
    assert "prediction run: the set" in page  # the maps are captioned as such
    meta = json.loads((res / "maps" / "dsf" / "case-7.json").read_text())
    assert meta["routing"] == "given" and meta["folds"] == [0, 1]
    assert all("finetune/dsf/frac1.0/fold" in m for m in meta["models"])
    osr = openslide.OpenSlide(res / "maps" / "dsf" / "case-7.tiff")
    assert osr.dimensions == (meta["width"], meta["height"])
    classes = tifffile.imread(res / "maps" / "dsf" / "case-7.tiff", key=0)
    assert classes.max() <= 3 and (classes > 0).mean() > 0.2
    doc = json.loads((res / "maps" / "dsf" / "case-7.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} <= {
        "TUM", "STR", "LYM",
    }  # fmt: skip
