# Helpers shared by the rules: config validation, the slide sheet, per-slide inputs.
import os
import shlex

from snakemake.utils import validate

from dsf.config import cli_args
from dsf.folds import assign_folds
from dsf.sheet import load_sheet


validate(config, schema="../schemas/config.schema.yaml", set_default=True)

RESULTS = config["results"]
SHEET = load_sheet(config)
SLIDES = list(SHEET.index)
SYNTH = list(config["synth"]["slides"])
# The same deterministic split the `folds` rule writes to folds.tsv, known at parse time so the
# per-fold rules can name their inputs; `dsf pretrain` checks its stores against folds.tsv.
FOLDS = assign_folds(SHEET, config["folds"]["k"], config["folds"]["seed"])
FOLD_IDS = sorted(set(FOLDS["fold"]))
INITS = list(config["pretrain"]["methods"])
FINITS = list(config["finetune"]["inits"])
FRACS = [str(f) for f in config["finetune"]["fractions"]]
LABELLED = set(SHEET.index[SHEET["labels"].notna()])


wildcard_constraints:
    slide="|".join(map(__import__("re").escape, SLIDES)) or "(?!)",
    fold=r"\d+",
    init="|".join(INITS) or "(?!)",
    finit="|".join(FINITS) or "(?!)",
    frac="|".join(map(__import__("re").escape, FRACS)) or "(?!)",


def train_stores(fold):
    """Patch stores of the slides outside fold `fold` (its training slides)."""
    slides = FOLDS.loc[FOLDS["fold"] != fold, "slide"]
    return [f"{RESULTS}/patches/{s}.zarr" for s in slides]


def finetune_inputs(wildcards):
    """Annotated training stores of the fold, and the fold's encoders for a pretrained init."""
    fold = int(wildcards.fold)
    slides = FOLDS.loc[(FOLDS["fold"] != fold) & FOLDS["slide"].isin(LABELLED), "slide"]
    inputs = {"stores": [f"{RESULTS}/patches/{s}.zarr" for s in slides]}
    if wildcards.finit not in ("random", "unet"):
        inputs["encoders"] = f"{RESULTS}/pretrain/{wildcards.finit}/fold{fold}/encoders.pt"
    return inputs


def slide_path(wildcards):
    """The slide file of a sheet row."""
    return SHEET.loc[wildcards.slide, "path"]


def slide_opts(wildcards):
    """Slide id and, when the sheet gives one, its mpp, as shell-quoted options."""
    row = SHEET.loc[wildcards.slide]
    opts = ["--slide-id", row["slide"]]
    if row["mpp"] is not None:
        opts += ["--sheet-mpp", repr(float(row["mpp"]))]
    return " ".join(shlex.quote(o) for o in opts)


def labels_input(wildcards):
    """The annotation of a slide, or nothing."""
    labels = SHEET.loc[wildcards.slide, "labels"]
    return {"labels": labels} if labels else {}


def labels_opt(wildcards, input):
    """`--labels PATH` when the slide has an annotation."""
    return f"--labels {shlex.quote(input.labels)}" if "labels" in input.keys() else ""


def stage_opts(section, skip=()):
    """A config section as `dsf <stage>` options (the same schema, so the same defaults)."""
    return cli_args(section, {k: v for k, v in config[section].items() if k not in skip})


def all_outputs():
    """Every artifact the stages built so far produce."""
    pretrained = expand(
        f"{RESULTS}/pretrain/{{init}}/fold{{fold}}/encoders.pt", init=INITS, fold=FOLD_IDS
    )
    finetuned = expand(
        f"{RESULTS}/finetune/{{finit}}/frac{{frac}}/fold{{fold}}/model.pt",
        finit=FINITS, frac=FRACS, fold=FOLD_IDS,
    )
    return [f"{RESULTS}/folds.tsv", *pretrained, *finetuned] + expand(
        [
            f"{RESULTS}/tissue/{{slide}}.tiff",
            f"{RESULTS}/tissue/{{slide}}.jpg",
            f"{RESULTS}/tissue/{{slide}}.json",
            f"{RESULTS}/patches/{{slide}}.zarr",
        ],
        slide=SLIDES,
    )
