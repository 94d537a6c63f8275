"""The workflow through `--profile profiles/slurm` on a real single-node SLURM.

`make test-cluster` installs Debian's slurm-wlm and munge and the `cluster` extra, then runs
these tests; `slurm.sh` beside this file starts munged, slurmctld and slurmd from a config in a
temporary folder (no accounting: the executor is told `--slurm-no-account` and
`--slurm-status-command squeue`, as a site without slurmdbd must). The tissue, patches and folds
stages of a tiny config run once locally and once as SLURM jobs, and must write the same data.
A SLURM that cannot be started fails the tests; it never skips them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from test_workflow import tiny_workdir

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("slurm.sh")
BIN = str(Path(sys.executable).parent)
UNTIL = ("--until", "patches", "folds")
SLIDES = ("cmu", "tiny-a", "tiny-b")
# the profile's `prepare` group: one submission per slide (synth, tissue, patches of the two
# synthetic slides; tissue, patches of the real one); folds runs in Snakemake (a local rule)
N_JOBS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    if not path.is_file():
        return f"--- {path}: missing\n"
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def slurm(request: pytest.FixtureRequest) -> dict[str, str]:
    """A running single-node SLURM; the environment that reaches it (SLURM_CONF set).

    SLURM_CONF lives only in the returned dict, never in this process's environment: the
    other tests must not see a SLURM config whose controller is gone.
    """
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail(
            "snakemake-executor-plugin-slurm is not installed in this venv: "
            "pip install -e '.[cluster]' (make test-cluster does)"
        )
    folder = Path(tempfile.mkdtemp(prefix="dsf-slurm-"))
    env = os.environ | {
        "SLURM_CONF": str(folder / "slurm.conf"),
        "SLURMCTLD_PORT": str(_free_port()),
        "SLURMD_PORT": str(_free_port()),
        # slurm.sh's client wrappers first: they carry SLURM_CONF into the jobs' own `srun`
        "PATH": os.pathsep.join(
            [str(folder / "bin"), BIN, os.environ.get("PATH", ""), "/usr/sbin"]
        ),
    }

    def stop() -> None:
        # the daemons this fixture started, by the pid files in `folder`
        subprocess.run(["bash", str(SCRIPT), "down", str(folder)], env=env, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)

    request.addfinalizer(stop)
    up = subprocess.run(
        ["bash", str(SCRIPT), "up", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if up.returncode != 0:
        pytest.fail(f"could not start a local SLURM with {SCRIPT}:\n{up.stdout}\n{up.stderr}")
    env["DSF_TEST_SLURM_DIR"] = str(folder)
    return env


def _smk(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


#: the tiny config through the SLURM profile, on a SLURM without accounting (no account to
#: pick, sacct cannot see jobs)
SLURM_PROFILE = (
    "--configfile", "cfg.yaml", "--profile", str(REPO / "profiles" / "slurm"),
    "--slurm-no-account", "--slurm-status-command", "squeue",
)  # fmt: skip


def _local_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    return env | {"PATH": BIN + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def runs(
    slurm: dict[str, str], real: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, str]:
    """The same tiny workflow run locally and through the SLURM profile (and its stdout)."""
    base = tmp_path_factory.mktemp("cluster")
    local = tiny_workdir(base / "local", real)
    done = _smk("--configfile", "cfg.yaml", "--cores", "2", *UNTIL, cwd=local, env=_local_env())
    assert done.returncode == 0, f"local run failed:\n{done.stdout}\n{done.stderr}"

    remote = tiny_workdir(base / "slurm", real)
    done = _smk(
        *SLURM_PROFILE,
        # short polling for a test (the defaults suit a real cluster)
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--seconds-between-status-checks",
        "2",
        "--slurm-keep-successful-logs",
        "--retries",
        "0",
        *UNTIL,
        cwd=remote,
        env=slurm,
    )
    if done.returncode != 0:
        folder = Path(slurm["DSF_TEST_SLURM_DIR"])
        logs = "".join(
            _tail(p) for p in sorted((remote / ".snakemake" / "slurm_logs").rglob("*.log"))
        )
        raise AssertionError(
            f"SLURM run failed:\n{done.stdout}\n{done.stderr}\n{logs}"
            + _tail(folder / "slurmctld.log")
            + _tail(folder / "slurmd.log")
        )
    return local, remote, done.stdout + done.stderr


def test_jobs_ran_as_slurm_jobs(runs: tuple[Path, Path, str], slurm: dict[str, str]) -> None:
    _, remote, out = runs
    assert "SLURM jobid" in out
    jobs = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%k|%C|%m|%T"],
        env=slurm,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    rows = [line.split("|") for line in jobs]
    assert len(rows) == N_JOBS and {r[3] for r in rows} == {"COMPLETED"}, rows
    names = sorted(r[0].split("_wildcards")[0].removeprefix("rule_") for r in rows)
    # folds is a local rule (a moment's work): Snakemake runs it itself, not SLURM
    assert names == ["prepare_patches_synth_tissue", "prepare_patches_synth_tissue",
                     "prepare_patches_tissue"]  # fmt: skip
    assert (remote / "out" / "folds.tsv").is_file()
    # a group asks for the most threads (patches.threads: 2) and memory (tissue's default
    # 4000 MB) of its jobs
    groups = [r for r in rows if r[0].startswith("rule_prepare")]
    assert {(r[1], r[2]) for r in groups} == {("2", "4000M")}
    logs = sorted((remote / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(logs) == N_JOBS
    # every job of a slide ran inside its group's one submission, in order
    for log in logs:
        if "group_prepare" in str(log):
            text = log.read_text()
            slides = set(re.findall(r"^\s*wildcards: slide=(\S+)$", text, re.M))
            ran = re.findall(r"^\s*rule (\w+):$", text, re.M)
            assert len(slides) == 1 and ran[-2:] == ["tissue", "patches"], (log, slides, ran)
            assert ("synth" in ran) == (slides != {"cmu"}), (log, ran)


def _same_slide(meta: dict) -> dict:
    """Metadata less what names the copy of the slide (each run has its own workdir) and a
    store's store_id (new with every store written)."""
    return {
        k: _same_slide(v) if isinstance(v, dict) else v
        for k, v in meta.items()
        if k not in ("source", "source_mtime", "store_id")
    }


# Snakemake marks directory outputs with a .snakemake_timestamp file, which zarr's listing of
# a store's arrays reports as not part of the hierarchy (dsf.stores.open_store ignores it too)
@pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")
def test_slurm_outputs_equal_the_local_run(runs: tuple[Path, Path, str]) -> None:
    local, remote, _ = runs
    a, b = local / "out", remote / "out"
    assert (a / "folds.tsv").read_text() == (b / "folds.tsv").read_text()
    for sid in SLIDES:
        mask_a = tifffile.imread(a / "tissue" / f"{sid}.tiff")
        mask_b = tifffile.imread(b / "tissue" / f"{sid}.tiff")
        assert mask_a.any() and np.array_equal(mask_a, mask_b), sid
        assert (a / "tissue" / f"{sid}.tiff").read_bytes() == (
            b / "tissue" / f"{sid}.tiff"
        ).read_bytes()
        stats_a = json.loads((a / "tissue" / f"{sid}.json").read_text())
        stats_b = json.loads((b / "tissue" / f"{sid}.json").read_text())
        assert stats_a["source"].startswith(str(local))
        assert stats_b["source"].startswith(str(remote))
        assert _same_slide(stats_a) == _same_slide(stats_b), sid
        ga = zarr.open_group(str(a / "patches" / f"{sid}.zarr"), mode="r")
        gb = zarr.open_group(str(b / "patches" / f"{sid}.zarr"), mode="r")
        names = sorted(ga.array_keys())
        assert names == sorted(gb.array_keys()) and "tiles" in names
        for name in names:
            assert np.array_equal(ga[name][...], gb[name][...]), (sid, name)
        attrs_a, attrs_b = _same_slide(dict(ga.attrs)), _same_slide(dict(gb.attrs))
        assert attrs_a == attrs_b and ga.attrs["n_tiles"] > 0, sid


def test_rerun_through_slurm_has_nothing_to_do(
    runs: tuple[Path, Path, str], slurm: dict[str, str]
) -> None:
    _, remote, _ = runs
    done = _smk(
        "-n",
        *SLURM_PROFILE,
        *UNTIL,
        cwd=remote,
        env=slurm,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Nothing to be done" in out or re.search(r"^total\s+0$", out, re.M), out


def test_pretraining_reads_the_time_its_slurm_job_has_left(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    """Inside a SLURM job, pretraining stops itself before the time squeue says the job has
    left (SLURM's signals before the limit do not reach it through Snakemake's job step where
    processes are tracked by cgroup): read in a real job with a 30-minute limit."""
    out = tmp_path / "left.txt"
    code = (
        "import os; from dsf.deadline import slurm_time_left, job_deadline; "
        "left = slurm_time_left(os.environ['SLURM_JOB_ID']); "
        "print(left, job_deadline(None, now=0.0, time_left=lambda job: left))"
    )
    done = subprocess.run(
        ["sbatch", "--wait", "--time=30", f"--output={out}", "--wrap",
         f"{sys.executable} -c \"{code}\""],
        env=slurm, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + _tail(out)
    left, deadline = (float(v) for v in out.read_text().split())
    assert 25 * 60 < left <= 30 * 60  # the job's 30 minutes, less its start
    assert deadline == pytest.approx(left - left / 10)  # a tenth of its time before the end
