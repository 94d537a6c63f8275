"""The conda environment for `--sdm conda` lists the same dependencies as pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

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
    assert "--editable .." in pip  # dsf itself, from this repository
    assert any(str(d).startswith("python") for d in env["dependencies"] if isinstance(d, str))


def test_every_rule_names_the_environment() -> None:
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = len(re.findall(r"^\s*rule \w+:", text, re.M))  # also rules under an if
        assert text.count('"../../envs/dsf.yaml"') == rules, smk.name
