"""The schema as the one home of defaults; the slide sheet's validation."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dsf.config import (
    add_section_arguments,
    cli_args,
    coerce_strings,
    defaults,
    load_config,
    load_schema,
    section_from_args,
)
from dsf.config import validate as validate_config
from dsf.errors import ConfigError
from dsf.sheet import check_files, load_sheet, read_sheet, write_sheet

REPO = Path(__file__).resolve().parents[1]


def test_defaults_come_from_the_schema() -> None:
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    tissue = defaults("tissue")
    assert tissue["method"] == schema["properties"]["tissue"]["properties"]["method"]["default"]
    assert tissue["rgb_max"] == [235, 210, 235]  # the paper's threshold
    full = defaults()
    assert full["patches"]["stride"] == 512 and full["patches"]["scale"] == 4
    assert full["results"] == "results"


def test_every_schema_entry_is_whole() -> None:
    """No schema entry holds an unknown keyword or a null (but a default): an unquoted comma
    in a one-line `{..., description: a, b}` had split the text into a stray key (the help
    said "Seed of init"), and every setting's help text comes from here."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    # x-form: a pattern's form in words, for its message
    words = {"type", "default", "description", "minimum", "maximum", "exclusiveMinimum",
             "enum", "items", "prefixItems", "minItems", "maxItems", "properties",
             "additionalProperties",
             "required", "uniqueItems", "oneOf", "anyOf", "$schema", "title", "pattern",
             "minLength", "propertyNames", "not", "const", "multipleOf",
             "x-form"}  # fmt: skip

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                assert value is not None or key == "default", f"{where}.{key} is null"
                if where.endswith(".properties"):
                    walk(value, f"{where}.{key}")
                    continue
                assert key in words, f"{where}: unknown schema keyword {key!r}"
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    walk(schema, "schema")


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"patches\.stride"):
        validate_config({"patches": {"stride": "wide"}})
    with pytest.raises(ConfigError, match=r"tissue\.method"):
        validate_config({"tissue": {"method": "magic"}})
    with pytest.raises(ConfigError, match=r"^config key patchez is not a setting.*`patches`\?"):
        validate_config({"patchez": {}})
    with pytest.raises(ConfigError, match=r"tissue\.metod .*did you mean `method`") as err:
        validate_config({"tissue": {"metod": "otsu"}})
    assert len(str(err.value)) < 200  # one line, not the schema
    # a class name given as a value of labels.names, which wants the class's index
    with pytest.raises(
        ConfigError,
        match=r"^config key labels\.names\.Tumour: 'Tumor' is not of type 'integer' \(wanted: "
        r"a class index, 0 unlabelled, 1 the second of labels\.classes and so on, e\.g\. Tumor: 1",
    ):
        validate_config({"labels": {"names": {"Tumour": "Tumor"}}})
    # `--config 'pretrain={epochs:2}'` (YAML reads `epochs:2` as a key)
    with pytest.raises(ConfigError, match=r"pretrain\.epochs:2 .*space is missing after the"):
        validate_config({"pretrain": {"epochs:2": None}})
    # an unclosed brace or bracket: YAML gives the section or list as text
    with pytest.raises(
        ConfigError,
        match=r"^config key pretrain: .*section was read as text.*"
        r"closed.*--config 'pretrain=\{",
    ):
        validate_config({"pretrain": "{epochs: 2"})
    with pytest.raises(
        ConfigError,
        match=r"finetune\.fractions: .*list was read as text.*"
        r"--config 'finetune=\{fractions: \[",
    ):
        validate_config({"finetune": {"fractions": "[0.1, 1.0"}})
    # NaN passes the schema's bounds (every comparison with it is false): refused by name
    with pytest.raises(ConfigError, match=r"patches\.target_mpp is nan: give a finite"):
        validate_config({"patches": {"target_mpp": float("nan")}})
    with pytest.raises(ConfigError, match=r"pretrain\.mean\.1 is inf"):
        validate_config({"pretrain": {"mean": [0.5, float("inf"), 0.5], "std": [0.2] * 3}})
    # values the jobs refuse are refused with the config (an empty list had been a traceback
    # while planning; a hue over 0.5 a traceback when pretraining started)
    with pytest.raises(ConfigError, match=r"finetune\.fractions"):
        validate_config({"finetune": {"fractions": []}})
    with pytest.raises(ConfigError, match=r"pretrain\.jitter\.3: 0\.6 is greater than .* 0\.5"):
        validate_config({"pretrain": {"jitter": [0.4, 0.4, 0.4, 0.6]}})
    assert validate_config({"pretrain": {"jitter": [1.5, 0.4, 0.4, 0.5]}})["pretrain"]["jitter"]


def test_a_mask_ratio_that_masks_every_block_is_refused() -> None:
    """pretrain.mask_ratio is checked against patches.scale for the methods that mask: 0.9
    keeps 2 of 16 blocks at scale 4 but none of 4 at scale 2 (the job had failed)."""
    from dsf.inits import check_mask_ratio

    check_mask_ratio(["dsf"], 0.9, 4)
    check_mask_ratio(["simsiam", "dsl_only", "jigsaw_only"], 0.9, 2)  # they keep every block
    check_mask_ratio(["dsf"], 0.87, 2)  # keeps round(0.52) = 1 of 4
    with pytest.raises(ConfigError, match=r"pretrain\.mask_ratio 0\.9 masks all 4 .*below 0\.875$"):
        check_mask_ratio(["simsiam", "mask_only"], 0.9, 2)
    with pytest.raises(ConfigError, match=r"below 0\.5, or raise patches\.scale"):
        check_mask_ratio(["dsf"], 0.5, 1)


def test_nested_command_line_values_are_typed_by_the_schema() -> None:
    """`snakemake --config 'infer={overlap: 0.5}'` hands nested values over as text; the
    schema types them (numbers, booleans, null, in lists and maps too), text stays text, and
    text that is no allowed value is still refused naming the key."""
    from snakemake.cli import parse_config

    given = parse_config(
        [
            "infer={overlap: 0.5, amp: false, unlabelled_fold: null, inits: [dsf]}",
            "pretrain={mean: [0.7, 0.5, 0.6], epochs: 3}",
            "labels={names: {Tumor: 1, Other: 0}}",
            "folds={k: 3}",
        ]
    )
    assert given["infer"]["overlap"] == "0.5"  # what Snakemake gives
    config = validate_config(coerce_strings(load_schema(), given))
    assert config["infer"]["overlap"] == 0.5 and config["infer"]["amp"] is False
    assert config["infer"]["unlabelled_fold"] is None and config["infer"]["inits"] == ["dsf"]
    assert config["pretrain"]["mean"] == [0.7, 0.5, 0.6] and config["pretrain"]["epochs"] == 3
    assert config["labels"]["names"] == {"Tumor": 1, "Other": 0} and config["folds"]["k"] == 3
    with pytest.raises(ConfigError, match=r"infer\.overlap"):
        validate_config(coerce_strings(load_schema(), parse_config(["infer={overlap: lots}"])))
    with pytest.raises(ConfigError, match=r"folds\.k"):
        validate_config(coerce_strings(load_schema(), parse_config(["folds={k: 2.5}"])))


def test_embedded_config_is_valid() -> None:
    cfg = load_config(REPO / "config" / "config.yaml")
    assert cfg["patches"]["scale"] * cfg["patches"]["block"] <= 256  # tiny demo geometry


def test_cli_options_round_trip_the_config() -> None:
    values = defaults("tissue") | {"method": "otsu", "pen_marks": True, "rgb_max": [230, 200, 230]}
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, "tissue")
    args = parser.parse_args(shlex.split(cli_args("tissue", values)))
    assert section_from_args(args, "tissue") == values
    # options not given keep the schema defaults
    assert section_from_args(parser.parse_args([]), "tissue") == defaults("tissue")
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "magic"])
    labels = defaults("labels") | {"class_map": {"1": 1, "19": 1}}
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, "labels")
    args = parser.parse_args(shlex.split(cli_args("labels", labels)))
    assert section_from_args(args, "labels")["class_map"] == {"1": 1, "19": 1}


def test_options_follow_the_schema_not_the_configs_key_order() -> None:
    """Snakemake compares the option strings with the last run's: the same settings in
    another order (a `--config` override stating a default, a YAML saved again sorted) had
    rerun every job after them."""
    values = defaults("pretrain") | {"epochs": 3, "lr": 0.01, "mean": [0.5, 0.5, 0.5]}
    reordered = dict(reversed(list(values.items())))
    assert list(reordered) != list(values)
    assert cli_args("pretrain", reordered) == cli_args("pretrain", values)
    assert cli_args("pretrain", values).index("--epochs") < cli_args("pretrain", values).index(
        "--lr"
    )  # the schema's order: epochs before lr
    assert cli_args("pretrain", values) != cli_args("pretrain", values | {"epochs": 4})


def test_workflow_only_keys_are_neither_options_nor_recorded_settings() -> None:
    """`dsf infer` never sees infer.gpus or infer.inits: its map's JSON had recorded their
    schema defaults (gpus 1, inits null) for a run that used gpus 0 and inits [dsf]."""
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, "infer", skip=("inits", "gpus"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpus", "0"])
    st = section_from_args(parser.parse_args(["--overlap", "0.25"]), "infer")
    assert st["overlap"] == 0.25 and not {"inits", "gpus"} & set(st)
    assert set(st) == set(defaults("infer")) - {"inits", "gpus"}


def _sheet(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sheet.tsv"
    path.write_text(text)
    return path


def test_sheet_resolves_paths_next_to_the_sheet(tmp_path: Path) -> None:
    path = _sheet(
        tmp_path,
        "slide\tpath\tmpp\tlabels\nA\tslides/a b.svs\t0.25\t\nB\t/abs/b.tif\t\tb.geojson\n",
    )
    df = read_sheet(path)
    assert df.loc["A", "path"] == str(tmp_path / "slides" / "a b.svs")
    assert df.loc["A", "mpp"] == 0.25 and df.loc["A", "labels"] is None
    assert df.loc["B", "mpp"] is None and df.loc["B", "labels"] == str(tmp_path / "b.geojson")
    assert df.loc["B", "group"] == "B"  # a slide without a group is its own group


def test_sheet_slides_without_a_group_keep_their_tcga_patient_together(tmp_path: Path) -> None:
    """Without a `group`, TCGA barcodes are grouped by patient as in a folder: a hand-written
    sheet had put DX1 and DX2 of one patient in different folds (validation on a patient the
    model trained on)."""
    text = (
        "slide\tpath\tgroup\nTCGA-A1-A0SK-01Z-00-DX1\ta.svs\t\ntcga-a1-a0sk-01z-00-dx2\tb.svs\t\n"
    )
    text += "TCGA-A2-0001-01Z-00-DX1\tc.svs\tsite3\nother\td.svs\t\n"
    df = read_sheet(_sheet(tmp_path, text))
    assert list(df["group"]) == ["TCGA-A1-A0SK", "TCGA-A1-A0SK", "site3", "other"]


def test_a_spreadsheets_sheet_reads_the_same(tmp_path: Path) -> None:
    """Trailing tabs, short rows, Windows line ends, a BOM and "quoted" cells, as spreadsheets
    save a TSV, read as the plain sheet does."""
    text = '\ufeffslide\tpath\tmpp\tgroup\r\nA\t"a b.svs"\t0.25\t\t\t\r\nB\tb.svs\r\n'
    (tmp_path / "sheet.tsv").write_text(text, encoding="utf-8", newline="")
    df = read_sheet(tmp_path / "sheet.tsv")
    assert list(df.index) == ["A", "B"]
    assert df.loc["A", "path"] == str(tmp_path / "a b.svs") and df.loc["A", "mpp"] == 0.25
    assert df.loc["B", "mpp"] is None and df.loc["B", "group"] == "B"
    # an empty column at the right of the used range: the header ends in tabs too (it had
    # been refused as an unknown column '')
    text = "slide\tpath\tmpp\t\t\nA\ta.svs\t0.5\t\t\nB\tb.svs\t\t\t\n"
    (tmp_path / "sheet.tsv").write_text(text, encoding="utf-8", newline="")
    df = read_sheet(tmp_path / "sheet.tsv")
    assert list(df.index) == ["A", "B"] and df.loc["A", "mpp"] == 0.5
    # a cell under no named column is still refused, naming its line
    (tmp_path / "sheet.tsv").write_text("slide\tpath\t\nA\ta.svs\tx\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2 \(slide 'A'\): 3 tab-separated cells"):
        read_sheet(tmp_path / "sheet.tsv")


def test_a_csv_sheet_reads_as_the_tsv_does(tmp_path: Path) -> None:
    """A spreadsheet's CSV export (commas; semicolons where decimal commas are written) reads
    as the TSV; `dsf sheet --out x.csv` writes one. A comma-separated .tsv is refused saying
    so (it had said only that the column `slide` was missing, naming 'slide,path,mpp')."""
    want = read_sheet(
        _sheet(tmp_path, "slide\tpath\tmpp\tgroup\nA\ta, b.svs\t0.25\tp1\nB\tb.svs\n")
    )
    for name, text in (
        ("s.csv", 'slide,path,mpp,group\r\nA,"a, b.svs",0.25,p1\r\nB,b.svs,,\r\n'),
        ("s2.CSV", 'slide;path;mpp;group\nA;"a, b.svs";0.25;p1\nB;b.svs\n'),
    ):
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
        pd.testing.assert_frame_equal(read_sheet(tmp_path / name), want)
    write_sheet(want.to_dict("records"), tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text().startswith("slide,path,mpp,labels,group,fold\n")
    pd.testing.assert_frame_equal(read_sheet(tmp_path / "out.csv"), want)
    (tmp_path / "s.tsv").write_text("slide,path,mpp\nA,a.svs,0.25\n")
    with pytest.raises(ConfigError, match=r"its header is comma-separated: name it \.csv"):
        read_sheet(tmp_path / "s.tsv")
    (tmp_path / "s.csv").write_text("slide,path,mpp\nA,a.svs,0.25,x\n")
    with pytest.raises(ConfigError, match=r"line 2 \(slide 'A'\): 4 comma-separated cells"):
        read_sheet(tmp_path / "s.csv")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("slide\tpath\nA\ta.svs\nA\tb.svs\n", r"'A' appears twice \(line 2 and line 3\)"),
        ("slide\tmpp\nA\t0.5\n", r"required column `path`"),
        ("slide\tpath\tcolour\nA\ta.svs\tred\n", r"unknown column\(s\) \['colour'\]"),
        ("# mine\nslide\tpath\tmpp\nA\ta.svs\tfast\n", r"line 3 \(slide 'A'\), column `mpp`"),
        # a stray tab would move every later cell a column on: named by line and slide
        ("slide\tpath\tmpp\nA\ta.svs\t0.5\nB\tb.svs\t\t0.5\n", r"line 3 \(slide 'B'\): 4 tab"),
        ("slide\tpath\tmpp\nA\ta.svs\t0.5\t1\nB\tb.svs\t0.5\t1\n", r"line 2 \(slide 'A'\): 4"),
        ("", r"is empty; it needs a header line"),
        ("slide\tpath\tmpp\nA\ta.svs\t-1\n", r"column `mpp`"),
        ("slide\tpath\nA/B\ta.svs\n", r"column `slide`"),
        ("slide\tpath\tpath\nA\ta.svs\tb.svs\n", r"more than once"),
        ("slide\tpath\n", r"lists no slides"),
        ("slide\tpath\tmpp\nA\t\t0.5\n", r"line 2 \(slide 'A'\): the `path` cell is empty"),
    ],
)
def test_bad_sheets_name_row_and_column(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        read_sheet(_sheet(tmp_path, text))


def test_missing_sheet_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config key `slides`: .*nope does not exist"):
        read_sheet(tmp_path / "nope")  # a mistyped folder is not called a sheet
    (tmp_path / "one.svs").write_bytes(b"II*\x00")
    with pytest.raises(ConfigError, match=r"one\.svs is a slide, not a sheet; give the folder"):
        read_sheet(tmp_path / "one.svs")  # had been "not a UTF-8 text file"


def test_synthetic_slides_join_the_sheet(tmp_path: Path) -> None:
    (tmp_path / "real.svs").write_bytes(b"x")
    cfg = validate_config(
        {
            "results": str(tmp_path / "res"),
            "slides": str(_sheet(tmp_path, "slide\tpath\nreal\treal.svs\n")),
            "synth": {
                "slides": {
                    "s1": {"seed": 1, "width": 256, "height": 256, "labels": "geojson"},
                    "s2": {"seed": 2, "width": 256, "height": 256},
                }
            },
        }
    )
    df = load_sheet(cfg)
    assert list(df.index) == ["real", "s1", "s2"]
    assert df.loc["s1", "labels"].endswith("res/synth/s1.geojson")
    assert df.loc["s2", "labels"].endswith("res/synth/s2.labels.tiff")
    cfg["synth"]["slides"]["real"] = {"seed": 3, "width": 256, "height": 256}
    with pytest.raises(ConfigError, match="'real' appears"):
        load_sheet(cfg)


def test_a_slide_has_one_path_however_the_sheet_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same sheet named by a relative or an absolute `slides` (or a folder either way)
    gives the same slide, annotation and mask paths: Snakemake compares input paths as
    strings, so two spellings of one file reran the whole project. Under the working folder
    they are relative to it (the demo's), elsewhere absolute."""
    cohort, work = tmp_path / "cohort", tmp_path / "work"
    (cohort / "sub").mkdir(parents=True)
    (work / "local").mkdir(parents=True)
    for name in ("a.svs", "a.geojson", "sub/b.svs"):
        (cohort / name).write_bytes(b"x")
    (work / "local" / "c.svs").write_bytes(b"x")
    rows = (
        "slide\tpath\tlabels\tmask:TUM\n"
        "a\ta.svs\ta.geojson\t\n"
        "b\t./sub/../sub/b.svs\t\tsub/b.svs\n"
        f"c\t{work / 'local' / 'c.svs'}\t\t\n"
    )
    sheet = _sheet(cohort, rows)
    monkeypatch.chdir(work)
    seen = []
    for slides in (str(sheet), "../cohort/sheet.tsv", "../work/../cohort/sheet.tsv"):
        cfg = validate_config({"results": "res", "slides": slides, "labels": {"masks": {}}})
        df = load_sheet(cfg)
        seen.append(df[["path", "labels"]].to_dict() | {"masks": dict(df["masks"])})
    assert seen[0] == seen[1] == seen[2]
    assert seen[0]["path"] == {
        "a": str(cohort / "a.svs"), "b": str(cohort / "sub" / "b.svs"), "c": "local/c.svs"
    }  # fmt: skip
    assert seen[0]["labels"]["a"] == str(cohort / "a.geojson")
    assert seen[0]["masks"]["b"] == {"TUM": str(cohort / "sub" / "b.svs")}
    folder = [
        load_sheet(validate_config({"results": "res", "slides": s}))["path"].to_dict()
        for s in (str(cohort / "sub"), "../cohort/sub")
    ]
    assert folder[0] == folder[1] == {"b": str(cohort / "sub" / "b.svs")}


def test_sheet_cells_that_would_split_a_patient_or_a_slide(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stray space made `p1 ` a patient apart from `p1` (their slides in two folds); groups
    that differ only in case are warned about; one file under two ids is refused (trained on
    in one fold, tested on in another); files that are not there are named together, before
    Snakemake would stop on the first with its own error."""
    for name in ("a.svs", "b.svs", "c.svs"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("WARNING", logger="dsf.sheet"):
        df = read_sheet(_sheet(tmp_path, "slide\tpath\tgroup\na\ta.svs \tp1\nb\tb.svs\t p1 \n"
                                         "c\tc.svs\tP1\n"))  # fmt: skip
    assert list(df["group"]) == ["p1", "p1", "P1"] and df.loc["a", "path"].endswith("a.svs")
    assert "groups 'P1' and 'p1' differ only in case" in caplog.text
    (tmp_path / "link.svs").symlink_to(tmp_path / "a.svs")
    for second in ("a.svs", "./a.svs", "link.svs"):
        with pytest.raises(ConfigError, match=r"slides 'a' and 'x' are one file .*keep one row"):
            read_sheet(_sheet(tmp_path, f"slide\tpath\na\ta.svs\nx\t{second}\n"))
    sheet = _sheet(
        tmp_path,
        "slide\tpath\tlabels\tmask:TUM\na\ta.svs\tgone.geojson\t\nb\tnothere.svs\t\t\n"
        "c\tc.svs\t\tmask.tif\n",
    )
    cfg = validate_config({"results": str(tmp_path / "r"), "slides": str(sheet)})
    rows = load_sheet(cfg).to_dict("records")  # the workflow checks them once, at its start
    with pytest.raises(ConfigError, match="3 file.s. it names are not there") as err:
        check_files(rows, str(sheet))
    said = str(err.value)
    assert "slide 'a' `labels` " in said and said.count("gone.geojson") == 1
    assert "slide 'b' `path` " in said and "slide 'c' `mask:TUM` " in said


@pytest.mark.parametrize("preset", ["bcss.yaml", "paip.yaml"])
def test_presets_validate_and_carry_the_paper_geometry(preset: str) -> None:
    cfg = load_config(REPO / "config" / "presets" / preset)
    p = cfg["patches"]
    assert (p["scale"], p["block"], p["stride"]) == (4, 256, 512)
    assert p["target_mpp"] == (0.25 if preset == "bcss.yaml" else 0.5)
    assert p["min_label_frac"] == 0.1


def test_bcss_code_mapping() -> None:
    import numpy as np

    from dsf.annotations import _code_lut

    lut = _code_lut(load_config(REPO / "config" / "presets" / "bcss.yaml")["labels"])
    codes = {0: 0, 1: 1, 19: 1, 20: 1, 2: 2, 3: 3, 10: 3, 11: 3, 14: 3, 4: 4, 5: 5, 7: 5, 21: 5}
    assert {c: int(lut[c]) for c in codes} == codes
    assert np.all(lut[22:] == 5)


@pytest.mark.parametrize(("preset", "epochs"), [("bcss.yaml", 500), ("paip.yaml", 300)])
def test_presets_carry_the_paper_pretraining(preset: str, epochs: int) -> None:
    p = load_config(REPO / "config" / "presets" / preset)["pretrain"]
    assert (p["epochs"], p["batch_size"], p["out_size"], p["mask_ratio"]) == (epochs, 32, 224, 0.5)


def test_a_full_disk_is_one_clear_line_and_a_bug_keeps_its_traceback(
    caplog,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """A stage stopped by its machine (no space, a folder it may not write) exits 2 with the
    file and the fix in one line; any other OSError is not hidden."""
    import errno
    import logging

    from dsf.runner import run

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/results/x.zarr")

    with caplog.at_level(logging.INFO, logger="dsf"):
        assert run(full) == 2
    assert "cannot write or read /data/results/x.zarr: No space left on device" in caplog.text

    # a failed write() names no file: the message names the job's output folders and the
    # temporary folder, each with its free space
    out = tmp_path / "results" / "patches" / "a.zarr"
    monkeypatch.setattr("sys.argv", ["dsf", "patches", "--slide", "a.svs", "--out", str(out)])

    def full_write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsf"):
        assert run(full_write) == 2
    line = caplog.records[-1].getMessage()
    assert f"No space left on device (free: {out.parent} " in line and "a.svs" not in line, line
    assert "TMPDIR" in line

    def bug() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError, match="Bad file descriptor"):
        run(bug)
    assert run(lambda: None) == 0


def test_stage_options_are_only_those_the_stage_reads() -> None:
    """A setting only the workflow reads is no option of the stage (`dsf infer
    --probabilities` would write nothing without `--out-probs`); the stage's own settings are,
    with the schema's defaults."""
    from dsf import finetune, infer, polygons, pretrain

    for module, absent, present in (
        (infer, ["--probabilities", "--inits", "--fraction", "--unlabelled-fold", "--gpus"],
         ["--overlap", "--batch-size", "--device"]),
        # pretraining starts itself under torchrun for --gpus above 1 (`dsf pretrain --gpus 4`)
        (pretrain, ["--methods", "--scope"], ["--method", "--workers", "--epochs", "--gpus"]),
        (finetune, ["--inits", "--fractions", "--gpus"], ["--init", "--fraction", "--jitter"]),
        (polygons, ["--enabled"], ["--min-um2", "--tolerance"]),
    ):  # fmt: skip
        text = module._parser().format_help()
        flags = set(re.findall(r"(--[a-z0-9-]+)", text))
        assert not flags & set(absent), (module.__name__, flags & set(absent))
        assert set(present) <= flags, (module.__name__, set(present) - flags)


def test_one_number_is_one_command_whatever_its_spelling() -> None:
    """`target_mpp: 2` for the demo's 2.0 reran the whole project (Snakemake compares the
    command's text): numbers are written as the schema default writes them, integers as
    integers; YAML's text `1e-3` (YAML 1.1 wants a dot) is a number."""
    from dsf.config import coerce_strings, load_schema

    assert cli_args("patches", {"target_mpp": 2}) == cli_args("patches", {"target_mpp": 2.0})
    assert cli_args("patches", {"target_mpp": 2}) == "--target-mpp 2.0"
    assert cli_args("patches", {"block": 256.0}) == "--block 256"
    assert cli_args("polygons", {"min_um2": 500.0}) == "--min-um2 500"  # default 500
    assert cli_args("pretrain", {"crop_scale": [1, 1]}) == "--crop-scale 1.0 1.0"
    config = yaml.safe_load("finetune:\n  lr: 1e-3\n")
    coerce_strings(load_schema(), config)
    assert config["finetune"]["lr"] == 0.001


def test_evaluate_modes_offer_only_the_settings_they_read() -> None:
    """`dsf evaluate tables -h` offered --device and --band-rows, which only other modes
    read: each mode offers its own evaluate settings and refuses the others."""
    from dsf import evaluate

    p = evaluate._parser()
    modes = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    expect = {
        "tiles": {"--batch-size", "--device", "--amp"},
        "slide": {"--band-rows", "--panel-size"},
        "tables": {"--panel-slides"},
        "cohort": {"--panel-slides"},
    }
    every = set().union(*expect.values()) | {"--gpus"}
    for mode, own in expect.items():
        flags = set(re.findall(r"(--[a-z0-9-]+)", modes[mode].format_help()))
        assert flags & every == own, (mode, flags & every)
    with pytest.raises(SystemExit):
        modes["tables"].parse_args(["--device", "cuda"])


def test_label_name_keys_are_text_and_never_ambiguous() -> None:
    """YAML reads `3:` as a number: the keys of labels.names and class_map become text (the
    start-up check had crashed on them, the jobs not); keys that read alike for other classes,
    a key that is another class's name, a boolean key and class names an option parser would
    misread are refused by key."""
    from dsf.config import coerce_strings, load_schema
    from dsf.label_settings import check_label_settings

    config = yaml.safe_load("labels:\n  classes: [ignore, G3, G4]\n  names: {3: 1, 4: 2}\n")
    coerce_strings(load_schema(), config)
    labels = validate_config(config)["labels"]
    assert labels["names"] == {"3": 1, "4": 2}
    check_label_settings(labels)
    mixed = yaml.safe_load("labels:\n  classes: [ignore, A]\n  class_map: {0: 0, '19': 1}\n")
    coerce_strings(load_schema(), mixed)
    assert cli_args("labels", validate_config(mixed)["labels"]).count("class-map") == 1
    with pytest.raises(ConfigError, match="boolean"):
        coerce_strings(load_schema(), yaml.safe_load("labels:\n  names: {no: 1}\n"))
    base = {"classes": ["ignore", "TUM", "STR"]}
    for bad, said in (
        ({"names": {"tumor": 1, "Tumor": 2}}, "'tumor' and 'Tumor' read as one name"),
        ({"names": {"tum": 2}}, "'tum' is the class name of index 1"),
        ({"classes": ["ignore", "-ve", "+ve"]}, "'-ve' cannot be a class name"),
        ({"classes": ["ignore", "TUM "]}, "'TUM ' cannot be a class name"),
    ):
        settings = validate_config({"labels": base | bad})["labels"]
        with pytest.raises(ConfigError, match=said):
            check_label_settings(settings)


def test_older_setting_names_are_read_but_not_offered() -> None:
    """`labels.masks_base` and `labels.geojson_names` (older names) still parse as options,
    for old commands, but `--help` offers only the current names."""
    import argparse

    from dsf.config import add_section_arguments, section_from_args

    p = argparse.ArgumentParser()
    add_section_arguments(p, "labels", skip=("masks",))
    shown = p.format_help()
    assert "--base" in shown and "--names" in shown
    assert "--masks-base" not in shown and "--geojson-names" not in shown
    args = p.parse_args(["--masks-base", "STR", "--classes", "ignore", "TUM", "STR"])
    assert section_from_args(args, "labels")["masks_base"] == "STR"


def test_a_bad_option_value_names_the_option_typed() -> None:
    """By hand a setting is an option: its error names the config key and the flag."""
    import argparse

    from dsf.config import add_section_arguments, section_from_args

    p = argparse.ArgumentParser()
    add_section_arguments(p, "infer")
    with pytest.raises(ConfigError, match=r"infer\.overlap: .*0\.75 \(option --overlap\)$"):
        section_from_args(p.parse_args(["--overlap", "2"]), "infer")


def test_a_results_folder_that_cannot_be_written_is_named_with_its_key(tmp_path: Path) -> None:
    """A place the run cannot write to is said before any job, naming the key (the first job
    had failed in Snakemake's words); a writable one keeps no trace of the check."""
    from dsf.errors import ConfigError
    from dsf.runner import check_writable

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"config key `results`: cannot write to .*a-file/out"):
        check_writable(blocker / "out", "results")
    check_writable(tmp_path / "new" / "results", "results")  # made by the jobs, not here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_value_of_the_wrong_form_is_told_in_words(tmp_path: Path) -> None:
    """A slide id, model set name or mask pattern of the wrong form is said in words, not as
    the schema's regular expression; an annotation file given as `slides` is named so (its
    whole JSON had been shown as the sheet's columns)."""
    from dsf.errors import ConfigError
    from dsf.sheet import read_sheet, validate_rows

    with pytest.raises(ConfigError) as err:
        validate_config({"labels": {"masks": {"TUM": "x.tif"}}})
    assert "{slide} standing for the slide id" in str(err.value) and "\\{" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate_config({"apply": {"models": {"my set": ["a.pt"]}}})
    assert "'my set' is not of the form wanted: letters, digits" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate_rows([{"slide": "x y", "path": "a.svs"}], "s.tsv", tmp_path)
    assert "(no spaces)" in str(err.value) and "^[A-Za-z0-9]" not in str(err.value)
    annotation = tmp_path / "a.geojson"
    annotation.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(ConfigError, match=r"a\.geojson is an annotation file, not a sheet"):
        read_sheet(annotation)


def test_an_annotation_and_a_normalisation_take_either_stages_option_name() -> None:
    """`dsf labels --annotation` and `dsf tile-labels`/`evaluate slide --labels` name one
    thing, as do `dsf pretrain --mean/--std` and `dsf finetune --norm-mean/--norm-std`: each
    stage reads both names."""
    from dsf import evaluate, finetune, labels, tile_labels

    base = ["--slide", "s.tif", "--out", "o.tiff"]
    for flag in ("--annotation", "--labels"):
        assert (
            labels._parser().parse_args([*base, flag, "a.geojson"]).annotation.name == "a.geojson"
        )
        got = tile_labels._parser().parse_args(["--store", "s.zarr", flag, "a.xml", "--out", "o"])
        assert got.labels.name == "a.xml"
        slide = ["slide", "--map", "m.tiff", "--map-json", "m.json", "--slide", "s.tif"]
        got = evaluate._parser().parse_args([*slide, flag, "b.geojson", "--out", "o.tsv"])
        assert got.labels.name == "b.geojson"
    need = ["--stores", "a.zarr", "--label-stores", "a.labels.zarr", "--folds", "f.tsv"]
    need += ["--fold", "0", "--out-dir", "ft"]
    for mean, std in (("--mean", "--std"), ("--norm-mean", "--norm-std")):
        args = finetune._parser().parse_args([*need, mean, "1", "2", "3", std, "4", "5", "6"])
        assert args.norm_mean == [1, 2, 3] and args.norm_std == [4, 5, 6]
