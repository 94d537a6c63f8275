#!/usr/bin/env bash
# Run by Snakemake inside the new conda environment of dsf.yaml (`--sdm conda`): installs dsf
# itself, editable, from the repository the workflow runs from. The Snakefile sets DSF_REPO to
# its own folder; Snakemake runs this script from a copy in .snakemake/conda/, so the script's
# own location does not name the repository.
set -euo pipefail
repo="${DSF_REPO:?DSF_REPO is unset: create the environment through snakemake --sdm conda}"
python -m pip install --no-deps --editable "$repo"
