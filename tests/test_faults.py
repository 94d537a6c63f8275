"""Faults (DESIGN section 7): a workflow killed in the middle of each stage reruns to valid
artifacts, and training resumes from its last checkpoint instead of starting over.

Every test starts the workflow on one tiny config, waits until a job of its stage is part-way,
SIGKILLs Snakemake's whole process group (Snakemake and every job it started, as a crash or a
kill -9 by a scheduler would), checks that nothing looks complete, then recovers the way a user
does (`--unlock`, then a run with `--rerun-incomplete` as profiles/local sets) and opens what the
rerun wrote. The tests share one working folder and, in file order, each finds the stages before
its own done; run alone, a test's first (killed) run does those stages first.

Fault injection: the killed runs get a `sitecustomize` that sleeps before each rename of a
`*.partial` file or folder (`dsf.atomic`), so the kill lands after a job wrote its output but
before it published it, on a loaded machine too. The recovering runs do not get it.

An unreadable slide among good ones under `--keep-going` (its job fails naming the slide and why,
the good slide completes) is test_workflow.py::test_a_bad_slide_fails_its_job_by_name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import torch
import yaml
import zarr
from test_workflow import BIN, REPO, job_counts, smk, trained_config

from dsf.tissue import read_mask

#: Seconds a killed run's jobs wait before publishing an output (see the module docstring).
RENAME_DELAY = 1.0
SITECUSTOMIZE = f"""
import os
import time

_replace = os.replace


def _delayed_replace(src, dst, *args, **kwargs):
    if os.fspath(src).endswith(".partial"):
        time.sleep({RENAME_DELAY})
    return _replace(src, dst, *args, **kwargs)


os.replace = _delayed_replace
"""
EPOCHS = 2
SLIDES = {
    f"f-{i}": {"seed": 40 + i, "width": 1024, "height": 1024, "labels": kind, "group": f"p{i}"}
    for i, kind in enumerate(["mask", "geojson", "mask", "geojson"])
}
CONFIG = trained_config(SLIDES, sheet="", epochs=EPOCHS, steps=1, batch=2, inits=["dsf"], threads=1)
CONFIG["pretrain"]["checkpoint_every"] = 1


@dataclass(frozen=True)
class Workflow:
    """The shared working folder and what its target asks for."""

    wd: Path
    fold: int  # the fold whose models are trained
    slide: str  # a slide of that fold: the map the workflow is asked for
    train: list[str]  # the fold's training slides (their patch stores feed training)

    @property
    def out(self) -> Path:
        return self.wd / "out"

    @property
    def target(self) -> str:
        return f"out/maps/dsf/{self.slide}.tiff"

    def run(self, *args: str) -> str:
        """A recovering run to the target (snakemake's stdout and stderr)."""
        done = smk(
            "--configfile", "cfg.yaml", "--cores", "2", "--rerun-incomplete", self.target,
            *args, cwd=self.wd,
        )  # fmt: skip
        return done.stdout + done.stderr

    def kill_when(self, ready: Callable[[], list[Path]], what: str) -> list[Path]:
        """Start the workflow, wait until `ready()` finds paths, SIGKILL the process group;
        then `--unlock` (a killed Snakemake leaves its lock). Returns what `ready` found."""
        hook = self.wd / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        path = os.pathsep.join([BIN, os.environ.get("PATH", "")])
        pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
        env = os.environ | {"PATH": path, "PYTHONPATH": pythonpath}
        cmd = [
            sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile",
            "cfg.yaml", "--cores", "2", "--rerun-incomplete", self.target,
        ]  # fmt: skip
        log = self.wd / "killed.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=self.wd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        found: list[Path] = []
        deadline = time.monotonic() + 300
        try:
            while not (found := ready()):
                if proc.poll() is not None:
                    raise AssertionError(
                        f"the workflow ended ({proc.returncode}) before {what}:\n{log.read_text()}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {what} within 300 s:\n{log.read_text()}")
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):  # none left if it ended by itself
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _wait_gone(proc.pid)
        smk("--unlock", "--configfile", "cfg.yaml", cwd=self.wd)
        return found


def _wait_gone(pgid: int, timeout: float = 30.0) -> None:
    """Wait until no live process of group `pgid` is left (the jobs die with Snakemake; a
    zombie not yet reaped by init counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # ended meanwhile
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                alive.append(stat.parent.name)
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {alive} of group {pgid} outlived SIGKILL")


def _glob(folder: Path, pattern: str) -> Callable[[], list[Path]]:
    return lambda: sorted(folder.glob(pattern))


@pytest.fixture(scope="module")
def wf(tmp_path_factory: pytest.TempPathFactory) -> Workflow:
    """The working folder with the synthetic slides and folds.tsv made (no other stage)."""
    from dsf.folds import assign_folds
    from dsf.sheet import load_sheet

    wd = tmp_path_factory.mktemp("faults")
    (wd / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    folds = assign_folds(load_sheet(CONFIG), 2, 0)
    fold = 0
    held = sorted(folds.loc[folds["fold"] == fold, "slide"])
    train = sorted(folds.loc[folds["fold"] != fold, "slide"])
    assert len(held) == 2 and len(train) == 2  # one group each: two fit/select groups a fold
    flow = Workflow(wd, fold, held[0], train)
    flow.run("--until", "synth", "folds")
    return flow


def _resume_lines(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if "resumed from" in ln]


def test_killed_tissue_job_publishes_nothing_and_reruns(wf: Workflow) -> None:
    tissue = wf.out / "tissue"
    caught = wf.kill_when(_glob(tissue, "*.partial"), "a tissue job writing its outputs")
    killed = {p.name.split(".")[0] for p in caught}
    for sid in killed:  # the mask is published last: a killed job left none
        assert not (tissue / f"{sid}.tiff").exists()
    counts = job_counts(wf.run("--until", "tissue"))
    assert counts["tissue"] >= len(killed)
    for sid in [wf.slide, *wf.train]:
        mask, mpp = read_mask(tissue / f"{sid}.tiff")
        assert mpp == pytest.approx(8.0) and mask.shape == (64, 64) and 0.1 < mask.mean() < 1
        assert (tissue / f"{sid}.jpg").stat().st_size > 0
        assert json.loads((tissue / f"{sid}.json").read_text())["slide_id"] == sid
    assert not list(tissue.glob("*.partial"))


def test_killed_patches_job_publishes_nothing_and_reruns(wf: Workflow) -> None:
    patches = wf.out / "patches"
    stores = _glob(patches, "*.zarr.partial")  # a patch store's, not a labels store's
    caught = wf.kill_when(
        lambda: [p for p in stores() if ".labels." not in p.name], "a patches job writing its store"
    )
    killed = {p.name.removesuffix(".zarr.partial") for p in caught}
    assert killed <= set(wf.train)
    for sid in killed:
        assert not (patches / f"{sid}.zarr").exists()
    counts = job_counts(wf.run("--until", "patches"))
    assert counts["patches"] >= len(killed)
    for sid in wf.train:
        g = zarr.open_group(str(patches / f"{sid}.zarr"), mode="r")
        n = int(g.attrs["n_tiles"])
        assert n > 0 and g["tiles"].shape == (n, 256, 256, 3) and "labels" not in g
        assert g["tiles"][n - 1].std() > 0  # the last tile was written, not left blank
    assert not list(patches.glob("*.partial"))


def _check_resumed_rows(table: pd.DataFrame, before: list[dict[str, float]]) -> None:
    """The rows of the epochs done before a kill are kept, to the last digit of their timings
    (a restarted run would redo those epochs and time them anew)."""
    kept = table.iloc[: len(before)].reset_index(drop=True)
    expect = pd.DataFrame(before)[list(kept.columns)]
    pd.testing.assert_frame_equal(kept, expect, check_dtype=False, rtol=0, atol=0)


def _kill_at_checkpoint_then_at_export(
    wf: Workflow, run_dir: Path, log: Path, export: str, what: str
) -> list[dict[str, float]]:
    """1: kill the training job once it wrote a checkpoint mid-run; 2: kill the next run, which
    must resume there and train only the remaining epochs, while it writes `export`. Returns
    the history the first checkpoint held."""
    ckpt = run_dir / "checkpoint.pt"
    wf.kill_when(lambda: [ckpt] if ckpt.exists() else [], f"a {what} checkpoint")
    state = torch.load(ckpt, weights_only=True)
    first = int(state["epoch"])
    before = list(state["history"])
    assert 1 <= first < EPOCHS and len(before) == first
    assert not (run_dir / export).exists()
    wf.kill_when(_glob(run_dir, f"{export}.partial"), f"the export of {export}")
    assert _resume_lines(log) and f"after epoch {first}" in _resume_lines(log)[0]
    epochs_run = [ln for ln in log.read_text().splitlines() if f"/{EPOCHS} loss" in ln]
    assert len(epochs_run) == EPOCHS - first  # only the epochs after the checkpoint
    assert not (run_dir / export).exists()
    return before


def test_killed_pretraining_resumes_from_its_checkpoint(wf: Workflow) -> None:
    run_dir = wf.out / "pretrain" / "dsf" / f"fold{wf.fold}"
    log = wf.out / "logs" / "pretrain" / "dsf" / f"fold{wf.fold}.log"
    ckpt = run_dir / "checkpoint.pt"
    before = _kill_at_checkpoint_then_at_export(wf, run_dir, log, "encoders.pt", "pretraining")
    assert int(torch.load(ckpt, weights_only=True)["epoch"]) == EPOCHS
    # 3: the recovering run resumes after the last epoch and completes
    out = wf.run("--until", "pretrain")
    assert job_counts(out)["pretrain"] == 1
    assert f"after epoch {EPOCHS}" in _resume_lines(log)[0]
    enc = torch.load(run_dir / "encoders.pt", weights_only=True)
    assert enc["epochs"] == EPOCHS and enc["method"] == "dsf" and enc["fold"] == wf.fold
    assert sorted(enc["slides"]) == wf.train
    table = pd.read_csv(run_dir / "log.tsv", sep="\t")
    assert table["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert np.isfinite(table["loss"]).all()
    _check_resumed_rows(table, before)
    assert not list(run_dir.glob("*.partial"))


def test_killed_finetuning_resumes_from_its_checkpoint(wf: Workflow) -> None:
    run_dir = wf.out / "finetune" / "dsf" / "frac1.0" / f"fold{wf.fold}"
    log = wf.out / "logs" / "finetune" / "dsf" / "frac1.0" / f"fold{wf.fold}.log"
    ckpt = run_dir / "checkpoint.pt"
    before = _kill_at_checkpoint_then_at_export(wf, run_dir, log, "model.pt", "fine-tuning")
    out = wf.run("--until", "finetune")
    assert job_counts(out)["finetune"] == 1
    assert f"after epoch {EPOCHS}" in _resume_lines(log)[0]
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert model["init"] == "dsf" and model["fold"] == wf.fold and 1 <= model["epoch"] <= EPOCHS
    assert model["state_dict"] and all(
        torch.isfinite(v).all() for v in model["state_dict"].values() if v.is_floating_point()
    )
    history = pd.read_csv(run_dir / "history.tsv", sep="\t")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    _check_resumed_rows(history, before)
    assert not ckpt.exists()  # dropped once model.pt is written
    assert not list(run_dir.glob("*.partial"))


def test_killed_inference_leaves_no_map_and_reruns(wf: Workflow) -> None:
    maps = wf.out / "maps" / "dsf"
    work = maps / f".{wf.slide}.tiff.work"
    wf.kill_when(lambda: [work] if work.exists() else [], "the inference work store")
    for ext in ("tiff", "jpg", "json"):
        assert not (maps / f"{wf.slide}.{ext}").exists()
    out = wf.run()
    assert job_counts(out)["infer"] == 1
    meta = json.loads((maps / f"{wf.slide}.json").read_text())
    osr = openslide.OpenSlide(maps / f"{wf.slide}.tiff")
    assert osr.dimensions == (meta["width"], meta["height"])
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(2.0)
    assert meta["routing"] == "out_of_fold" and meta["folds"] == [wf.fold]
    classes = tifffile.imread(maps / f"{wf.slide}.tiff", key=0)
    assert classes.shape == (meta["height"], meta["width"]) and classes.max() <= 3
    assert (classes > 0).mean() > 0.2  # the tissue got classes
    assert (maps / f"{wf.slide}.jpg").stat().st_size > 1000
    assert not list(wf.out.rglob("*.partial")) and not list(wf.out.rglob(".*.work"))
    dry = smk("-n", wf.target, "--configfile", "cfg.yaml", cwd=wf.wd).stdout
    assert "Nothing to be done" in dry or job_counts(dry) == {}


def test_sigterm_ends_a_stage_through_its_cleanup(tmp_path: Path) -> None:
    """SIGTERM (a stopped Snakemake, SLURM's time limit) exits 143 after the stage's cleanup:
    its partial output is removed, not left beside the results as the default action would."""
    import subprocess
    import sys

    out = tmp_path / "out.txt"
    code = f"""
import os, signal, sys, time
from pathlib import Path
from dsf.atomic import atomic_path
from dsf.runner import run

def body():
    with atomic_path(Path({str(out)!r})) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

sys.exit(run(body))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
