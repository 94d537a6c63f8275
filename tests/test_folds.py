"""Folds: grouped, seeded, balanced, every slide in exactly one validation fold."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dsf.errors import ConfigError
from dsf.folds import (
    assign_folds,
    finetune_gaps,
    gap_advice,
    groups_needed,
    main,
    read_folds,
    split_key,
)


def _sheet(groups: list[str], folds: list[int | None] | None = None) -> pd.DataFrame:
    n = len(groups)
    return pd.DataFrame(
        {"slide": [f"s{i}" for i in range(n)], "group": groups, "fold": folds or [None] * n},
        dtype=object,
    )


def test_groups_never_span_folds_and_every_slide_has_one_fold() -> None:
    groups = [f"p{i // 3}" for i in range(30)]  # 10 patients, 3 slides each
    t = assign_folds(_sheet(groups), k=5, seed=1)
    assert list(t["slide"]) == [f"s{i}" for i in range(30)]
    assert t.groupby("group")["fold"].nunique().max() == 1
    assert sorted(t["fold"].unique()) == [0, 1, 2, 3, 4]
    assert t["fold"].value_counts().max() - t["fold"].value_counts().min() <= 3


def test_seeded_and_seed_matters() -> None:
    sheet = _sheet([f"p{i}" for i in range(20)])
    a, b = assign_folds(sheet, 4, 7), assign_folds(sheet, 4, 7)
    assert a.equals(b)
    assert not a["fold"].equals(assign_folds(sheet, 4, 8)["fold"])


def test_the_split_the_workflow_compares_ignores_the_sheets_row_order() -> None:
    """The split does not depend on the order of the sheet's rows, and neither does the
    string the folds rule compares (it had listed the slides in sheet order, so sorting a
    sheet reran the folds and every fold's jobs); another split is another string."""
    sheet = _sheet([f"p{i % 7}" for i in range(20)])
    sheet["slide"] = [f"s{(i * 7) % 20:02d}" for i in range(20)]
    shuffled = sheet.sample(frac=1.0, random_state=3)
    a, b = assign_folds(sheet, 3, 0), assign_folds(shuffled, 3, 0)
    assert dict(zip(a["slide"], a["fold"], strict=True)) == dict(
        zip(b["slide"], b["fold"], strict=True)
    )
    assert list(a["slide"]) != list(b["slide"])
    assert split_key(a) == split_key(b)
    assert split_key(a) != split_key(assign_folds(sheet, 3, 1))
    assert split_key(a).index('"s00"') < split_key(a).index('"s01"')


def test_annotated_slides_are_spread_evenly_over_the_folds() -> None:
    """Few annotated slides among many unlabelled ones: each fold gets its share (for every
    seed), and the folds stay balanced in size."""
    sheet = _sheet([f"p{i}" for i in range(20)])
    sheet["labels"] = [f"s{i}.geojson" if i % 5 == 0 else None for i in range(20)]
    for seed in range(10):
        t = assign_folds(sheet, 4, seed)
        annotated = t["fold"][sheet["labels"].notna()]
        assert sorted(annotated.value_counts().tolist()) == [1, 1, 1, 1], seed
        assert t["fold"].value_counts().tolist() == [5, 5, 5, 5]
    # the JSON the workflow hands `dsf folds` says it as `labelled`
    flags = sheet.assign(labelled=sheet["labels"].notna()).drop(columns="labels")
    assert assign_folds(flags, 4, 3).equals(assign_folds(sheet, 4, 3))


def test_groups_go_largest_first_so_the_folds_balance() -> None:
    """Unlabelled patients of 4, 4, 3, 3, 2, 2, 1, 1 slides over 2 folds: largest first, each
    to the smaller fold, gives 10 and 10 for any seed (the seeded order alone would not)."""
    sizes = [4, 4, 3, 3, 2, 2, 1, 1]
    sheet = _sheet([f"p{g}" for g, n in enumerate(sizes) for _ in range(n)])
    for seed in range(20):
        assert assign_folds(sheet, 2, seed)["fold"].value_counts().tolist() == [10, 10], seed


def test_annotated_slides_spread_first_whatever_their_patients_size() -> None:
    """A patient of 5 slides (1 annotated) and 4 single annotated slides over 2 folds: the
    annotated slides split 2 and 3 (by annotated count first, size only breaking ties), not
    1 and 4 as filling the smaller fold would."""
    sheet = _sheet(["big"] * 5 + ["a", "b", "c", "d"])
    sheet["labels"] = ["x.geojson", None, None, None, None, "a", "b", "c", "d"]
    for seed in range(5):
        t = assign_folds(sheet, 2, seed)
        annotated = t["fold"][sheet["labels"].notna()].value_counts()
        assert sorted(annotated.tolist()) == [2, 3], seed


def test_folds_without_an_annotated_slide_are_named(caplog: pytest.LogCaptureFixture) -> None:
    sheet = _sheet(["a", "b", "c", "d"])
    sheet["labels"] = ["a.tiff", "b.tiff", None, None]
    t = assign_folds(sheet, 3, 0)
    bare = sorted(set(range(3)) - set(t["fold"][:2]))
    assert len(bare) == 1 and f"folds {bare} have no annotated validation slide" in caplog.text
    caplog.clear()
    assign_folds(sheet, 2, 0)
    assert "annotated" not in caplog.text


def test_folds_that_cannot_fine_tune_are_found() -> None:
    """Fine-tuning a fold needs annotated slides of 2 groups outside it (train + select)."""
    folds = pd.DataFrame(
        {"slide": ["a", "b", "c", "d"], "group": ["p", "p", "q", "r"], "fold": [0, 0, 1, 2]}
    )
    assert finetune_gaps(folds, {"a", "b", "c", "d"}) == []
    assert finetune_gaps(folds, {"a", "c", "d"}) == []  # one slide of p is enough
    # without d: fold 0 has only q outside it, fold 1 only p; fold 2 has p and q
    assert finetune_gaps(folds, {"a", "b", "c"}) == [0, 1]
    assert finetune_gaps(folds, {"c"}) == [0, 1, 2]
    # evenly spread, 2 folds need 4 groups and 3 or more folds 3: fewer folds never helps
    assert [groups_needed(k) for k in (2, 3, 5, 10)] == [4, 3, 3, 3]
    assert "at least 4 patients" in gap_advice(2) and "lower" not in gap_advice(2)
    # without model selection (finetune.held_out 0) one group outside a fold is enough
    assert finetune_gaps(folds, {"a", "b", "c"}, need=1) == []
    assert finetune_gaps(folds, {"c"}, need=1) == [1]
    assert [groups_needed(k, 1) for k in (2, 3, 5)] == [2, 2, 2]
    assert "leaves 1 annotated patient out" in gap_advice(5, 1)


def test_fold_column_is_honoured() -> None:
    sheet = _sheet(["a", "a", "b", "c", "d", "e"], [2, 2, None, None, 0, None])
    t = assign_folds(sheet, 3, 0)
    assert list(t["fold"][:2]) == [2, 2] and t["fold"][4] == 0


def test_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="group 'a' has slides in folds"):
        assign_folds(_sheet(["a", "a", "b"], [0, 1, None]), 2, 0)
    with pytest.raises(ConfigError, match=r"folds.k is 5 but the sheet has only 2 group\(s\)"):
        assign_folds(_sheet(["a", "b"]), 5, 0)
    with pytest.raises(ConfigError, match="folds.k is 2"):
        assign_folds(_sheet(["a", "b", "c"], [3, None, None]), 2, 0)


def test_cli_writes_folds_tsv(tmp_path) -> None:  # noqa: ANN001
    sheet = _sheet(["a", "b", "c", "d"]).to_json(orient="records")
    assert main(["--sheet-json", sheet, "--out", str(tmp_path / "f.tsv"), "--k", "2"]) == 0
    t = read_folds(tmp_path / "f.tsv")
    assert sorted(t["fold"].value_counts().tolist()) == [2, 2]
    assert main(["--sheet-json", sheet, "--out", str(tmp_path / "g.tsv"), "--k", "9"]) == 2
    assert not (tmp_path / "g.tsv").exists()


def test_numeric_and_missing_groups_are_one_string_key_each() -> None:
    """Records written by hand (`dsf folds --sheet-json`): group 1 is the group "1" (its fixed
    fold holds), a null group is the slide's own; both had raised a KeyError."""
    records = pd.DataFrame(
        [
            {"slide": "a", "group": 1, "fold": 0},
            {"slide": "b", "group": 1, "fold": None},
            {"slide": "c", "group": None, "fold": None},
            {"slide": "d", "group": 2, "fold": None},
        ]
    )
    t = assign_folds(records, k=2, seed=0)
    assert list(t["group"]) == ["1", "1", "c", "2"]
    assert t.loc[t["slide"] == "b", "fold"].item() == 0  # with its patient's fixed fold


def test_tcga_slides_without_a_group_are_grouped_by_patient(tmp_path) -> None:  # noqa: ANN001
    """Records without groups (`dsf folds --sheet-json`) group slides named by their TCGA
    barcode by patient, as a slide sheet does: a patient's three slides had gone to three
    folds."""
    slides = ["TCGA-A1-A0SK-DX1", "tcga-a1-a0sk-dx2", "TCGA-A1-A0SK-01Z-00-DX3", "x", "y", "z"]
    sheet = json.dumps([{"slide": s} for s in slides])
    assert main(["--sheet-json", sheet, "--out", str(tmp_path / "f.tsv"), "--k", "3"]) == 0
    t = read_folds(tmp_path / "f.tsv")
    patient = t[t["slide"].str.upper().str.startswith("TCGA-A1-A0SK")]
    assert len(patient) == 3 and set(patient["group"]) == {"TCGA-A1-A0SK"}
    assert patient["fold"].nunique() == 1
    assert list(t.loc[t["slide"] == "x", "group"]) == ["x"]


def test_folds_table_keeps_na_like_slide_ids_and_refuses_a_broken_one(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "folds.tsv"
    path.write_text("slide\tgroup\tfold\nNA\tNA\t1\nnull\tnull\t0\nnan\tp\t0\n")
    assert list(read_folds(path)["slide"]) == ["NA", "null", "nan"]
    for body, said in (
        ("a\ta\t1\na\ta\t0\n", "lists slides \\['a'\\] twice"),
        ("a\ta\t-1\n", "negative fold"),
        # a patient in two folds (a table edited by hand): its validation slide's patient trains
        ("p1\tP\t0\np2\tP\t1\nq\tQ\t1\n", r"group 'P' \(one patient or site\) in folds \[0, 1\]"),
    ):
        path.write_text("slide\tgroup\tfold\n" + body)
        with pytest.raises(ConfigError, match=said):
            read_folds(path)


def test_slides_the_earlier_folds_placed_and_the_run_moves_are_named(tmp_path) -> None:  # noqa: ANN001
    """Adding slides rebalances the folds: a run that moves slides an earlier folds.tsv placed
    names them (annotated first) and the way to keep the earlier folds, by a folder's
    `dsf sheet --folds` or a sheet's `fold` column; nothing when nothing moved."""
    from dsf.folds import moved_note, write_folds

    sheet = _sheet([f"p{i}" for i in range(8)]).assign(labelled=[True] * 4 + [False] * 4)
    earlier = assign_folds(sheet, 2, 0)
    path = tmp_path / "folds.tsv"
    assert moved_note(path, earlier, {"s0"}, tmp_path) is None  # no earlier table
    write_folds(earlier, path)
    assert moved_note(path, earlier, {"s0"}, tmp_path) is None  # the same split
    now = earlier.copy()
    now.loc[now["slide"].isin(["s7", "s1"]), "fold"] = 1 - now["fold"]
    now = pd.concat([now, pd.DataFrame({"slide": ["s8"], "group": ["p8"], "fold": [0]})])
    note = moved_note(path, now, {"s0", "s1", "s2", "s3"}, tmp_path)
    assert note is not None and f"move 2 slide(s) that {path} placed (1 annotated): s1 " in note
    assert note.index("s1 fold") < note.index("s7 fold")  # annotated first; s8 is new
    assert "s8" not in note and f"dsf sheet {tmp_path} --folds {path} --out" in note
    sheet_note = moved_note(path, now, set(), tmp_path / "slides.tsv")
    assert sheet_note is not None and "copy the `fold` column" in sheet_note
    # the synthetic slides' way only where there are synthetic slides
    assert "synth.slides" in sheet_note
    plain = moved_note(path, now, set(), tmp_path, k=2, synthetic=False)
    assert plain is not None and "synth.slides" not in plain and "no longer" not in plain
    # a removed slide is named; another folds.k cannot keep the folds (the advice had failed)
    fewer = now[now["slide"] != "s5"].assign(fold=lambda t: t["fold"].where(t["slide"] != "s3", 2))
    three = moved_note(path, fewer, set(), tmp_path, k=3, synthetic=False)
    assert three is not None and "folds.k is 3, the earlier folds were 2" in three
    assert "set it back to 2" in three and "dsf sheet" not in three
    assert "no longer in the run: s5" in three
    path.write_text("not a folds table\n")  # damaged: the folds job rewrites it; no advice
    assert moved_note(path, now, set(), tmp_path) is None


def test_cli_reads_a_slide_sheet_and_names_what_is_wrong(tmp_path) -> None:  # noqa: ANN001
    """By hand, `dsf folds --sheet-file` takes the sheet `dsf sheet` writes as well as JSON
    records (whose group and fold may be left out); a missing file or records of another
    shape are one line naming the option, not a traceback."""
    from dsf.folds import _parser, read_sheet_records

    slides = ["a", "b", "c"]
    for name in slides:
        (tmp_path / f"{name}.tif").write_bytes(b"II*\x00")  # the split reads no pixel
    (tmp_path / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text(
        "slide\tpath\tlabels\tgroup\n"
        + "".join(
            f"{s}\t{tmp_path / (s + '.tif')}\t{'a.geojson' if s == 'a' else ''}\tp{s}\n"
            for s in slides
        )
    )
    out = tmp_path / "f.tsv"
    assert main(["--sheet-file", str(sheet), "--out", str(out), "--k", "2"]) == 0
    t = read_folds(out)
    assert sorted(t["slide"]) == slides and set(t["group"]) == {"pa", "pb", "pc"}
    bare = json.dumps([{"slide": "a"}, {"slide": "b"}])
    assert main(["--sheet-json", bare, "--out", str(tmp_path / "g.tsv"), "--k", "2"]) == 0
    assert set(read_folds(tmp_path / "g.tsv")["group"]) == {"a", "b"}  # each its own group
    for given, said in (
        (["--sheet-file", str(tmp_path / "gone.json")], "--sheet-file .*gone.json not found"),
        (["--sheet-json", '{"slide": "a"}'], "--sheet-json: give a JSON list of records"),
        (["--sheet-json", '[{"group": "p"}]'], "every record needs a `slide` id"),
    ):
        with pytest.raises(ConfigError, match=said):
            read_sheet_records(_parser().parse_args([*given, "--out", "x.tsv"]))
        assert main([*given, "--out", str(tmp_path / "h.tsv")]) == 2


def test_a_synthetic_slide_can_keep_its_fold() -> None:
    """A synth.slides entry takes `fold`, as a sheet row does (the demo's synthetic slides had
    moved between folds when a slide was added, with no way to keep them)."""
    from dsf.config import validate
    from dsf.sheet import synthetic_rows

    config = validate(
        {"synth": {"slides": {"s1": {"seed": 1, "width": 64, "height": 64, "fold": 1},
                              "s2": {"seed": 2, "width": 64, "height": 64}}}}
    )  # fmt: skip
    rows = {r["slide"]: r for r in synthetic_rows(config)}
    assert rows["s1"]["fold"] == 1 and rows["s2"]["fold"] is None


def test_a_slide_without_a_group_named_like_a_patient_is_warned_about(tmp_path, caplog) -> None:  # noqa: ANN001
    """A slide with no group is its own group, named by its id: one called `P7` beside slides
    of patient `P7` joins that patient and its fold, which reading the sheet now says (before
    the missing groups are filled in)."""
    from dsf.config import validate
    from dsf.sheet import load_sheet

    sheet = tmp_path / "s.tsv"
    sheet.write_text("slide\tpath\tgroup\na\ta.svs\tP7\nb\tb.svs\tP7\nP7\tp.svs\t\nc\tc.svs\t\n")
    config = validate({"slides": str(sheet), "results": str(tmp_path / "out")})
    with caplog.at_level("WARNING", logger="dsf.sheet"):
        table = load_sheet(config)
    assert table.loc["P7", "group"] == "P7"  # the same fold as a and b
    assert f"slide sheet {sheet}: slides P7 have no group" in caplog.text
    assert "give them a group of their own" in caplog.text and "slides c " not in caplog.text
    caplog.clear()
    sheet.write_text("slide\tpath\tgroup\na\ta.svs\tP7\nP7\tp.svs\tP8\n")
    with caplog.at_level("WARNING", logger="dsf.sheet"):
        load_sheet(config)
    assert "have no group" not in caplog.text
