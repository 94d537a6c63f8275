"""`dsf areas`: each slide's predicted area per class, from the class maps of `dsf infer`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from dsf.areas import areas_table, main
from dsf.class_tiff import write_tiff

CLASSES = ["ignore", "TUM", "STR", "LYM"]


def _map(folder: Path, slide: str, cls: np.ndarray, mpp: float, counts: bool = True,
         classes: list[str] = CLASSES) -> Path:  # fmt: skip
    """A class map as `dsf infer` writes it: pyramidal TIFF and its JSON."""
    path = folder / f"{slide}.tiff"
    folder.mkdir(parents=True, exist_ok=True)
    write_tiff(path, [cls], mpp, len(classes), 64, 1, classes=classes)
    h, w = cls.shape
    meta = {"slide": slide, "init": "dsf", "fraction": 1.0, "mpp": mpp, "width": w,
            "height": h, "classes": classes, "folds": [0], "routing": "out_of_fold"}  # fmt: skip
    if counts:
        meta["class_pixels"] = np.bincount(cls.ravel(), minlength=len(classes)).tolist()
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_areas_in_mm2_and_shares_of_the_mapped_area(tmp_path: Path) -> None:
    """At 2 um/px a pixel is 4e-6 mm²; shares are of the pixels that got a class (0, the
    background, is no class); a map with nothing mapped has empty shares."""
    cls = np.zeros((300, 500), np.uint8)
    cls[:100, :200] = 1  # 20,000 px TUM
    cls[100:150, :] = 2  # 25,000 px STR
    a = _map(tmp_path, "a", cls, 2.0)
    b = _map(tmp_path, "b", np.zeros((64, 64), np.uint8), 2.0)
    out = tmp_path / "areas.tsv"
    assert main(["--maps", str(a), str(b), "--out", str(out)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns) == [
        "slide", "init", "mpp", "mapped_mm2", "TUM_mm2", "STR_mm2", "LYM_mm2",
        "TUM_pct", "STR_pct", "LYM_pct",
    ]  # fmt: skip
    row = table.iloc[0]
    assert row["slide"] == "a" and row["mpp"] == 2.0
    assert row["TUM_mm2"] == pytest.approx(20_000 * 4e-6)
    assert row["STR_mm2"] == pytest.approx(25_000 * 4e-6) and row["LYM_mm2"] == 0
    assert row["mapped_mm2"] == pytest.approx(45_000 * 4e-6)
    assert row["TUM_pct"] == pytest.approx(100 * 20 / 45) and row["LYM_pct"] == 0
    empty = table.iloc[1]
    assert empty["mapped_mm2"] == 0 and np.isnan(empty["TUM_pct"])
    assert list(table["init"]) == ["dsf", "dsf"]  # the models' init
    # a prediction run's rows carry its model set's name, as its score tables do
    assert main(["--maps", str(a), "--out", str(out), "--method", "site_b"]) == 0
    assert list(pd.read_csv(out, sep="\t")["init"]) == ["site_b"]


def test_a_map_without_counts_is_counted_and_bad_counts_are_refused(tmp_path: Path) -> None:
    """A map of an older dsf (no class_pixels in its JSON) is counted band by band, to the
    same numbers; counts that do not fit the map, or a class index beyond the classes, name
    the map and the fix."""
    rng = np.random.default_rng(0)
    cls = rng.integers(0, 4, (333, 517), dtype=np.uint8)
    new = areas_table([_map(tmp_path / "new", "s", cls, 0.5)])
    old = areas_table([_map(tmp_path / "old", "s", cls, 0.5, counts=False)])
    pd.testing.assert_frame_equal(new, old)
    bad = _map(tmp_path / "bad", "s", cls, 0.5)
    meta = json.loads(bad.with_suffix(".json").read_text())
    meta["class_pixels"][1] += 1
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match=r"class_pixels .* rerun infer"):
        areas_table([bad])
    wild = _map(tmp_path / "wild", "s", np.full((8, 8), 7, np.uint8), 0.5, counts=False)
    with pytest.raises(Exception, match=r"class index 7 of 4 classes.*rerun infer"):
        areas_table([wild])


def test_maps_of_other_classes_are_refused_and_a_failed_run_leaves_no_table(
    tmp_path: Path,
) -> None:
    a = _map(tmp_path / "x", "a", np.ones((64, 64), np.uint8), 1.0)
    b = _map(tmp_path / "y", "b", np.ones((64, 64), np.uint8), 1.0, classes=["bg", "tumour"])
    out = tmp_path / "areas.tsv"
    out.write_text("an earlier table\n")
    assert main(["--maps", str(a), str(b), "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["--maps", str(a), "--out", str(a)]) == 2  # never over its input
    assert tifffile.imread(a).shape == (64, 64)


def test_a_cohorts_maps_reach_dsf_areas_through_an_arguments_file(tmp_path: Path) -> None:
    """The areas rule starts `dsf areas` with every map's path, which for some 16,000 slides
    is more than a process can be started with (2 MiB; the job had failed with 'Argument list
    too long'): past 100 kB the arguments go in a file, read back the same."""
    import subprocess
    import sys

    from dsf.cli import ARGS_FILE, spill_args

    cls = np.ones((40, 60), np.uint8)
    maps = [_map(tmp_path / "maps", f"s{i}", cls, 2.0) for i in range(40)]
    # named through long paths (./././...), 4 kB each, as a cohort's thousands of paths add up
    deep = "/".join(["."] * 2000)
    argv = ["--maps", *(f"{tmp_path}/{deep}/maps/{m.name}" for m in maps)]
    argv += ["--out", str(tmp_path / "areas.tsv")]
    assert spill_args(argv[:4], tmp_path) == argv[:4]  # short: as they are
    spilled = spill_args(argv, tmp_path)
    assert spilled == [ARGS_FILE, str(tmp_path / "args.json")]
    assert json.loads(Path(spilled[1]).read_text()) == argv
    done = subprocess.run([sys.executable, "-m", "dsf", "areas", *spilled], capture_output=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "areas.tsv", sep="\t")
    assert list(table["slide"]) == [f"s{i}" for i in range(40)]


def test_the_workflows_shell_function_starts_dsf_with_any_number_of_arguments(
    tmp_path: Path,
) -> None:
    """A shell rule's `dsf <stage> {input.stores}` of a cohort of some 24,000 slides passed
    the 2 MiB a process can be started with ('Argument list too long'): the `dsf` shell
    function every shell rule's command is prefixed with (`SHELL_PREFIX`) hands arguments past
    100 kB over in a file, and short ones as they are. Its failures keep their exit status."""
    import os
    import subprocess
    import sys

    from dsf.cli import SHELL_PREFIX

    one = _map(tmp_path / "maps", "s", np.ones((40, 60), np.uint8), 2.0)
    deep = f"{tmp_path}/{'/'.join(['.'] * 2000)}/maps/{one.name}"  # 4 kB naming one map
    maps = " ".join([deep] * 600)  # 2.4 MB: more than the kernel starts a process with
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["TMPDIR"] = str(tmp_path)

    def bash(command: str) -> subprocess.CompletedProcess:
        """`command` run as Snakemake runs a long one: a script file for bash."""
        script = tmp_path / "script.sh"
        script.write_text(command + "\n")
        return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)

    out = tmp_path / "areas.tsv"
    plain = bash(f"command dsf areas --maps {maps} --out {out}")  # without the function
    assert plain.returncode != 0 and "Argument list too long" in plain.stderr
    done = bash(f"{SHELL_PREFIX}dsf areas --maps {maps} --out {out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(pd.read_csv(out, sep="\t")) == 600
    assert not list(tmp_path.glob("dsf-args.*"))  # its file is removed
    short = bash(f"{SHELL_PREFIX}dsf areas --maps {one} --out {out} --method m")
    assert short.returncode == 0 and list(pd.read_csv(out, sep="\t")["init"]) == ["m"]
    failed = bash(f"{SHELL_PREFIX}dsf areas --maps {maps} {tmp_path}/gone.tiff --out {out}")
    assert failed.returncode == 2 and "gone.tiff" in failed.stderr
    assert not list(tmp_path.glob("dsf-args.*"))


def test_an_arguments_file_keeps_each_argument_byte_for_byte(tmp_path: Path) -> None:
    """The shell function writes arguments as bytes: a path that is no UTF-8 (a Latin-1
    name) and a carriage return had crashed or changed once read from the file."""
    import os

    from dsf.cli import ARGS_FILE, args_from_file

    args_file = tmp_path / "args"
    args_file.write_bytes(b"--maps\0/d/\xe9x.tiff\0a\r\nb\0")
    assert args_from_file([ARGS_FILE, str(args_file)]) == [
        "--maps", os.fsdecode(b"/d/\xe9x.tiff"), "a\r\nb",
    ]  # fmt: skip
    args_file.write_text('["--maps", "m.tiff"]')  # a JSON list (spill_args)
    assert args_from_file([ARGS_FILE, str(args_file)]) == ["--maps", "m.tiff"]
