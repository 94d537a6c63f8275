"""The conda environment for `--sdm conda` lists the same dependencies as pyproject.toml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from dsf.config import export_repo

REPO = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_env_matches_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = {_norm(d) for d in project["dependencies"]}
    env = yaml.safe_load((REPO / "envs" / "dsf.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(d) for d in pip if not d.startswith("--")}
    snakemake = {d for d in deps if d.startswith("snakemake")}
    # the environment runs inside Snakemake's jobs: it needs everything but Snakemake itself
    assert listed == deps - snakemake
    # no relative path: Snakemake builds the environment from a copy in .snakemake/conda/
    assert not [d for d in pip if d.startswith("-")]
    assert any(str(d).startswith("python") for d in env["dependencies"] if isinstance(d, str))


def test_every_rule_names_the_environment() -> None:
    """Every rule that runs a command names envs/dsf.yaml; `run:` rules (folds, areas) cannot
    (Snakemake refuses conda with run), and run in Snakemake's own environment, which has dsf:
    the workflow imports it."""
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = len(re.findall(r"^\s*rule \w+:", text, re.M))  # also rules under an if
        runs = len(re.findall(r"^\s+run:$", text, re.M))
        assert text.count('"../../envs/dsf.yaml"') == rules - runs, smk.name


def test_the_post_deploy_script_installs_dsf_from_the_workflows_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """envs/dsf.post-deploy.sh, run by Snakemake in the new environment from a copy, installs
    this repository, which the Snakefile names in DSF_REPO; without it, it stops saying so."""
    copy = tmp_path / "conda" / "0123abcd.post-deploy.sh"  # where Snakemake runs it from
    copy.parent.mkdir()
    shutil.copy(REPO / "envs" / "dsf.post-deploy.sh", copy)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(copy)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "DSF_REPO is unset" in done.stderr
    assert "export_repo(workflow.basedir)" in (REPO / "Snakefile").read_text()
    monkeypatch.setenv("DSF_REPO", "")  # restored after the test
    export_repo(REPO)
    done = subprocess.run(["bash", str(copy)], env=env | {"DSF_REPO": os.environ["DSF_REPO"]})
    assert done.returncode == 0
    assert (tmp_path / "args").read_text().split() == [
        "-m", "pip", "install", "--no-deps", "--editable", str(REPO),
    ]  # fmt: skip
