# dsf: DSF-WSI whole-slide pipeline. Stages live in workflow/rules/, logic in the dsf package.
from snakemake.utils import min_version

from dsf.config import export_repo

min_version("9.0")

# the repository envs/dsf.post-deploy.sh installs dsf from into a `--sdm conda` environment
export_repo(workflow.basedir)


# config/config.yaml is the demo's config. A run that names its own slides (`slides` in a
# --configfile or --config) starts from the schema's defaults (the paper's settings) instead:
# Snakemake would merge the demo's settings into it, its tiny geometry and synthetic slides too.
if "slides" not in config:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/tissue.smk"
include: "workflow/rules/labels.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/folds.smk"
include: "workflow/rules/norm.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/polygons.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# a moment's work each: run by Snakemake itself, not queued on a cluster
localrules:
    all,
    data,
    folds,
    curves_pretrain,
    curves_finetune,
    report_tables,


# a real run (not a dry run) first checks that its results folder can be written
onstart:
    check_results_writable()


# the warnings the jobs logged, listed when the run ends (a log is shown only for a failed job)
onsuccess:
    list_job_warnings()


onerror:
    list_job_warnings()


rule all:
    input:
        all_targets,
    default_target: True


# `snakemake data`: the data stages only (tissue, patches, labels, folds), before any training
rule data:
    input:
        data_outputs(),
