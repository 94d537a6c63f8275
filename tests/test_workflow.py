"""The Snakemake workflow: plan of the default config, a real tiny run, reruns, bad configs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
#: A QuPath GeoJSON of one polygon of the schema's first class (the run start parses it)
ANNOTATION = (
    '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": '
    '"Polygon", "coordinates": [[[10, 10], [90, 10], [90, 90], [10, 10]]]}, "properties": '
    '{"classification": {"name": "TUM"}}}]}'
)
BIN = str(Path(sys.executable).parent)
# The workflow tests cover the data stages; pretraining is tested in test_pretrain.py.
# (the target after an option: --configfile would take it for a config file)
UNTIL = ("--cores", "2", "data")


def smk(
    *args: str, cwd: Path = REPO, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run snakemake with this venv's `dsf` on PATH (and `env` added to the environment)."""
    env = os.environ | {"PATH": BIN + os.pathsep + os.environ.get("PATH", "")} | (env or {})
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake {args} failed:\n{done.stdout}\n{done.stderr}")
    return done


def job_counts(out: str) -> dict[str, int]:
    """Rule -> count from snakemake's 'Job stats' table (not the target rule data, which only
    gathers the data stages' outputs)."""
    table = out.split("Job stats:")[1].split("total")[0]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    return {rule: n for rule, n in counts.items() if rule != "data"}


def test_the_workflow_parses_without_importing_torch(tmp_path: Path) -> None:
    """Snakemake parses the Snakefile for every dry run, and on a cluster once more in every
    job: the parse-time checks (sheet, folds, label settings, HookNet's geometry, the
    pretraining command) import no torch, which took seconds of each parse."""
    done = smk(
        "-n", "--cores", "2", "--directory", str(REPO), "--config", f"results={tmp_path}",
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    imported = re.findall(r"^import time:.*\|\s+([\w.]+)$", done.stderr, re.M)
    assert "dsf.folds" in imported and "snakemake" in imported  # the profile is there
    assert not [m for m in imported if m.split(".")[0] in ("torch", "torchvision")]
    assert job_counts(done.stdout)["pretrain"] == 2


def test_a_split_that_moves_earlier_slides_is_warned_about(tmp_path: Path) -> None:
    """A run whose folds move slides the earlier folds.tsv placed (added slides rebalance the
    folds) says so at the start, naming the slide and how to keep the earlier folds."""
    # three of the four annotated slides in one of the two folds: the split, which spreads
    # them two and two, moves one
    rows = "".join(f"synth-0{i}\tpatient-{i}\t{int(i == 4)}\n" for i in (1, 2, 3, 4))
    (tmp_path / "folds.tsv").write_text("slide\tgroup\tfold\n" + rows)
    done = smk("-n", "--cores", "2", "--directory", str(REPO), "--config", f"results={tmp_path}")
    said = done.stdout + done.stderr
    moved = re.search(
        rf"move (\d) slide\(s\) that {tmp_path}/folds.tsv placed \((\d) annotated\)", said
    )
    assert moved and int(moved[1]) == int(moved[2]) >= 1, said
    assert "fold 0 -> 1" in said and "copy the `fold` column" in said
    # under another folds.k the earlier folds cannot be kept: the warning says so instead
    done = smk(
        "-n", "--cores", "2", "--directory", str(REPO), "--config", f"results={tmp_path}",
        "folds={k: 3}",
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert "folds.k is 3, the earlier folds were 2" in said and "set it back to 2" in said


def test_default_config_plans_every_stage(tmp_path: Path) -> None:
    out = smk(
        "-n", "-p", "--cores", "2", "--directory", str(REPO), "--config", f"results={tmp_path}"
    ).stdout
    counts = job_counts(out)
    assert counts["synth"] == 4 and counts["tissue"] == 6 and counts["patches"] == 6
    assert counts["folds"] == 1
    # pretrain.mean/std null: computed per fold from that fold's training slides, and read by
    # the fold's pretraining and fine-tuning
    assert counts["norm"] == 2
    read = []
    for k in (0, 1):
        cmd = next(ln for ln in out.splitlines() if f"norm/fold{k}.json --norm-tiles" in ln)
        assert f"--fold {k} " in cmd
        read.append(set(re.findall(r"patches/([^/ ]+)\.zarr", cmd)))
        uses = [ln for ln in out.splitlines() if f"--norm {tmp_path}/norm/fold{k}.json" in ln]
        assert sum("dsf pretrain " in ln for ln in uses) == 1
        assert sum("dsf finetune " in ln for ln in uses) == counts["finetune"] // 2
    # with two folds each slide is the other fold's training slide: the sets split the six
    assert not read[0] & read[1] and len(read[0] | read[1]) == 6


def test_local_profile_plans_the_default_workflow(tmp_path: Path) -> None:
    out = smk(
        "--profile",
        str(REPO / "profiles" / "local"),
        "-n",
        "--directory",
        str(REPO),
        "--config",
        f"results={tmp_path}",
    ).stdout
    assert job_counts(out)["pretrain"] == 2


def _group_jobs(out: str) -> list[tuple[str, list[str], set[str]]]:
    """(group, rules, wildcards) of each group job in a dry run's output."""
    jobs: list[tuple[str, list[str], set[str]]] = []
    for line in out.splitlines():
        if m := re.search(r"Group job (\w+) \(jobs", line):
            jobs.append((m[1], [], set()))
        elif not line.startswith(" ") and re.match(r"\S*rule \w+:", line):
            jobs.append(("", [], set()))  # a job of no group ends the group before it
        elif jobs and (m := re.match(r"^    rule (\w+):$", line)):
            jobs[-1][1].append(m[1])
        elif jobs and (m := re.match(r"^        wildcards: (.+)$", line)):
            jobs[-1][2].add(m[1])
    return [j for j in jobs if j[0]]


def test_the_slurm_profile_groups_a_slides_jobs(tmp_path: Path) -> None:
    """profiles/slurm submits a slide's chain of jobs as one group job (Snakemake ignores
    groups locally, so the plan shows them): `prepare` is one slide's synth, tissue and patches,
    `labels` its label mask and labels store, `map` one slide's map for one init and its
    polygons; scores stay jobs of their own (a failed
    job removes its whole group's outputs). Every rule the profile names exists, and the rules
    of a group ask for the same partition (SLURM cannot merge two)."""
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    profile = yaml.safe_load(text)
    assert "set-resources" not in profile  # every rule states its own mem_mb and runtime
    # the commented per-rule example, as a user uncomments it
    lines = text.splitlines()
    first = lines.index("# set-resources:")
    example = []
    for line in lines[first:]:
        if not line.startswith("#"):
            break
        example.append(line[2:])
    profile["set-resources"] = yaml.safe_load("\n".join(example))["set-resources"]
    assert profile["set-resources"]["polygons"] == profile["set-resources"]["infer"]
    groups = profile["groups"]
    rules = smk("--list-rules", "--directory", str(REPO), "--config", f"results={tmp_path}")
    named = {g.split("=")[0] for g in groups} | set(profile["set-resources"])
    assert named <= set(rules.stdout.split()), named - set(rules.stdout.split())
    members: dict[str, list[str]] = {}
    for g in groups:
        rule, group = g.split("=")
        members.setdefault(group, []).append(rule)
    for rule_names in members.values():
        for key in ("slurm_partition", "gpu_model", "slurm_account"):
            asked = {(profile["set-resources"].get(r) or {}).get(key) for r in rule_names}
            assert len(asked) == 1, (rule_names, key, asked)
    out = smk(
        "-n", "--cores", "2", "--directory", str(REPO), "--config", f"results={tmp_path}",
        "--groups", *groups,
    ).stdout  # fmt: skip
    jobs = _group_jobs(out)
    counts = job_counts(out)
    # a command-line --default-resources or --set-resources replaces the profile's blocks, so
    # every rule states its own memory and wall time
    asked = [r for r in re.findall(r"^    resources: (.*)$", out, re.M) if r != "tmpdir=/tmp"]
    assert asked and all("mem_mb=" in r and "runtime=" in r for r in asked), asked  # but `all`
    # pretraining asks SLURM for SIGUSR1 before its time limit, to checkpoint where it is
    assert sum("slurm_extra=--signal=USR1@300" in r for r in asked) == counts["pretrain"]
    prepare = [j for j in jobs if j[0] == "prepare"]
    maps = [j for j in jobs if j[0] == "map"]
    labels = [j for j in jobs if j[0] == "labels"]
    assert len(prepare) == counts["tissue"] == 6 and len(maps) == counts["infer"] == 6
    assert len(labels) == counts["tile_labels"] == 4
    assert len(prepare) + len(maps) + len(labels) == len(jobs)
    for _, ran, wildcards in labels:  # the demo's annotations need no label mask
        assert len(wildcards) == 1 and ran == ["tile_labels"], (ran, wildcards)
    for _, ran, wildcards in prepare:
        assert len(wildcards) == 1 and {"tissue", "patches"} <= set(ran), (ran, wildcards)
        assert ("synth" in ran) == ("slide=synth" in next(iter(wildcards)))
    for _, ran, wildcards in maps:
        assert len(wildcards) == 1 and sorted(ran) == ["infer", "polygons"], (ran, wildcards)
    assert counts["evaluate_slide"] == 4  # on their own
    # with labels.base each annotated slide's label mask runs in its labels store's group
    classes = '["ignore", "TUM", "STR", "LYM"]'
    out = smk(
        "-n", "--cores", "2", "--directory", str(REPO), "--groups", *groups, "--config",
        f"results={tmp_path}", f'labels={{"classes": {classes}, "base": "STR"}}',
    ).stdout  # fmt: skip
    labels = [j for j in _group_jobs(out) if j[0] == "labels"]
    assert len(labels) == 4
    assert all(sorted(ran) == ["labels", "tile_labels"] for _, ran, _ in labels), labels


def test_a_run_with_its_own_slides_starts_from_the_schema_not_the_demo(
    tmp_path: Path, real: Path
) -> None:
    """Run in the repository, as users do: a preset with a folder of slides gets none of the
    demo config's settings (its synthetic slides, its few steps per epoch)."""
    folder = tmp_path / "my slides"
    (folder / "case-1").mkdir(parents=True)
    shutil.copy(real / "CMU-1-Small-Region.svs", folder / "A.svs")
    shutil.copy(real / "CMU-1-Small-Region.svs", folder / "case-1" / "B.svs")
    (tmp_path / "k2.yaml").write_text("folds:\n  k: 2\n")
    preset = REPO / "config" / "presets" / "bcss.yaml"
    out = smk(
        "-n", "-p", "--cores", "2", "--configfile", str(preset), str(tmp_path / "k2.yaml"),
        "--config", f"slides={folder}", f"results={tmp_path / 'res'}",
    ).stdout  # fmt: skip
    counts = job_counts(out)
    assert "synth" not in counts and counts["tissue"] == 2 and counts["patches"] == 2
    pre = [ln for ln in out.splitlines() if "dsf pretrain " in ln]
    assert pre and all("--steps-per-epoch 0 " in ln and "--epochs 500 " in ln for ln in pre)
    assert all("--checkpoint-every 10 " in ln for ln in pre)
    # the preset's published statistics: nothing to compute
    assert "norm" not in counts
    assert all("--mean 0.6998 0.4785 0.6609 --std 0.2203 0.2407 0.1983" in ln for ln in pre)
    assert f"--slide {shlex.quote(str(folder / 'case-1' / 'B.svs'))}" in out
    # without slides of its own a run is the demo
    done = smk("-n", "--cores", "2", "--config", f"results={tmp_path / 'd'}")
    assert job_counts(done.stdout)["synth"] == 4
    assert "synth.slides adds" not in done.stderr
    # the demo's config copied for one's own slides brings its synthetic slides: said
    done = smk("-n", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"),
               "--config", f"slides={folder}", f"results={tmp_path / 'c'}")  # fmt: skip
    assert "synth.slides adds 4 synthetic slides (synth-01, synth-02, synth-03 and 1 more)" in (
        done.stderr
    )
    assert "drop its `synth` section" in done.stderr


def test_unannotated_slides_stop_at_pretraining(tmp_path: Path, real: Path) -> None:
    """A folder of slides without any annotation is a pretraining project: pretrained once on
    every slide, however few (no folds: the default folds.k 5 is more than its 3 slides); no
    fine-tuning, maps or evaluation are planned (they could not run), and the run says so."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("A", "B", "C"):
        shutil.copy(real / "CMU-1-Small-Region.svs", folder / f"{name}.svs")
    (tmp_path / "k2.yaml").write_text("folds:\n  k: 2\n")

    def plan(*config: str) -> subprocess.CompletedProcess[str]:
        return smk(
            "-n", "-p", "--cores", "2", *config, "--config", f"slides={folder}",
            f"results={tmp_path / 'res'}",
        )  # fmt: skip

    done = plan()
    counts = job_counts(done.stdout)
    assert counts["pretrain"] == 1 and counts["patches"] == 3  # once, on every slide
    assert counts["norm"] == 1 and "folds" not in counts
    assert "pretrain/dsf/all/encoders.pt" in done.stdout
    assert "--folds" not in done.stdout and "folds.tsv" not in done.stdout
    assert not {"finetune", "infer", "evaluate_tiles", "evaluate_tables"} & set(counts)
    assert "no slide of the sheet has an annotation" in done.stderr
    # the three are one scan: said at the start, with what to do
    assert "3 slides are copies of one another (A = B = C:" in done.stderr
    # once annotated, the folds are back, and folds.k 5 is more than the 3 patients: the
    # whole workflow is refused before any job, the stages before the folds still run (they
    # had been refused too, with advice to lower folds.k below its minimum of 2 for one patient)
    (folder / "A.geojson").write_text(ANNOTATION)
    where = ("--config", f"slides={folder}", f"results={tmp_path / 'res'}")
    refused = smk("--cores", "2", *where, check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "fine-tuning cannot run: folds.k is 5 but the sheet " in (
        said
    )
    assert "only 3 group(s)" in said and not (tmp_path / "res" / "tissue").exists()
    done = smk("-n", "--cores", "2", "data", *where)
    counts = job_counts(done.stdout)
    assert counts["patches"] == 3 and counts["tile_labels"] == 1 and "folds" not in counts
    assert "no folds can be made: folds.k is 5" in done.stderr
    counts = job_counts(smk("-n", "--cores", "2", "--until", "pretrain", *where).stdout)
    assert "pretrain" not in counts and "norm" not in counts, counts
    # one annotated patient cannot fine-tune any fold (train + select need 2): the whole
    # workflow is refused before any job (it had pretrained every fold first, then failed);
    # the stages before fine-tuning still run alone, with a warning
    k2 = ("--configfile", str(tmp_path / "k2.yaml"))
    where = ("--config", f"slides={folder}", f"results={tmp_path / 'res2'}")
    refused = smk("--cores", "2", *k2, *where, check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "fine-tuning cannot run: folds [0, 1] lack annotated" in (
        said
    )
    assert "`--until pretrain`" in said and not (tmp_path / "res2" / "tissue").exists()
    for partial in (("--until", "pretrain"), ()):  # and a dry run: the plan, under a warning
        done = smk("-n", "--cores", "2", *partial, *k2, *where)
        counts = job_counts(done.stdout)
        assert counts["pretrain"] == 2  # per fold again
        assert ("finetune" in counts) == (not partial)
        assert "fine-tuning will stop with an error: folds [0, 1] lack annotated" in done.stderr


def test_lint_is_clean() -> None:
    done = smk("--lint", "--directory", str(REPO), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Congratulations" in done.stdout + done.stderr


def trained_config(
    slides: dict[str, dict],
    *,
    sheet: str,
    epochs: int,
    steps: int,
    batch: int,
    inits: list[str],
    threads: int,
) -> dict:
    """A whole-workflow config that trains for seconds on the CPU (tests/test_pipeline.py and
    tests/test_faults.py): synthetic `slides` at 0.5 um/px, 64 px blocks at 1 um/px, two folds,
    maps at 2 um/px."""
    return {
        "results": "out",
        "slides": sheet,
        "synth": {"mpp": 0.5, "region_um": 150, "slides": slides},
        "tissue": {"mpp": 8.0, "method": "rgb"},
        "patches": {"target_mpp": 1.0, "block": 64, "stride": 128, "min_tissue": 0.5},
        "labels": {"classes": ["ignore", "TUM", "STR", "LYM"]},
        "folds": {"k": 2, "seed": 0},
        # EfficientNet-B0 encoders: a third of ResNet-18's pretraining parameters (41M against
        # 124M with the fusion module), so each checkpoint written and read is 0.5 GB, not 1.5
        "pretrain": {
            "epochs": epochs, "steps_per_epoch": steps, "batch_size": batch, "out_size": 32,
            "workers": 0, "gpus": 0, "backbone": "efficientnet_b0",
        },
        "finetune": {
            "inits": inits, "epochs": epochs, "steps_per_epoch": steps, "batch_size": batch,
            "workers": 0, "gpus": 0, "backbone": "efficientnet_b0",
        },
        "infer": {
            "inits": ["dsf"], "overlap": 0.0, "out_mpp": 2.0, "threads": threads, "gpus": 0,
        },
        "evaluate": {"gpus": 0},
    }  # fmt: skip


def tiny_workdir(wd: Path, real: Path) -> Path:
    """Write the tiny config into `wd`: two synthetic slides and a real one at a path with
    spaces and parentheses (also used by tests/cluster)."""
    wd.mkdir(parents=True, exist_ok=True)
    spaced = wd / "my slides" / "CMU 1 (small).svs"
    spaced.parent.mkdir()
    shutil.copy(real / "CMU-1-Small-Region.svs", spaced)
    (wd / "my slides" / "sheet.tsv").write_text(
        "slide\tpath\tmpp\tlabels\tgroup\ncmu\tCMU 1 (small).svs\t\t\tp1\n"
    )
    cfg = {
        "results": "out",
        "slides": "my slides/sheet.tsv",
        "synth": {
            "mpp": 0.5,
            "region_um": 150,
            "slides": {
                "tiny-a": {"seed": 5, "width": 1024, "height": 768, "labels": "mask"},
                "tiny-b": {"seed": 6, "width": 1024, "height": 768, "labels": "geojson"},
            },
        },
        "patches": {"target_mpp": 1.0, "block": 16, "stride": 32, "min_tissue": 0.5},
        "labels": {"classes": ["ignore", "TUM", "STR", "LYM"]},
        "folds": {"k": 2},
    }
    (wd / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return wd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, real: Path) -> Path:
    """A finished run of the tiny config."""
    wd = tiny_workdir(tmp_path_factory.mktemp("wf"), real)
    smk("--configfile", "cfg.yaml", "--cores", "2", *UNTIL, cwd=wd)
    return wd


def test_tiny_run_writes_every_artifact(tiny: Path) -> None:
    folds = (tiny / "out" / "folds.tsv").read_text().splitlines()
    assert folds[0] == "slide\tgroup\tfold" and len(folds) == 4
    for sid in ("cmu", "tiny-a", "tiny-b"):
        for ext in ("tiff", "jpg", "json"):
            assert (tiny / "out" / "tissue" / f"{sid}.{ext}").stat().st_size > 0
        g = zarr.open_group(str(tiny / "out" / "patches" / f"{sid}.zarr"), mode="r")
        n = g.attrs["n_tiles"]
        assert n > 0 and g["tiles"].shape == (n, 64, 64, 3)
        assert "labels" not in g  # pixels only: the labels have a store of their own
        labels = tiny / "out" / "patches" / f"{sid}.labels.zarr"
        assert labels.exists() == (sid != "cmu")  # annotated slides only
        if sid != "cmu":
            lab = zarr.open_group(str(labels), mode="r")
            assert lab.attrs["tiles_store_id"] == g.attrs["store_id"]
            assert lab["labels"].shape == (lab.attrs["n_tiles"], 64, 64)
            assert 0 < lab.attrs["n_tiles"] <= n and lab["index"][-1] < n
        assert (tiny / "out" / "logs" / "patches" / f"{sid}.log").exists()
        assert (tiny / "out" / "benchmarks" / "patches" / f"{sid}.tsv").exists()
    # the slide at a path with spaces and parentheses was read, not interpreted by a shell
    g = zarr.open_group(str(tiny / "out" / "patches" / "cmu.zarr"), mode="r")
    assert g.attrs["source"].endswith("CMU 1 (small).svs")
    osr = openslide.OpenSlide(g.attrs["source"])
    x, y = (int(v) for v in g["coords"][0])
    ref = np.asarray(osr.read_region((x, y), 0, (128, 128)).convert("RGB"))
    # target 1.0 um/px on a 0.499 um/px slide: each stored pixel averages 2x2 level-0 pixels
    down = ref.reshape(64, 2, 64, 2, 3).mean((1, 3))
    assert np.abs(g["tiles"][0].astype(float) - down).mean() < 1.5


def test_up_to_date_then_tissue_change_reruns_tissue_and_patches_only(tiny: Path) -> None:
    out = smk("-n", "--configfile", "cfg.yaml", *UNTIL, cwd=tiny).stdout
    assert "Nothing to be done" in out or job_counts(out) == {}
    cfg = yaml.safe_load((tiny / "cfg.yaml").read_text())
    cfg["tissue"] = {"min_object_um2": 5000}
    (tiny / "cfg2.yaml").write_text(yaml.safe_dump(cfg))
    counts = job_counts(smk("-n", "--configfile", "cfg2.yaml", *UNTIL, cwd=tiny).stdout)
    assert counts == {"tissue": 3, "patches": 3, "tile_labels": 2}
    counts = job_counts(
        smk("-n", "--configfile", "cfg.yaml", "--forcerun", "patches", *UNTIL, cwd=tiny).stdout
    )
    assert counts == {"patches": 3, "tile_labels": 2}


def test_annotation_edits_rerun_the_labels_not_the_tiles_or_pretraining(tiny: Path) -> None:
    """An edited annotation, class name or min_label_frac rebuilds the annotated slides' labels
    stores only: the patch stores, and so the pretrainings that read them, stay."""
    ann = tiny / "out" / "synth" / "tiny-b.geojson"
    ann.write_text(ann.read_text() + "\n")  # edited (Snakemake compares checksums, not times)
    counts = job_counts(smk("-n", "--configfile", "cfg.yaml", *UNTIL, cwd=tiny).stdout)
    assert counts == {"tile_labels": 1}
    for change in ("patches={min_label_frac: 0.3}", "labels={names: {Tumour: 1}}"):
        out = smk("-n", "--configfile", "cfg.yaml", *UNTIL, "--config", change, cwd=tiny).stdout
        assert job_counts(out) == {"tile_labels": 2}, (change, out)
    # in the whole plan, the labels stores feed fine-tuning and the tile protocol only
    fits = ("--config", "patches={block: 64}", "finetune={held_out: 0}")  # fine-tuning can run
    graph = smk("--rulegraph", "--configfile", "cfg.yaml", *fits, cwd=tiny).stdout
    names = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", graph, re.M))
    edges = [(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", graph, re.M)]
    after = {b for a, b in edges if a == "tile_labels"}
    assert after == {"finetune", "evaluate_tiles"}, edges
    assert ("patches", "pretrain") in edges
    smk("--configfile", "cfg.yaml", "--cores", "2", *UNTIL, cwd=tiny)  # up to date again


def test_a_large_annotation_saved_unchanged_reruns_nothing(tiny: Path, tmp_path: Path) -> None:
    """Snakemake compares an input's content only up to --max-checksum-file-size (1 MB by
    default): a detailed QuPath export saved unchanged had rerun its labels store and every
    fine-tuning after it. The profiles raise the limit, the default one for plain snakemake
    (the Snakefile cannot: Snakemake reads its DAG settings after parsing it)."""
    wd = tmp_path / "wd"
    shutil.copytree(tiny, wd, symlinks=True)
    square = [[[100, 100], [900, 100], [900, 900], [100, 900], [100, 100]]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": square},
        "properties": {"classification": {"name": "TUM"}, "note": "x" * 1_500_000},
    }
    ann = wd / "my slides" / "cmu.geojson"
    ann.write_text(json.dumps(feature))
    sheet = wd / "my slides" / "sheet.tsv"
    sheet.write_text(sheet.read_text().replace("\t\tp1", "\tcmu.geojson\tp1"))
    target = "out/patches/cmu.labels.zarr"
    profile = ("--profile", str(REPO / "profiles" / "local"))
    smk(target, "--configfile", "cfg.yaml", *profile, "--cores", "2", cwd=wd)
    later = time.time_ns() + 5 * 10**9  # after the labels store's
    os.utime(ann, ns=(later, later))  # saved again, unchanged
    out = smk(target, "-n", "--configfile", "cfg.yaml", *profile, "--cores", "2", cwd=wd).stdout
    assert "Nothing to be done" in out, out
    # plain snakemake too: profiles/default, Snakemake's workflow profile, raises the limit
    out = smk(target, "-n", "--configfile", "cfg.yaml", "--cores", "2", cwd=wd).stdout
    assert "Nothing to be done" in out, out
    # without it the file is compared by time
    bare = ("--workflow-profile", "none")
    out = smk(target, "-n", "--configfile", "cfg.yaml", *bare, "--cores", "2", cwd=wd).stdout
    assert "Updated input files: my slides/cmu.geojson" in out, out


def test_sheet_edits_that_keep_the_split_rerun_no_fold_job(tiny: Path, tmp_path: Path) -> None:
    """folds.tsv, an input of every fold's jobs, is rewritten only when the split changes: with
    the folds kept in the sheet's `fold` column (as `dsf sheet --folds` writes them), annotating
    a slide reruns neither the folds nor any fold's normalisation (nor so its pretraining);
    moving a slide to another fold reruns them."""
    wd = tmp_path / "wd"
    shutil.copytree(tiny, wd, symlinks=True)
    norms = ("out/norm/fold0.json", "out/norm/fold1.json")
    smk(*norms, "--configfile", "cfg.yaml", "--cores", "2", cwd=wd)
    before = (wd / "out" / "folds.tsv").read_text()
    fold = dict(line.split("\t")[::2] for line in before.splitlines()[1:])["cmu"]
    square = [[[100, 100], [900, 100], [900, 900], [100, 900], [100, 100]]]
    feature = {"type": "Polygon", "coordinates": square}
    (wd / "my slides" / "cmu.geojson").write_text(
        json.dumps({"type": "Feature", "geometry": feature,
                    "properties": {"classification": {"name": "TUM"}}})
    )  # fmt: skip
    sheet = wd / "my slides" / "sheet.tsv"
    row = "cmu\tCMU 1 (small).svs\t\t{}\tp1\t{}\n"
    sheet.write_text("slide\tpath\tmpp\tlabels\tgroup\tfold\n" + row.format("cmu.geojson", fold))
    out = smk(*norms, "-n", "--configfile", "cfg.yaml", "--cores", "2", cwd=wd).stdout
    assert "Nothing to be done" in out, out
    sheet.write_text(sheet.read_text().replace(f"\tp1\t{fold}\n", f"\tp1\t{1 - int(fold)}\n"))
    out = smk(*norms, "-n", "--configfile", "cfg.yaml", "--cores", "2", cwd=wd).stdout
    assert job_counts(out) == {"folds": 1, "norm": 2}, out


def test_the_same_settings_in_another_order_rerun_nothing(tiny: Path) -> None:
    """Stating defaults on the command line, in another order than the schema's, had
    rerun every tissue mask and all after it ("Params have changed": the options were
    rendered in the config's key order)."""
    out = smk(
        "-n", "--configfile", "cfg.yaml", "--config", "tissue={method: rgb, mpp: 8.0}",
        "folds={seed: 0, k: 2}", "--cores", "2", "data", cwd=tiny,
    ).stdout  # fmt: skip
    assert "Nothing to be done" in out, out
    # nor does a number written without its decimal (8 for 8.0), or as 1e-3 (YAML's text)
    out = smk(
        "-n", "--configfile", "cfg.yaml", "--config", "tissue={mpp: 8}",
        "finetune={lr: 1e-3}", "--cores", "2", "data", cwd=tiny,
    ).stdout  # fmt: skip
    assert "Nothing to be done" in out, out


def test_bad_config_and_sheet_stop_before_any_job(tiny: Path) -> None:
    # the tiny blocks (16 px) serve the data stages, but HookNet could not fine-tune on them:
    # said when the run starts, with blocks that fit (a real run of the whole workflow is
    # refused then, as tested with the folds above)
    done = smk("-n", "--configfile", "cfg.yaml", cwd=tiny)
    assert "fine-tuning will stop with an error: patches.block 16 at patches.scale 4" in (
        done.stderr
    )
    assert "use patches.block 64, 128" in done.stderr
    cfg = yaml.safe_load((tiny / "cfg.yaml").read_text())
    cfg["patches"]["stride"] = "wide"
    (tiny / "bad.yaml").write_text(yaml.safe_dump(cfg))
    done = smk("-n", "--configfile", "bad.yaml", cwd=tiny, check=False)
    assert done.returncode != 0 and "stride" in done.stdout + done.stderr
    # one run's method is `dsf pretrain`'s option: the workflow would have ignored it
    done = smk("-n", "--configfile", "cfg.yaml", "--config", "pretrain={method: simsiam}",
               cwd=tiny, check=False)  # fmt: skip
    assert done.returncode != 0 and "set `methods: [simsiam]`" in done.stdout + done.stderr
    # an empty results folder: one line naming the key (Snakemake had dumped its schema)
    done = smk("-n", "--configfile", "cfg.yaml", "--config", "results=", cwd=tiny, check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "config key `results` is empty" in said
    assert "Failed validating" not in said
    # results naming a file: the key and the fix (Snakemake's NotADirectoryError traceback)
    done = smk("-n", "--configfile", "cfg.yaml", "--config", "results=bad.yaml", cwd=tiny,
               check=False)  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "config key `results` is bad.yaml, a file" in said, said
    assert "Traceback" not in said
    # a sheet naming files that are not there: named together at the start, by the sheet
    (tiny / "gone.tsv").write_text("slide\tpath\tlabels\na\tnothere.svs\tgone.geojson\n")
    done = smk("-n", "--configfile", "cfg.yaml", "--config", "slides=gone.tsv", cwd=tiny,
               check=False)  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "slide sheet gone.tsv: 2 file(s) it names are not" in said
    assert "MissingInputException" not in said
    done = smk("-n", "--config", "slides=", "results=r", cwd=tiny, check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "config key `slides` is empty and synth.slides names" in said
    cfg = yaml.safe_load((tiny / "cfg.yaml").read_text())
    (tiny / "dup.tsv").write_text("slide\tpath\ncmu\ta.svs\ncmu\tb.svs\n")
    cfg["slides"] = "dup.tsv"
    (tiny / "dup.yaml").write_text(yaml.safe_dump(cfg))
    done = smk("-n", "--configfile", "dup.yaml", cwd=tiny, check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "'cmu' appears twice (line 2 and line 3)" in said


def test_unreadable_slides_and_slides_without_mpp_stop_the_run_at_start(
    tiny: Path, real: Path
) -> None:
    """Slides that cannot be opened or state no resolution are named together before any job
    (on a cluster each would be a submitted, retried, failed job)."""
    (tiny / "broken.svs").write_bytes(b"this is not a slide")
    shutil.copy(real / "TCGA-CR-7395-01A-01-TS1.histolab.svs", tiny / "tcga.svs")  # no mpp
    sheet = "slide\tpath\tmpp\nbroken\tbroken.svs\t\ntcga\ttcga.svs\t\n"
    (tiny / "bad.tsv").write_text(sheet + "good\tmy slides/CMU 1 (small).svs\t\n")
    cfg = yaml.safe_load((tiny / "cfg.yaml").read_text())
    cfg |= {"slides": "bad.tsv", "results": "out-start", "synth": {"slides": {}}}
    (tiny / "start.yaml").write_text(yaml.safe_dump(cfg))
    done = smk("-n", "--configfile", "start.yaml", cwd=tiny, check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "2 of the run's slides cannot be used" in said
    assert "slide 'broken'" in said and "not a slide format" in said
    assert "slide 'tcga'" in said and "fill the `mpp` column" in said
    assert "Traceback" not in said and not (tiny / "out-start").exists()
    # the sheet's mpp is enough
    (tiny / "bad.tsv").write_text("slide\tpath\tmpp\ntcga\ttcga.svs\t0.25\n")
    smk("-n", "--configfile", "start.yaml", cwd=tiny)


def test_a_bad_slide_fails_its_job_by_name(tiny: Path) -> None:
    """A slide whose header reads but whose pixels fail (here: blank, no tissue) fails its own
    job with its name; the good slide beside it completes."""
    import tifffile

    blank = np.full((1024, 1024, 3), 245, np.uint8)
    tifffile.imwrite(
        tiny / "blank.tif", blank, photometric="rgb", tile=(256, 256),
        resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER",
    )  # fmt: skip
    (tiny / "bad.tsv").write_text(
        "slide\tpath\nblank\tblank.tif\ngood\tmy slides/CMU 1 (small).svs\n"
    )
    cfg = yaml.safe_load((tiny / "cfg.yaml").read_text())
    cfg |= {"slides": "bad.tsv", "results": "out-bad", "synth": {"slides": {}}}
    (tiny / "badslide.yaml").write_text(yaml.safe_dump(cfg))
    done = smk(
        "--configfile", "badslide.yaml", "--keep-going", "--cores", "1", "data", cwd=tiny,
        check=False,
    )  # fmt: skip
    assert done.returncode != 0
    log = (tiny / "out-bad" / "logs" / "tissue" / "blank.log").read_text()
    assert "slide 'blank'" in log and "no tissue found" in log
    assert not list((tiny / "out-bad" / "tissue").glob("blank.*"))
    # the good slide beside it completes
    assert (tiny / "out-bad" / "patches" / "good.zarr" / "zarr.json").exists()


def test_inference_is_routed_out_of_fold(tmp_path: Path) -> None:
    """Each annotated slide is mapped by the model of the fold that held it out; a slide
    without annotation by every fold's model (infer.unlabelled_fold null)."""
    from dsf.config import defaults
    from dsf.folds import assign_folds
    from dsf.sheet import load_sheet

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["infer"] = {"unlabelled_fold": None, "gpus": 0}
    cfg["results"] = str(tmp_path)
    cfg["slides"] = str(REPO / cfg["slides"])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = smk(
        "-n", "-p", "--cores", "2", "--directory", str(REPO), "--configfile",
        str(tmp_path / "cfg.yaml"), "--until", "infer",
    ).stdout  # fmt: skip
    jobs = {}
    for line in out.splitlines():
        if "dsf infer " not in line:
            continue
        argv = shlex.split(line[line.index("dsf infer ") :].split(" 2> ")[0])
        models = argv[argv.index("--models") + 1 : argv.index("--routing")]
        jobs[argv[argv.index("--slide-id") + 1], argv[argv.index("--out-map") + 1]] = (
            argv[argv.index("--routing") + 1],
            sorted(int(re.search(r"fold(\d+)/model\.pt$", m)[1]) for m in models),
        )
    sheet = load_sheet(cfg)
    seed = cfg["folds"].get("seed", defaults("folds")["seed"])
    folds = assign_folds(sheet, cfg["folds"]["k"], seed).set_index("slide")
    labelled = set(sheet.index[sheet["labels"].notna()])
    assert {sid for sid, _ in jobs} == set(sheet.index)
    for (sid, path), (routing, model_folds) in jobs.items():
        assert "/maps/" in path
        if sid in labelled:
            assert routing == "out_of_fold" and model_folds == [int(folds.loc[sid, "fold"])]
        else:
            assert routing == "ensemble" and model_folds == sorted(set(folds["fold"]))


def demo_dry_run(
    tmp_path: Path, overrides: str, name: str = "overrides", check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The dry run (commands printed) of the demo config with `overrides` (YAML, written to
    `name`.yaml) on top."""
    (tmp_path / f"{name}.yaml").write_text(overrides)
    return smk(
        "-n", "-p", "--cores", "2", "--directory", str(REPO), "--configfile",
        str(REPO / "config" / "config.yaml"), str(tmp_path / f"{name}.yaml"), "--config",
        f"results={tmp_path}", check=check,
    )  # fmt: skip


def demo_plan(tmp_path: Path, overrides: str) -> str:
    """The printed commands of the demo config's dry run with `overrides` on top."""
    return demo_dry_run(tmp_path, overrides).stdout


def test_every_command_the_workflow_prints_parses(tmp_path: Path) -> None:
    """Each job's command line is parsed by its stage's own parser, with settings that add
    options (labels.base, a given normalisation, two GPUs): a rule passing an option its
    stage no longer takes (finetune had been given --base) fails every such job at run time."""
    import importlib
    import shlex

    from dsf.cli import STAGES

    out = demo_plan(
        tmp_path,
        "labels:\n  base: STR\npretrain:\n  gpus: 2\n  mean: [0.7, 0.5, 0.7]\n"
        "  std: [0.2, 0.2, 0.2]\ninfer:\n  probabilities: true\n",
    )
    parsed: set[str] = set()
    for line in out.splitlines():
        command = line.removeprefix("Shell command: ").split(" 2> ")[0]
        tokens = shlex.split(command) if line.startswith("Shell command: ") else []
        if not tokens or tokens[0] != "dsf":
            continue
        module, args = STAGES[tokens[1]][0], tokens[2:]
        try:
            importlib.import_module(module)._parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{module} refuses its workflow command: {line[:300]}")
        parsed.add(module)
    assert {"dsf.tissue", "dsf.labels", "dsf.patches", "dsf.pretrain", "dsf.finetune",
            "dsf.infer", "dsf.polygons", "dsf.evaluate"} <= parsed  # fmt: skip


def test_pretrain_scope_all_pretrains_once_for_every_fold(tmp_path: Path) -> None:
    out = demo_plan(tmp_path, "pretrain:\n  scope: all\n")
    assert job_counts(out)["pretrain"] == 1
    pre = [line for line in out.splitlines() if "dsf pretrain " in line]
    assert len(pre) == 1 and "--fold " not in pre[0]
    assert all(f"{s}.zarr" in pre[0] for s in ("synth-01", "synth-04", "TCGA-CR-7395"))
    dsf_ft = [line for line in out.splitlines() if "dsf finetune " in line and "--init dsf" in line]
    assert len(dsf_ft) == 2 and all("pretrain/dsf/all/encoders.pt" in f for f in dsf_ft)
    # one normalisation, computed from every slide as the pretraining sees them
    assert job_counts(out)["norm"] == 1 and f"--norm {tmp_path}/norm/all.json" in pre[0]
    ft = [line for line in out.splitlines() if "dsf finetune " in line]
    assert ft and all(f"--norm {tmp_path}/norm/all.json" in f for f in ft)


def test_several_gpus_pretrain_through_torchrun_and_other_stages_refuse_them(
    tmp_path: Path,
) -> None:
    (tmp_path / "gpus.yaml").write_text("pretrain:\n  gpus: 2\n  workers: 3\n")
    out = smk(
        "-n", "-p", "--cores", "16", "--resources", "gpu=2", "--directory", str(REPO),
        "--configfile", str(REPO / "config" / "config.yaml"), str(tmp_path / "gpus.yaml"),
        "--config", f"results={tmp_path}", "--until", "pretrain",
    ).stdout  # fmt: skip
    pre = [line for line in out.splitlines() if "dsf pretrain " in line]
    assert len(pre) == 2 and all("Shell command: dsf pretrain --gpus=2 --stores" in x for x in pre)
    assert "threads: 8" in out  # 3 loader workers and itself for each of the 2 processes
    # SLURM's warning before the time limit is SIGTERM, which torchrun forwards to its
    # processes (SIGUSR1 killed torchrun and left them running)
    asked = re.findall(r"^    resources: (.*slurm_extra.*)$", out, re.M)
    assert len(asked) == 2 and all("slurm_extra=--signal=TERM@300" in r for r in asked), asked
    done = demo_dry_run(tmp_path, "infer:\n  gpus: 2\n", "infer", check=False)
    assert done.returncode != 0 and "gpus" in done.stdout + done.stderr


def test_every_stage_reads_slides_with_the_patches_tolerance(tmp_path: Path) -> None:
    """patches.mpp_tolerance decides whether a level near the wanted resolution is read as is
    or resampled: the stages reading a slide after the patches (labels, infer, evaluate,
    polygons) and the tissue stage read it the same way."""
    from dsf.config import defaults
    from dsf.slide import open_slide

    out = demo_plan(tmp_path, "patches:\n  mpp_tolerance: 0.02\n")
    readers = r"dsf (tissue|labels|infer|evaluate slide|polygons|patches) "
    cmds = [ln for ln in out.splitlines() if re.search(readers, ln)]
    stages = {re.search(readers, ln).group(1) for ln in cmds}
    assert stages == {"tissue", "infer", "evaluate slide", "polygons", "patches"}
    assert all("--mpp-tolerance 0.02" in ln for ln in cmds)
    # the demo paints no label masks: the labels rule reads its slide the same way (its
    # commands: tests/test_labels.py::test_the_paip_preset_runs_on_a_paip_folder)
    assert "slide=labels_read_opts," in (REPO / "workflow" / "rules" / "labels.smk").read_text()
    with open_slide(REPO / "config" / "data" / "CMU-1-Small-Region.svs") as slide:
        assert slide.mpp_tolerance == defaults("patches")["mpp_tolerance"]  # by hand too


def test_a_stage_that_asks_for_no_gpu_runs_on_the_cpu(tmp_path: Path) -> None:
    """gpus 0 with device auto: a job that asked for no GPU must not take one another job
    holds; a job that asked for one keeps auto."""
    out = demo_plan(tmp_path, "infer:\n  gpus: 1\n")  # the demo's others are 0
    cmds = {
        stage: [ln for ln in out.splitlines() if f"dsf {stage} " in ln or f"dsf.{stage} " in ln]
        for stage in ("pretrain", "finetune", "infer", "evaluate tiles")
    }
    assert all(cmds.values())
    for stage in ("pretrain", "finetune", "evaluate tiles"):
        assert all("--device cpu" in ln for ln in cmds[stage]), stage
    assert all("--device auto" in ln for ln in cmds["infer"])


def test_speed_settings_rerun_nothing(tmp_path: Path) -> None:
    """Settings of speed, device or memory (FAST_KEYS in common.smk) still reach the commands,
    but changing one reruns no finished job; a setting that changes the output does."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg |= {"slides": str(REPO / cfg["slides"]), "results": "out"}  # run here, not in the repo
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = ("--cores", "2", "--configfile", "cfg.yaml")
    target = "out/patches/CMU-1-Small-Region.zarr"
    smk(target, *run, cwd=tmp_path)
    # speed settings; and label settings, which an unannotated slide's store does not use
    for fast in (
        "patches={shard_mb: 12, band_tiles: 4, threads: 1}",
        "patches={min_label_frac: 0.3}",
        "labels={names: {Tumour: 1}}",
    ):
        out = smk(target, "-n", *run, "--config", fast, cwd=tmp_path).stdout
        assert "Nothing to be done" in out, (fast, out)
    out = smk(target, "-n", *run, "--config", "patches={min_tissue: 0.4}", cwd=tmp_path).stdout
    assert "Params have changed" in out
    base = ("--cores", "2", "--directory", str(REPO), "--config", f"results={tmp_path}")
    # every stage's fast settings are in its command, outside the params compared
    plan = smk(
        "-n", "-p", *base, "pretrain={workers: 3, checkpoint_every: 2}", "finetune={workers: 2}",
        "infer={batch_size: 5, band_windows: 7}", "evaluate={band_rows: 9, batch_size: 11}",
    ).stdout  # fmt: skip
    lines = plan.splitlines()
    for stage, flags in (
        ("dsf pretrain ", ("--workers 3", "--checkpoint-every 2", "--device cpu")),
        ("dsf finetune ", ("--workers 2", "--device cpu")),
        ("dsf infer ", ("--batch-size 5", "--band-windows 7", "--device cpu")),
        ("dsf evaluate tiles ", ("--batch-size 11", "--device cpu")),
        ("dsf evaluate slide ", ("--band-rows 9",)),
        ("dsf patches ", ("--shard-mb 24",)),
    ):
        cmds = [ln for ln in lines if stage in ln]
        assert cmds and all(f in ln for ln in cmds for f in flags), (stage, cmds[:1])


def test_imagescope_polygons_are_planned_beside_every_geojson(tmp_path: Path) -> None:
    out = demo_plan(tmp_path, "polygons:\n  imagescope: true\n")
    cmds = [ln for ln in out.splitlines() if "dsf polygons " in ln]
    assert len(cmds) == job_counts(out)["polygons"] == 6 and all("--imagescope" in c for c in cmds)
    assert len(set(re.findall(r"maps/dsf/[^ ,]+\.xml", out))) == 6
    default = smk(
        "-n", "-p", "--cores", "2", "--directory", str(REPO), "--config", f"results={tmp_path}"
    ).stdout
    assert ".xml" not in default and "--no-imagescope" in default


def _prediction_workdir(tmp_path: Path, real: Path) -> dict:
    """Slides A and B (CMU-1) and models fine-tuned before: `old` (fold0, fold1) and `one.pt`,
    each a model.pt's metadata at the schema's patch geometry; returns the run's config."""
    import torch

    from dsf.config import defaults

    (tmp_path / "slides").mkdir()
    for name in ("A", "B"):
        shutil.copy(real / "CMU-1-Small-Region.svs", tmp_path / "slides" / f"{name}.svs")
    meta = {k: defaults("patches")[k] for k in ("target_mpp", "block", "scale")}
    meta |= {"classes": defaults("labels")["classes"], "fraction": 1.0, "fit_slides": ["x"]}
    meta |= {"init": "dsf", "state_dict": {}}  # no weights: the workflow reads metadata only
    for model in ("old/fold1/model.pt", "old/fold0/model.pt", "one.pt"):
        (tmp_path / model).parent.mkdir(parents=True, exist_ok=True)
        torch.save(meta, tmp_path / model)
    return {"slides": "slides", "apply": {"models": {"dsf": ["old"], "single": ["one.pt"]}}}


def _plan(tmp_path: Path, cfg: dict, check: bool = True) -> subprocess.CompletedProcess:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return smk("-n", "-p", "--cores", "2", "--configfile", "run.yaml", cwd=tmp_path, check=check)


def test_a_prediction_run_plans_maps_only(tmp_path: Path, real: Path) -> None:
    """apply.models: tissue, infer and polygons for every slide, with the given models (a
    folder's model.pt files, sorted) and routing `given`; a missing path names its key."""
    cfg = _prediction_workdir(tmp_path, real)
    planned = _plan(tmp_path, cfg)
    out = planned.stdout
    assert job_counts(out) == {"tissue": 2, "infer": 4, "polygons": 4, "areas": 2, "all": 1}
    # CMU-1 (0.499 um/px) is coarser than the models' 0.25: said against them, not against
    # patches.target_mpp, which a prediction run does not read
    said = planned.stdout + planned.stderr
    assert "2 of 2 slides are scanned coarser than the models' 0.25 um/px (apply.models)" in said
    assert "patches.target_mpp 0.25" not in said
    infer = [ln for ln in out.splitlines() if "dsf infer " in ln]
    dsf = [ln for ln in infer if "maps/dsf/" in ln]
    assert len(dsf) == 2 and all("--routing given" in ln for ln in infer)
    assert all("--models old/fold0/model.pt old/fold1/model.pt --routing" in ln for ln in dsf)
    assert sum("--models one.pt --routing" in ln for ln in infer) == 2
    # an annotated slide is scored per model set, and the scores tabled over slides
    (tmp_path / "slides" / "A.geojson").write_text(ANNOTATION)
    out = _plan(tmp_path, cfg).stdout
    counts = job_counts(out)
    assert counts["evaluate_slide"] == 2 and counts["evaluate_cohort"] == 1
    assert counts["report_tables"] == 1
    assert "folds" not in counts and "dsf evaluate cohort " in out and "--folds" not in out
    assert "infer_model" not in counts and "patches" not in counts
    assert re.search(r"--model-slides\s+--tiles\s+--methods", out)
    # `snakemake data` of a prediction run cuts no patch store it would not read
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    data = smk("data", "-n", "--cores", "2", "--configfile", "cfg.yaml", cwd=tmp_path).stdout
    assert job_counts(data) == {"tissue": 2}
    cfg["apply"]["models"]["dsf"] = ["gone"]
    done = _plan(tmp_path, cfg, check=False)
    assert done.returncode != 0 and "apply.models.dsf: gone not found" in done.stdout + done.stderr
    del cfg["apply"]["models"]
    cfg["apply"]["each_model"] = True
    done = _plan(tmp_path, cfg, check=False)
    assert done.returncode != 0 and "apply.each_model is for" in done.stdout + done.stderr


def test_a_prediction_run_scores_each_model_and_the_tile_protocol(
    tmp_path: Path, real: Path
) -> None:
    """apply.each_model maps the annotated slide with each model of a set alone; apply.
    tile_protocol cuts its store and scores every model on it; models that trained on the
    slide, of mixed fractions or of another geometry stop the run before it starts."""
    import torch

    cfg = _prediction_workdir(tmp_path, real)
    (tmp_path / "slides" / "A.geojson").write_text(ANNOTATION)
    cfg["apply"]["each_model"] = True
    out = _plan(tmp_path, cfg).stdout
    counts = job_counts(out)  # the name of one model is not mapped twice
    assert counts["infer_model"] == counts["evaluate_slide_model"] == 2
    assert counts["infer"] == 4 and counts["evaluate_slide"] == 2
    alone = [ln for ln in out.splitlines() if "dsf infer " in ln and re.search(r"/model\d/", ln)]
    assert len(alone) == 2
    assert {re.search(r"--models (\S+) ", ln).group(1) for ln in alone} == {
        "old/fold0/model.pt", "old/fold1/model.pt",
    }  # fmt: skip
    assert {re.search(r"--out-map (\S+) ", ln).group(1) for ln in alone} == {
        "results/maps/dsf/model0/A.tiff", "results/maps/dsf/model1/A.tiff",
    }  # fmt: skip
    cohort = next(ln for ln in out.splitlines() if "dsf evaluate cohort " in ln)
    assert "eval/slides/dsf/model0/A.tsv" in cohort and "eval/slides/dsf/model1/A.tsv" in cohort
    # the tile protocol: A's store cut, scored by every model of every name
    cfg["apply"] |= {"each_model": False, "tile_protocol": True}
    out = _plan(tmp_path, cfg).stdout
    counts = job_counts(out)
    assert counts["patches"] == 1 and counts["evaluate_tiles_model"] == 3
    tiles = [ln for ln in out.splitlines() if "dsf evaluate tiles " in ln]
    assert all("patches/A.zarr" in ln and "--folds" not in ln for ln in tiles)
    assert sum("--model one.pt " in ln and "--method single " in ln for ln in tiles) == 1
    cohort = next(ln for ln in out.splitlines() if "dsf evaluate cohort " in ln)
    assert "eval/tiles/dsf/model1.tsv" in cohort and "--tile-scores results/eval/tile" in cohort
    # refused at parse time, naming the model and the key
    meta = torch.load(tmp_path / "one.pt")
    for changed, message in (
        ({"block": 2 * meta["block"]}, "apply.models.single: one.pt was fine-tuned on"),
        (
            {"select_slides": ["A"]},
            "single: 1 of its 1 models were fitted or selected on "
            "annotated slides of this run (by slide id), 1 of them: ['A'] (models: ['one.pt'])",
        ),
        ({"fit_slides": ["A"]}, "give them other ids (the sheet's `slide` column)"),
    ):
        torch.save(meta | changed, tmp_path / "one.pt")
        done = _plan(tmp_path, cfg, check=False)
        assert done.returncode != 0 and message in done.stdout + done.stderr
    torch.save(meta, tmp_path / "one.pt")
    # a map resolution no whole multiple of the models' mpp (each infer job had failed)
    odd = {"infer": cfg.get("infer", {}) | {"out_mpp": 1.5 * float(meta["target_mpp"])}}
    done = _plan(tmp_path, cfg | odd, check=False)
    assert done.returncode != 0 and "apply.models.dsf (old/fold0/model.pt): infer.out_mpp" in (
        done.stdout + done.stderr
    )
    torch.save(meta | {"fraction": 0.1}, tmp_path / "old" / "fold1" / "model.pt")
    done = _plan(tmp_path, cfg, check=False)
    assert done.returncode != 0 and "apply.models.dsf mixes models of different fraction" in (
        done.stdout + done.stderr
    )
    torch.save(meta, tmp_path / "old" / "fold1" / "model.pt")
    # encoders given as a model; models inside the run's own results folder (it would
    # overwrite that run and retrain them)
    torch.save({"encoders": {}}, tmp_path / "enc.pt")
    for changed, message in (
        ({"apply": cfg["apply"] | {"models": {"enc": ["enc.pt"]}}}, "enc.pt is not a model.pt"),
        ({"results": "old"}, "apply.models.dsf: old/fold0/model.pt lies under this run's"),
    ):
        done = _plan(tmp_path, cfg | changed, check=False)
        assert done.returncode != 0 and message in done.stdout + done.stderr


def test_the_folds_of_a_cohort_of_thousands_are_written(tmp_path: Path) -> None:
    """The sheet reached `dsf folds` as one command-line argument, which Linux caps at 128 KiB
    (about 1,000 TCGA-named slides): the folds of a larger cohort were never written, and no
    training could start. The rule's run block hands the records over in a file."""
    rows = ["slide\tpath\tmpp\tlabels\tgroup"]
    for i in range(1600):  # a file each (one file is one slide), not opened: the sheet's mpp
        sid = f"TCGA-A{i % 7}-{i:04d}-01Z-00-DX1.5E1C58B1-63C6-4F4A-8F4D-{i:012d}"
        (tmp_path / f"s{i}.svs").touch()
        labels = "a.geojson" if i % 3 == 0 else ""
        rows.append(f"{sid}\ts{i}.svs\t0.5\t{labels}\tTCGA-A{i % 7}-{i:04d}")
    (tmp_path / "a.geojson").write_text(ANNOTATION)
    (tmp_path / "sheet.tsv").write_text("\n".join(rows) + "\n")
    cfg = {"slides": "sheet.tsv", "results": "res", "labels": {"classes": ["ignore", "TUM"]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert len((tmp_path / "sheet.tsv").read_text()) > 128 * 1024  # the records are longer
    smk("res/folds.tsv", "--cores", "1", "--configfile", "run.yaml", cwd=tmp_path)
    folds = pd.read_csv(tmp_path / "res" / "folds.tsv", sep="\t")
    assert len(folds) == 1600 and set(folds["fold"]) == set(range(5))
    assert (tmp_path / "res" / "logs" / "folds.log").exists()


def test_no_rule_is_rerun_by_a_files_time() -> None:
    """Snakemake reruns a `script:` rule whenever its script file is newer than its outputs:
    a fresh clone or a checkout reran the folds job, and after it every fold's pretraining,
    fine-tuning and scores. Rules run shell commands or `run:` blocks, compared by their
    text."""
    for smk_file in (REPO / "workflow" / "rules").glob("*.smk"):
        for n, line in enumerate(smk_file.read_text().splitlines(), 1):
            assert not re.match(r"\s+(script|notebook):", line), f"{smk_file.name}:{n}: {line}"


def test_whole_number_label_fractions_name_the_folders_infer_reads(tmp_path: Path) -> None:
    """finetune.fractions [1, 0.1] (the schema takes integers) plans frac1.0, the fraction
    infer.fraction defaults to; it had stopped the run saying 1.0 was not one of ['1', '0.1']."""
    out = demo_plan(tmp_path, "finetune:\n  fractions: [1, 0.1]\n")
    ft = [line for line in out.splitlines() if "dsf finetune " in line]
    assert ft and {("frac1.0" in f, "frac0.1" in f) for f in ft} == {(True, False), (False, True)}
    maps = [line for line in out.splitlines() if "dsf infer " in line]
    assert maps and all("frac1.0" in m and "frac0.1" not in m for m in maps)
    twice = demo_dry_run(tmp_path, "finetune:\n  fractions: [1, 1.0]\n", "twice", check=False)
    assert twice.returncode != 0 and "lists a fraction twice" in twice.stdout + twice.stderr


def test_settings_that_must_fit_each_other_stop_the_run_before_any_job(tmp_path: Path) -> None:
    """infer.out_mpp no whole multiple of the target mpp, a pretraining batch that does not
    split over its GPUs: each had been planned and failed in every job, after the data stages
    and the pretraining had run."""
    for overrides, said in (
        ("infer:\n  out_mpp: 3.0\n", "infer.out_mpp 3.0 must be a whole multiple"),
        ("pretrain:\n  gpus: 3\n  batch_size: 8\n", "pretrain.batch_size 8 does not split"),
    ):
        run = demo_dry_run(tmp_path, overrides, "fit", check=False)
        out = run.stdout + run.stderr
        assert run.returncode != 0 and said in out and "dsf tissue" not in run.stdout


def test_the_warnings_of_a_runs_jobs_are_listed_when_it_ends(tmp_path: Path, real: Path) -> None:
    """A warning logged inside a job (here a sheet mpp 6% off the file's) is listed at the end
    of the run that wrote its log, naming the log; a later run that runs no job lists none."""
    shutil.copy(real / "CMU-1-Small-Region.svs", tmp_path / "cmu.svs")
    (tmp_path / "sheet.tsv").write_text("slide\tpath\tmpp\ncmu\tcmu.svs\t0.53\n")
    cfg = {"results": "out", "slides": "sheet.tsv", "tissue": {"mpp": 8.0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    target = "out/tissue/cmu.json"
    said = smk("--configfile", "cfg.yaml", "--cores", "1", target, cwd=tmp_path).stderr
    listed = said[said.index("1 warning in 1 job log of this run") :]
    assert "tissue/cmu.log: cmu: sheet mpp 0.53 overrides the file's 0.499 um/px" in listed
    again = smk("--configfile", "cfg.yaml", "--cores", "1", target, cwd=tmp_path)
    assert "of this run" not in again.stdout + again.stderr


def test_results_that_cannot_be_written_stop_a_real_run_not_a_dry_run(
    tmp_path: Path, real: Path
) -> None:
    """A dry run of a finished project whose results cannot be written (archived, shared)
    plans as usual; a real run stops before any job, naming the key (the check had run, and
    written its test file, while the Snakefile was read, where a dry run is not yet known).
    /proc stands in for a read-only place: not even root writes there."""
    shutil.copy(real / "CMU-1-Small-Region.svs", tmp_path / "cmu.svs")
    (tmp_path / "sheet.tsv").write_text("slide\tpath\ncmu\tcmu.svs\n")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"slides": "sheet.tsv"}))
    where = ("--configfile", "cfg.yaml", "--config", "results=/proc/dsf-results", "--cores", "1")
    plan = smk("-n", *where, "/proc/dsf-results/tissue/cmu.json", cwd=tmp_path)
    assert job_counts(plan.stdout) == {"tissue": 1}
    done = smk(*where, "/proc/dsf-results/tissue/cmu.json", cwd=tmp_path, check=False)
    said = done.stdout + done.stderr
    assert (
        done.returncode != 0 and "config key `results`: cannot write to /proc/dsf-results" in said
    )
    assert "Select jobs to execute" not in said
    (tmp_path / "afile").write_text("")  # under a file: said by a dry run too, not a traceback
    plan = smk("-n", *where[:3], "results=afile/out", "--cores", "1", cwd=tmp_path, check=False)
    said = plan.stdout + plan.stderr
    assert plan.returncode != 0 and "afile is a file" in said and "NotADirectoryError" not in said


def test_settings_a_job_does_not_read_leave_its_command_alone(tmp_path: Path) -> None:
    """Snakemake reruns a job whose options changed: settings its stage does not read are
    written at their default (pretraining is given its normalisation, so norm_tiles is the
    norm job's; min_saturation is Otsu's; the U-Net has no context branch; only init imagenet
    reads finetune.weights), and numbers and renamed keys read one way, so changing them
    reran the whole project or every fold. Read settings still reach their commands."""
    base = demo_plan(tmp_path, "{}\n")
    changed = demo_plan(
        tmp_path,
        "tissue:\n  min_saturation: 0.1\npretrain:\n  norm_tiles: 50\n"
        "finetune:\n  context_weight: 0.5\n  weights: /nowhere/resnet18.pth\n"
        "patches:\n  min_label_frac: 0.1\nlabels:\n  geojson_names: {Tumour: 1}\n",
    )

    def cmds(out: str, stage: str) -> list[str]:
        return sorted(ln for ln in out.splitlines() if f"dsf {stage} " in ln)

    for stage in ("tissue", "pretrain"):
        assert cmds(changed, stage) == cmds(base, stage), stage
    unet = [c for c in cmds(changed, "finetune") if "--init unet" in c]
    assert unet and unet == [c for c in cmds(base, "finetune") if "--init unet" in c]
    random = [c for c in cmds(changed, "finetune") if "--init random" in c]
    assert random and all("--context-weight 0.5" in c and "--weights" not in c for c in random)
    assert all("--norm-tiles 50" in c for c in cmds(changed, "norm"))
    renamed = demo_plan(
        tmp_path, "labels:\n  names: {Tumour: 1}\npatches:\n  min_label_frac: 0.1\n"
    )
    for stage in ("tile-labels", "evaluate slide"):
        assert cmds(changed, stage) == cmds(renamed, stage) != cmds(base, stage), stage
    one = demo_plan(tmp_path, "patches:\n  min_label_frac: 1\n")
    assert cmds(one, "tile-labels") == cmds(
        demo_plan(tmp_path, "patches:\n  min_label_frac: 1.0\n"), "tile-labels"
    )
    otsu = demo_plan(tmp_path, "tissue:\n  method: otsu\n  min_saturation: 0.1\n")
    assert all("--min-saturation 0.1" in c for c in cmds(otsu, "tissue"))
    # pretrain.mask_ratio: read by the masking methods only (SimSiam had been retrained)
    both = "pretrain:\n  methods: [dsf, simsiam]\n"
    plain, masked = demo_plan(tmp_path, both), demo_plan(tmp_path, both + "  mask_ratio: 0.25\n")

    def method(out: str, name: str) -> list[str]:
        return [c for c in cmds(out, "pretrain") if f"--method {name} " in c]

    assert method(plain, "simsiam") and method(masked, "simsiam") == method(plain, "simsiam")
    assert method(masked, "dsf") and all("--mask-ratio 0.25" in c for c in method(masked, "dsf"))


def test_pretraining_weights_are_an_input_and_data_runs_without_folds(tmp_path: Path) -> None:
    """pretrain.weights (a local torchvision file) is an input of pretraining: replaced, it
    reruns it (it had been an option alone). infer.unlabelled_fold is checked only where maps
    are drawn: `snakemake data` of a project too small for its folds had been refused."""
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"weights")
    out = demo_plan(tmp_path, f"pretrain:\n  weights: {weights}\n")
    jobs = re.findall(r"rule pretrain:\n((?:    .*\n)+)", out)
    assert jobs and all(str(weights) in re.search(r"input: (.*)", j)[1] for j in jobs)
    done = smk(
        "-n", "--cores", "2", "--directory", str(REPO), "data", "--config",
        f"results={tmp_path}", "folds={k: 7}", "infer={unlabelled_fold: 2}",
    )  # fmt: skip
    assert job_counts(done.stdout)["patches"] == 6
