# Helpers shared by the rules: config validation, the slide sheet, per-slide inputs.
import logging
import os
import shlex
import time
from pathlib import Path

from snakemake.logging import logger as snakemake_logger
from snakemake.utils import validate

from dsf.annotations import check_annotations
from dsf.label_settings import base_class, check_label_settings, fold_older_keys
from dsf.cli import SHELL_PREFIX, spill_args
from dsf.config import cli_args, coerce_strings, load_schema, setting_value
from dsf.config import defaults as schema_defaults
from dsf.config import validate as check_config
from dsf.inits import (
    BASELINE_INITS,
    check_mask_ratio,
    unread_pretrain_settings,
    unread_settings,
)
from dsf.folds import (
    assign_folds,
    finetune_gaps,
    gap_advice,
    moved_note,
    split_key,
    too_few_groups,
)
from dsf.job_warnings import job_warnings, summary as warnings_summary
from dsf.norm import check_settings as check_norm_settings
from dsf.model_sets import find_models
from dsf.sheet import check_files, load_sheet

# every shell rule's command starts with bash's strict mode and the `dsf` shell function that
# hands a cohort's thousands of paths to `dsf <stage>` in a file (Linux starts a process with
# at most 2 MiB of arguments); braces doubled, as Snakemake formats the prefix
shell.prefix(SHELL_PREFIX.replace("{", "{{").replace("}", "}}"))


# the job logs this run writes are those changed since now (list_job_warnings)
RUN_STARTED = time.time()
# nested `--config` values come as text ('infer={overlap: 0.5}'): typed by the schema first
coerce_strings(load_schema(), config)
# one run's method/init are `dsf pretrain`/`dsf finetune` options: the workflow runs the lists
for _section, _key, _listed in (("pretrain", "method", "methods"), ("finetune", "init", "inits")):
    if isinstance(config.get(_section), dict) and _key in config[_section]:
        from dsf.errors import ConfigError

        raise ConfigError(
            f"config key {_section}.{_key} sets one `dsf {_section}` run by hand; the "
            f"workflow runs each of {_section}.{_listed}: set `{_listed}: "
            f"[{config[_section][_key]}]` instead"
        )
# `--config results=` is no folder; an empty `slides` is no sheet (only synth.slides run)
if "slides" in config and config["slides"] is None:
    config["slides"] = ""
if "results" in config and config["results"] in (None, ""):
    from dsf.errors import ConfigError

    raise ConfigError(
        "config key `results` is empty: give the folder to write to (or leave the key out "
        "for its default, results)"
    )
if "results" in config and Path(str(config["results"])).exists() and not Path(
    str(config["results"])
).is_dir():
    from dsf.errors import ConfigError

    raise ConfigError(
        f"config key `results` is {config['results']}, a file: give the folder to write to "
        "(a new or existing folder, not a file in it)"
    )
check_config(config)  # one line naming the key (Snakemake's quotes the whole schema)
validate(config, schema="../schemas/config.schema.yaml", set_default=True)
check_label_settings(config["labels"])  # class names and indices, before any job runs
# older key names read as the new ones: renaming them then changes no job's options
fold_older_keys(config["labels"])
# pretrain.mean/std null: computed per pretraining unit by the norm rule (results/norm/)
NORM_COMPUTED = check_norm_settings(config["pretrain"])

RESULTS = config["results"]
SHEET = load_sheet(config)
SLIDES = list(SHEET.index)
SYNTH = list(config["synth"]["slides"])
# apply.models: a prediction run, name -> model.pt files fine-tuned before; only tissue, infer
# and polygons run (maps/<name>/<slide>.tiff; patches of the annotated slides too with
# apply.tile_protocol), every slide predicted by its name's models, the annotated ones scored
APPLY = find_models(config["apply"]["models"]) if config["apply"]["models"] else None
if not APPLY:  # a prediction run pretrains nothing
    check_mask_ratio(
        config["pretrain"]["methods"], config["pretrain"]["mask_ratio"], config["patches"]["scale"]
    )
# apply.each_model: name -> indices of its models, each mapping the annotated slides alone
# (names of one model have no members apart from their ensemble)
for key in ("each_model", "tile_protocol"):
    if config["apply"][key] and not APPLY:
        from dsf.errors import ConfigError

        raise ConfigError(
            f"apply.{key} is for prediction runs: set apply.models too, or set apply.{key} "
            "to false"
        )
MEMBERS = {
    name: list(range(len(models)))
    for name, models in (APPLY or {}).items()
    if len(models) > 1 and config["apply"]["each_model"]
}
INITS = list(config["pretrain"]["methods"])
# annotated: a `labels` file, or per-class masks painted into one by the `labels` rule
MASKED = set(SHEET.index[[bool(m) for m in SHEET["masks"]]])
LABELLED = set(SHEET.index[SHEET["labels"].notna()]) | MASKED
# The same deterministic split the `folds` rule writes to folds.tsv, known at parse time so the
# per-fold rules can name their inputs; `dsf pretrain` checks its stores against folds.tsv. A
# prediction run has no folds, nor has a pretraining project (no annotation: folds are
# stratified by annotation, and its slides may be fewer than folds.k); one fold holding every
# slide keeps the helpers below simple.
# Fewer patients than folds.k: no split, so nothing per fold is planned (the data stages run;
# the whole workflow is refused below, with what to do).
SPLIT_PROBLEM = too_few_groups(SHEET, config["folds"]["k"]) if LABELLED and not APPLY else None
FOLDS = (
    assign_folds(SHEET, config["folds"]["k"], config["folds"]["seed"])
    if LABELLED and not APPLY and not SPLIT_PROBLEM
    else SHEET[["slide", "group"]].assign(fold=0).reset_index(drop=True)
)
# slide -> fold, looked up per job (FOLDS.set_index per call was quadratic in the slides)
FOLD_OF = {str(r.slide): int(r.fold) for r in FOLDS.itertuples()}
FOLD_IDS = sorted(set(FOLDS["fold"]))
# apply.tile_protocol: the annotated slides' stores scored by every model of every name
TILE_SCORED = bool(APPLY and config["apply"]["tile_protocol"] and LABELLED)
if APPLY and config["apply"]["tile_protocol"] and not LABELLED:
    logging.getLogger("dsf").warning(
        "apply.tile_protocol: no slide of the sheet has an annotation, so no tile is scored "
        "(the maps are drawn); give the slides' annotations to score the models"
    )
if APPLY:  # what would stop the run midway or mix models, refused before anything runs
    from dsf.model_sets import check_given_models, check_results_apart

    check_results_apart(APPLY, RESULTS)
    MODEL_MPPS = check_given_models(
        APPLY,
        LABELLED,
        config["patches"] if TILE_SCORED else None,
        config["labels"]["classes"],
        config["infer"]["out_mpp"],
        config["patches"]["mpp_tolerance"],
    )
# slides painted into one label mask by `labels` (per-class masks; with labels.base, the
# class of tissue no annotation covers, every annotated slide)
PAINTED = LABELLED if base_class(config["labels"]) is not None else MASKED
# class names and the files' form, once, before any job (not again inside each cluster job)
if workflow.is_main_process:
    # the files the sheet names are there (the synthetic slides are made by the run)
    check_files(
        [r for r in SHEET.to_dict("records") if r["slide"] not in config["synth"]["slides"]],
        config["slides"],
    )
    check_annotations(
        {s: SHEET.loc[s, "labels"] for s in SHEET.index if SHEET.loc[s, "labels"]},
        config["labels"],
    )
    # slides without a resolution (no sheet mpp, none in the file), named together at start
    from dsf.slide import check_resolutions, upsampling_note

    SLIDE_MPPS = check_resolutions(
        {s: (SHEET.loc[s, "path"], SHEET.loc[s, "mpp"]) for s in SHEET.index},
        cache=Path(".snakemake") / "dsf-slides-checked.json",
    )
    if note := upsampling_note(
        SLIDE_MPPS,
        min(MODEL_MPPS.values()) if APPLY else config["patches"]["target_mpp"],
        config["patches"]["mpp_tolerance"],
        models=bool(APPLY),
    ):
        logging.getLogger("dsf").warning(note)
    # a copy of the demo's config keeps its synthetic slides: they would join the user's
    demo_sheet = Path(workflow.basedir) / "config" / "slides.tsv"
    if SYNTH and config["slides"] and Path(config["slides"]).resolve() != demo_sheet.resolve():
        from dsf.errors import some

        logging.getLogger("dsf").warning(
            "the config's synth.slides adds %d synthetic slides (%s) to %s: they are "
            "trained on and scored with your slides. If the config is a copy of the demo's "
            "(config/config.yaml), drop its `synth` section",
            len(SYNTH),
            some(SYNTH),
            config["slides"],
        )
    # a results folder under a file (Snakemake's own listing of it would fail with a
    # traceback); that it can be written is checked when a real run starts (onstart)
    from dsf.runner import check_writable

    check_writable(Path(RESULTS), "results", write=False)
    # one scan under two names: its copies can land in different folds
    from dsf.copies import copies_note

    if note := copies_note({s: SHEET.loc[s, "path"] for s in SHEET.index}):
        logging.getLogger("dsf").warning(note)
    # a slide replaced under its name with an older file time: Snakemake would rerun nothing
    from dsf.rescans import replaced_note, replaced_slides

    _paths = {s: SHEET.loc[s, "path"] for s in SHEET.index}
    _replaced = replaced_slides(_paths, Path(RESULTS) / "tissue")
    _list = Path(".snakemake") / "dsf-replaced-slides.txt"
    if note := replaced_note(_replaced, _paths, _list):
        logging.getLogger("dsf").warning(note)
    # slides the earlier split placed and this one moves (added slides rebalance the folds)
    if LABELLED and not APPLY and not SPLIT_PROBLEM:
        if note := moved_note(
            Path(RESULTS) / "folds.tsv",
            FOLDS,
            LABELLED,
            config["slides"] or "the slides",
            k=config["folds"]["k"],
            synthetic=bool(SYNTH),
        ):
            logging.getLogger("dsf").warning(note)
# Without any annotation there is nothing to fine-tune, map or evaluate: the workflow's targets
# stop at the pretrained encoders, pretrained once on every slide (a folder of unlabelled slides
# is a pretraining project, and folds are stratified by annotation, so per-fold encoders made
# now would not fit the folds of the annotated project).
FINETUNING = bool(LABELLED) and not SPLIT_PROBLEM
# annotated groups a fold's fine-tuning needs outside it: one to fit, one to choose the epoch
# (none is chosen with finetune.held_out 0: the last epoch is kept)
NEED_GROUPS = 1 if config["finetune"]["held_out"] == 0 else 2
# why fine-tuning would fail: warned at parse time (the data stages still run), refused when
# the whole workflow is asked for (all_targets), before the pretraining it would follow
FINETUNE_PROBLEMS = []
if APPLY:
    described = "; ".join(f"{name}: {len(models)} model(s)" for name, models in APPLY.items())
    snakemake_logger.info(f"prediction run (apply.models): {described}; nothing is trained")
elif SPLIT_PROBLEM:
    FINETUNE_PROBLEMS.append(SPLIT_PROBLEM)
    logging.getLogger("dsf").warning(
        "no folds can be made: %s. The stages before the folds run (`snakemake data`, "
        "`--until patches`); pretraining, fine-tuning, maps and scores wait for the folds",
        SPLIT_PROBLEM,
    )
elif not FINETUNING:
    logging.getLogger("dsf").warning(
        "no slide of the sheet has an annotation (`labels`): the workflow pretrains once on "
        "every slide (pretrain/<method>/all/encoders.pt) and stops there; annotate slides to "
        "fine-tune, map and evaluate (folds depend on which slides are annotated, so per-fold "
        "pretraining waits for them)"
    )
elif gaps := finetune_gaps(FOLDS, LABELLED, NEED_GROUPS):
    FINETUNE_PROBLEMS.append(
        "folds {} lack annotated slides: each fold needs annotated slides of at least {} "
        "outside it ({} annotated groups for folds.k {}); {}".format(
            gaps,
            "1 patient (group), to train on"
            if NEED_GROUPS == 1
            else "2 patients (groups), one to train on and one to choose the epoch",
            SHEET.loc[list(LABELLED), "group"].nunique(),
            config["folds"]["k"],
            gap_advice(config["folds"]["k"], NEED_GROUPS),
        )
    )
    logging.getLogger("dsf").warning(
        "fine-tuning will stop with an error: %s", FINETUNE_PROBLEMS[-1]
    )


# Pretraining runs: one per fold (pretrain.scope fold) or one on every slide (all, and always
# without annotations); none while annotated slides are too few patients for the folds.
PRETRAIN_UNITS = (
    []
    if SPLIT_PROBLEM
    else [f"fold{k}" for k in FOLD_IDS]
    if config["pretrain"]["scope"] == "fold" and FINETUNING
    else ["all"]
)
FINITS = list(config["finetune"]["inits"])


def check_finetune_inits(finetune, pretrain):
    """Refuse at parse time fine-tuning inits the workflow cannot build (DESIGN section 5)."""
    from dsf.errors import ConfigError

    inits = list(finetune["inits"])
    pretrained = [i for i in inits if i not in BASELINE_INITS]
    missing = [i for i in pretrained if i not in pretrain["methods"]]
    if missing:
        raise ConfigError(
            f"finetune.inits {missing} need encoders that pretrain.methods "
            f"{list(pretrain['methods'])} does not pretrain: add them to pretrain.methods "
            "or drop them from finetune.inits"
        )
    if pretrained and finetune["backbone"] != pretrain["backbone"]:
        raise ConfigError(
            f"finetune.backbone {finetune['backbone']} != pretrain.backbone "
            f"{pretrain['backbone']}: the encoders of finetune.inits {pretrained} would not fit"
        )
    if "imagenet" in inits and finetune["weights"] is None:
        raise ConfigError(
            "finetune.inits has imagenet but finetune.weights is null: download torchvision's "
            f"ImageNet weights of {finetune['backbone']} once (resnet18: resnet18-f37072fd.pth) "
            "and set finetune.weights to that file"
        )
    if FINETUNING and not APPLY:
        from dsf.hook_geometry import check_hook, check_unet

        block, scale = config["patches"]["block"], config["patches"]["scale"]
        checks = [lambda: check_hook(block, scale)] if set(inits) - {"unet"} else []
        checks += [lambda: check_unet(block)] if "unet" in inits else []
        for check in checks:
            try:  # a warning: the data stages still run (`snakemake data`), fine-tuning not
                check()
            except ConfigError as exc:
                FINETUNE_PROBLEMS.append(str(exc))
                logging.getLogger("dsf").warning("fine-tuning will stop with an error: %s", exc)
    if finetune["target_block"] == "random" and set(inits) != {"unet"}:
        raise ConfigError(
            "finetune.target_block random is for init unet only (HookNet needs the centre "
            f"block), but finetune.inits is {inits}: set it to [unet] or target_block to centre"
        )


if not APPLY:  # a prediction run trains nothing: the training sections are not read
    check_finetune_inits(config["finetune"], config["pretrain"])
# one spelling per fraction (1 and 1.0 name one folder, frac1.0), as infer.fraction is read
FRACS = [str(float(f)) for f in config["finetune"]["fractions"]]
if len(set(FRACS)) < len(FRACS):
    from dsf.errors import ConfigError

    raise ConfigError(
        f"finetune.fractions {config['finetune']['fractions']} lists a fraction twice: "
        "keep each once"
    )
def _infer_choice():
    """Inits that get maps and the label fraction whose models draw them (infer section)."""
    from dsf.errors import ConfigError

    inits = list(config["infer"]["inits"] or FINITS)
    unknown = [i for i in inits if i not in FINITS]
    if unknown:
        raise ConfigError(
            f"infer.inits {unknown} are not fine-tuned: add them to finetune.inits or drop them"
        )
    frac = config["infer"]["fraction"]
    frac = str(float(frac if frac is not None else max(config["finetune"]["fractions"])))
    if frac not in FRACS:
        raise ConfigError(
            f"infer.fraction {frac} is not one of finetune.fractions {FRACS}: pick one of them"
        )
    fold = config["infer"]["unlabelled_fold"]
    # without folds (too few patients, no annotation) no map is drawn: the data stages run
    if fold is not None and FINETUNING and fold not in FOLD_IDS:
        raise ConfigError(
            f"infer.unlabelled_fold {fold} is not a fold (folds are {FOLD_IDS}); "
            "use null to average all folds"
        )
    return inits, frac


if APPLY:  # the maps are named after apply.models' names; infer.inits, fraction and
    # unlabelled_fold choose among the run's own models, which a prediction run has none of
    INFER_INITS, INFER_FRAC = list(APPLY), None
else:
    INFER_INITS, INFER_FRAC = _infer_choice()
    # settings that must fit other settings, refused now, not in each job after training
    # (a prediction run checks infer.out_mpp against its models' mpp, check_given_models)
    from dsf.windows import out_factor

    out_factor(
        config["infer"]["out_mpp"],
        config["patches"]["target_mpp"],
        config["patches"]["mpp_tolerance"],
    )
_PRE = config["pretrain"]
if _PRE["gpus"] > 1 and _PRE["batch_size"] % _PRE["gpus"]:
    from dsf.errors import ConfigError

    raise ConfigError(
        f"pretrain.batch_size {config['pretrain']['batch_size']} does not split evenly over "
        f"pretrain.gpus {config['pretrain']['gpus']}: make it a multiple of the GPUs"
    )


wildcard_constraints:
    # any slide id (slides.schema.yaml's pattern): never `x.labels` of `synth/x.labels.tiff` for
    # `{slide}.tiff`. Not the list of ids: Snakemake copies a constraint into every file pattern,
    # which made the plan quadratic in the slides (130 s for 1,000).
    slide=r"[A-Za-z0-9][A-Za-z0-9._-]*(?<!\.labels)(?<!\.panel)(?<!\.probs)",
    fold=r"\d+",
    unit=r"fold\d+|all",
    init="|".join(INITS) or "(?!)",
    finit="|".join(map(__import__("re").escape, [*FINITS, *(APPLY or [])])) or "(?!)",
    frac="|".join(map(__import__("re").escape, FRACS)) or "(?!)",
    member=r"\d+",


def train_stores(unit):
    """Patch stores a pretraining run reads: the slides outside fold k for unit `fold{k}`,
    every slide for unit `all`."""
    if unit == "all":
        return [f"{RESULTS}/patches/{s}.zarr" for s in SLIDES]
    slides = FOLDS.loc[FOLDS["fold"] != int(unit.removeprefix("fold")), "slide"]
    return [f"{RESULTS}/patches/{s}.zarr" for s in slides]


def pretrain_unit(fold):
    """The pretraining run fold `fold` fine-tunes from: its encoders, its normalisation."""
    return f"fold{fold}" if config["pretrain"]["scope"] == "fold" else "all"


def split_input(unit):
    """{"folds": folds.tsv} for a fold's pretraining unit, whose stores are checked against the
    split; {} for `all`, which reads every slide (and is all a pretraining project has)."""
    return {} if unit == "all" else {"folds": f"{RESULTS}/folds.tsv"}


def split_opt(wildcards, input):
    """`--folds FILE --fold K` for a fold's unit (split_input), nothing for `all`."""
    if "folds" not in input.keys():
        return ""
    return f"--folds {shlex.quote(input.folds)} --fold {wildcards.unit.removeprefix('fold')}"


def norm_input(unit):
    """{"norm": the computed normalisation of pretraining unit `unit`}, or {} when
    pretrain.mean/std are given."""
    return {"norm": f"{RESULTS}/norm/{unit}.json"} if NORM_COMPUTED else {}


def norm_opt(wildcards, input):
    """`--norm FILE` for a job with a computed normalisation input."""
    return f"--norm {shlex.quote(input.norm)}" if "norm" in input.keys() else ""


def given_norm_opts():
    """` --norm-mean ... --norm-std ...` of a given pretrain.mean/std (not NORM_COMPUTED)."""
    if NORM_COMPUTED:
        return ""
    mean, std = config["pretrain"]["mean"], config["pretrain"]["std"]
    return " " + " ".join(["--norm-mean", *map(repr, mean), "--norm-std", *map(repr, std)])


def finetune_inputs(wildcards):
    """Annotated training stores of the fold, the fold's encoders for a pretrained init
    (random, unet and imagenet read none; imagenet reads the local file finetune.weights), and
    the computed normalisation of the pretraining it belongs to."""
    fold = int(wildcards.fold)
    slides = FOLDS.loc[(FOLDS["fold"] != fold) & FOLDS["slide"].isin(LABELLED), "slide"]
    inputs = labelled_stores(slides=slides)
    unit = pretrain_unit(fold)
    if wildcards.finit == "imagenet":
        inputs["weights"] = config["finetune"]["weights"]
    elif wildcards.finit not in ("random", "unet"):
        inputs["encoders"] = f"{RESULTS}/pretrain/{wildcards.finit}/{unit}/encoders.pt"
    return inputs | norm_input(unit)


def infer_routing(slide):
    """(routing, folds) of the models that predict `slide`: an annotated slide by the model of
    the fold that held it out; one without annotation by every fold averaged, or by
    infer.unlabelled_fold; in a prediction run by the models apply.models names."""
    if APPLY:
        return "given", []
    if slide in LABELLED:
        return "out_of_fold", [FOLD_OF[slide]]
    fold = config["infer"]["unlabelled_fold"]
    if fold is None:
        return "ensemble", list(FOLD_IDS)
    return "fold", [int(fold)]


def infer_inputs(wildcards):
    """Slide, tissue mask and the routed models of an inference job."""
    _, folds = infer_routing(wildcards.slide)
    models = [
        f"{RESULTS}/finetune/{wildcards.finit}/frac{INFER_FRAC}/fold{k}/model.pt" for k in folds
    ]
    return {
        "slide": slide_path(wildcards),
        "mask": f"{RESULTS}/tissue/{wildcards.slide}.tiff",
        "models": APPLY[wildcards.finit] if APPLY else models,
    }


def member_infer_inputs(wildcards):
    """Slide, tissue mask and model `member` of apply.models' name `finit` (apply.each_model)."""
    models = APPLY[wildcards.finit]
    member = int(wildcards.member)
    if member >= len(models):
        raise ValueError(f"apply.models.{wildcards.finit} has {len(models)} models, no {member}")
    return {
        "slide": slide_path(wildcards),
        "mask": f"{RESULTS}/tissue/{wildcards.slide}.tiff",
        "models": models[member],
    }


def labelled_stores(fold=None, slides=None):
    """{"stores": patch stores, "label_stores": their labels stores} of the annotated slides
    (of validation fold `fold`, or `slides`, when given)."""
    if slides is None:
        slides = [s for s in sorted(LABELLED) if fold is None or FOLD_OF[s] == int(fold)]
    return {
        "stores": [f"{RESULTS}/patches/{s}.zarr" for s in slides],
        "label_stores": [f"{RESULTS}/patches/{s}.labels.zarr" for s in slides],
    }


def member_tile_scores():
    """The tile-protocol TSVs of every model of every name (apply.tile_protocol)."""
    if not TILE_SCORED:
        return []
    return [
        f"{RESULTS}/eval/tiles/{name}/model{i}.tsv"
        for name, models in APPLY.items()
        for i in range(len(models))
    ]


def member_scores():
    """The whole-slide TSVs of every member model on every annotated slide (apply.each_model)."""
    return [
        f"{RESULTS}/eval/slides/{name}/model{i}/{slide}.tsv"
        for name, members in MEMBERS.items()
        for i in members
        for slide in sorted(LABELLED)
    ]


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


def slide_read_opts(wildcards):
    """slide_opts and patches.mpp_tolerance, for the stages that read a slide beside its
    patches (tissue, labels, infer, evaluate, polygons): at the resolution they are cut at."""
    tolerance = float(config["patches"]["mpp_tolerance"])
    return f"{slide_opts(wildcards)} --mpp-tolerance {tolerance!r}"


def labels_input(wildcards):
    """The annotation of a slide (painted into one label mask by `labels`), or nothing."""
    if wildcards.slide in PAINTED:
        return {"labels": f"{RESULTS}/labels/{wildcards.slide}.tiff"}
    labels = SHEET.loc[wildcards.slide, "labels"]
    return {"labels": labels} if labels else {}


def mask_inputs(wildcards):
    """The per-class masks of a slide as `mask_<n>` inputs in class order, or its annotation
    as `annotation`."""
    masks = SHEET.loc[wildcards.slide, "masks"]
    if not masks:
        return {"annotation": SHEET.loc[wildcards.slide, "labels"]}
    return {f"mask_{i}": masks[c] for i, c in enumerate(sorted(masks))}


def mask_opts(wildcards, input):
    """`--annotation FILE` of a slide without per-class masks (shell-quoted), else nothing."""
    if "annotation" in input.keys():
        return f"--annotation {shlex.quote(input.annotation)}"
    return ""


def labels_read_opts(wildcards):
    """slide_read_opts and `--mask CLASS=FILE` per class of the slide's masks (shell-quoted):
    a param of the wildcards alone, which Snakemake compares with the last run's, so masks
    swapped between classes (the same files: no input changed) rerun the label mask."""
    masks = SHEET.loc[wildcards.slide, "masks"]
    pairs = [f"{c}={masks[c]}" for c in sorted(masks)]
    return " ".join([slide_read_opts(wildcards), *(f"--mask {shlex.quote(p)}" for p in pairs)])


def pretrain_launcher():
    """`dsf pretrain`, or with pretrain.gpus above 1 one process per GPU through torchrun."""
    from dsf.cli import pretrain_command

    return shlex.join(pretrain_command(config["pretrain"]["gpus"]))


#: Settings that change how fast, on what or in how much memory a job runs, not what it writes
#: (the training stages' RESUME_FREE and the readers' band sizes): `stage_opts` leaves them out
#: of the params Snakemake reruns a job for when they change, and `fast_param` passes them, so
#: raising pretrain.workers or moving a stage to a GPU reruns nothing.
FAST_KEYS = {
    "patches": ("threads", "band_tiles", "shard_mb"),
    "pretrain": ("workers", "device", "compile", "compile_augment", "checkpoint_every", "gpus"),
    "finetune": ("workers", "device", "gpus"),
    "infer": ("threads", "batch_size", "band_windows", "device", "gpus"),
    "evaluate": ("gpus", "batch_size", "band_rows", "device"),
}


def fast_opts(section, keys):
    """`keys` of a config section as `dsf <stage>` options; a section whose jobs ask for no
    GPU (`gpus: 0`) runs `device: auto` on the CPU, since a card it took could be one another
    job holds."""
    values = {k: config[section][k] for k in keys}
    if config[section].get("gpus") == 0 and values.get("device") == "auto":
        values["device"] = "cpu"
    return cli_args(section, values)


# threads is the rule's `threads`, gpus its `gpu` resource (and the torchrun launch);
# `dsf evaluate tiles` and `slide` take different ones
FAST = {
    **{
        section: fast_opts(section, [k for k in FAST_KEYS[section] if k not in ("threads", "gpus")])
        for section in ("patches", "pretrain", "finetune", "infer")
    },
    "evaluate_tiles": fast_opts("evaluate", ("batch_size", "device")),
    "evaluate_slide": fast_opts("evaluate", ("band_rows",)),
    "launch_pretrain": pretrain_launcher(),
}


def fast_param(key):
    """The param of FAST[key]: a function of the job's threads, which makes it a param
    Snakemake derives from the job and does not rerun it for (only the params that depend on
    nothing but wildcards are compared with the last run's), checked by
    tests/test_workflow.py::test_speed_settings_rerun_nothing."""
    return lambda wildcards, threads: FAST[key]


def stage_opts(section, skip=(), inert=()):
    """A config section as `dsf <stage>` options (the same schema, so the same defaults),
    without its FAST_KEYS (`fast_param`). labels.masks is used here, finding the
    masks (`{slide}` in a params string would also be taken for a wildcard): no stage reads
    it. `inert` settings, which these jobs do not read, are written at their schema default:
    Snakemake compares the options with the last run's, so changing one had rerun jobs it does
    not touch (and a project made before reads the same options)."""
    skip = (*skip, *FAST_KEYS.get(section, ()), *(("masks",) if section == "labels" else ()))
    values = {k: v for k, v in config[section].items() if k not in skip}
    if inert:
        default = schema_defaults(section)
        values |= {k: default[k] for k in inert if k in values}
    return cli_args(section, values)


def pretrain_opts(method):
    """Pretraining's options for method `method`, the settings it does not read written at
    their defaults (`stage_opts`' inert settings; `dsf.inits.unread_pretrain_settings`): the
    pretraining's norm_tiles (the norm rule samples them), mask_ratio but for the masking
    methods."""
    inert = tuple(sorted({"norm_tiles"} | unread_pretrain_settings(method)))
    return stage_opts("pretrain", skip=("method", "methods", "scope"), inert=inert)


def finetune_opts(finit):
    """Fine-tuning's options for init `finit`, the settings it does not read written at their
    defaults (`stage_opts`' inert settings; `dsf.finetune.unread_settings`)."""
    inert = tuple(sorted(unread_settings(finit)))
    return stage_opts("finetune", skip=("init", "inits", "fractions"), inert=inert)


def stage_process(stage, argv, log, files=None):
    """Run `dsf <stage> <argv>` (as `python -m dsf`) in a process of its own, its messages in
    `log`, for a rule's `run:` block; `files` (name -> text) are written to a temporary folder
    first, and `{name}` in `argv` becomes its path (a cohort's sheet records outgrow the 128 KiB
    one command-line argument may hold); arguments past 100 kB go in a file of their own
    (`dsf <stage> --args-file`: a whole command line holds 2 MiB, some 16,000 map paths). A
    `run:` rule, not a `script:` one: Snakemake reruns a script rule whenever the script's file
    is newer than its outputs, so a fresh clone or a checkout reran the folds and every fold's
    jobs after them; a run block is compared by its text. Its own process keeps the stage's
    logging set-up out of Snakemake's."""
    import subprocess
    import sys
    import tempfile

    out = Path(log).parent
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".stage-") as tmp:
        paths = {}
        for name, text in (files or {}).items():
            paths[name] = Path(tmp) / name
            paths[name].write_text(text)
        argv = [str(paths.get(a.strip("{}"), a)) if a.startswith("{") else str(a) for a in argv]
        argv = spill_args(argv, Path(tmp))
        with open(log, "w") as fh:
            done = subprocess.run([sys.executable, "-m", "dsf", stage, *argv], stderr=fh)
    if done.returncode:
        from snakemake.exceptions import WorkflowError

        raise WorkflowError(f"dsf {stage} failed (exit {done.returncode}): see {log}")


def check_results_writable():
    """Refuse a results folder that cannot be written, once, before any job (the Snakefile's
    onstart: a real run only; while the Snakefile is read, a dry run is not known yet, and a
    dry run of an archived, read-only project must pass): not the first job's mkdir, in
    Snakemake's words."""
    from dsf.runner import check_writable

    check_writable(Path(RESULTS), "results")


def list_job_warnings():
    """Log the warnings of the job logs this run wrote, when it ends (the Snakefile's
    onsuccess/onerror): Snakemake shows a log only when its job fails. A second of slack for
    file systems that keep whole seconds."""
    logs = Path(RESULTS) / "logs"
    if text := warnings_summary(job_warnings(logs, RUN_STARTED - 1.0), logs):
        logging.getLogger("dsf").warning(text)


def polygon_exts(polygons):
    """Suffixes of the polygon files beside each map (polygons.enabled, polygons.imagescope)."""
    if not polygons["enabled"]:
        return []
    return ["geojson"] + (["xml"] if polygons["imagescope"] else [])


def data_outputs():
    """What `snakemake data` builds: the CPU stages before any training (tissue, label masks,
    patch stores, labels stores of the annotated slides, folds), e.g. on a cluster's CPU nodes
    before the GPU jobs."""
    tissue = expand(
        f"{RESULTS}/tissue/{{slide}}.{{ext}}", slide=SLIDES, ext=["tiff", "jpg", "json"]
    )
    if APPLY:  # a prediction run reads patch stores only for apply.tile_protocol
        scored = labelled_stores() if TILE_SCORED else {"stores": [], "label_stores": []}
        return [*tissue, *scored["stores"], *scored["label_stores"]]
    stores = expand(f"{RESULTS}/patches/{{slide}}.zarr", slide=SLIDES)
    labelled = labelled_stores()["label_stores"]
    folds = [f"{RESULTS}/folds.tsv"] if FINETUNING else []
    return [*tissue, *stores, *labelled, *folds]


def all_targets(wildcards):
    """Rule all's inputs. A run that would fail at fine-tuning stops now, not after the data
    stages and a pretraining (hours on GPUs) that a fix would redo: more annotated patients
    change the folds, another geometry the patch stores. `snakemake data` and `--until` ask
    for less and pass; a dry run, which spends nothing, shows its plan under the warning."""
    chosen = workflow.dag_settings
    partial = chosen is not None and bool(chosen.until or chosen.omit_from)
    if FINETUNE_PROBLEMS and not partial and not workflow.dryrun:
        from dsf.errors import ConfigError

        raise ConfigError(
            "fine-tuning cannot run: "
            + "; ".join(FINETUNE_PROBLEMS)
            + ". Fix this first, or run the stages before fine-tuning alone: `snakemake data` "
            "(tissue, patches, labels, folds) or `--until pretrain`"
        )
    return all_outputs()


def all_outputs():
    """Every artifact the stages built so far produce."""
    pretrained = expand(
        f"{RESULTS}/pretrain/{{init}}/{{unit}}/encoders.pt", init=INITS, unit=PRETRAIN_UNITS
    )
    finetuned = expand(
        f"{RESULTS}/finetune/{{finit}}/frac{{frac}}/fold{{fold}}/model.pt",
        finit=FINITS, frac=FRACS, fold=FOLD_IDS,
    )
    maps = expand(
        f"{RESULTS}/maps/{{finit}}/{{slide}}.{{ext}}",
        finit=INFER_INITS, slide=SLIDES,
        ext=["tiff", "jpg", "json"]
        + polygon_exts(config["polygons"])
        # asked for, so that turning infer.probabilities on after a run writes them
        + (["probs.zarr"] if config["infer"]["probabilities"] else []),
    ) + expand(f"{RESULTS}/maps/{{finit}}/areas.tsv", finit=INFER_INITS)
    evaluated = [
        f"{RESULTS}/eval/{name}"
        for name in ("tables.md", "tile_scores.tsv", "slide_scores.tsv", "figure.png")
    ]
    # what `snakemake --report` shows besides the outputs above (report.smk)
    reported = [
        *expand(
            f"{RESULTS}/report/curves/pretrain/{{init}}/{{unit}}.png",
            init=INITS, unit=PRETRAIN_UNITS,
        ),
        *expand(
            f"{RESULTS}/report/curves/finetune/{{finit}}/frac{{frac}}/fold{{fold}}.png",
            finit=FINITS, frac=FRACS, fold=FOLD_IDS,
        ),
        f"{RESULTS}/report/tables.html",
    ]
    tissue = expand(
        [
            f"{RESULTS}/tissue/{{slide}}.tiff",
            f"{RESULTS}/tissue/{{slide}}.jpg",
            f"{RESULTS}/tissue/{{slide}}.json",
        ],
        slide=SLIDES,
    )
    if APPLY:  # a prediction run: the maps of the given models (scored where annotated)
        scored = ["tables.md", "slide_scores.tsv", "figure.png"] if LABELLED else []
        scored += ["tile_scores.tsv"] if TILE_SCORED else []
        scored = [f"{RESULTS}/eval/{name}" for name in scored]
        return [*tissue, *maps, *scored, *([f"{RESULTS}/report/tables.html"] if scored else [])]
    if not FINETUNING:
        finetuned, maps, evaluated = [], [], []
        reported = [r for r in reported if "/curves/pretrain/" in r]
    patches = expand(f"{RESULTS}/patches/{{slide}}.zarr", slide=SLIDES)
    folds = [f"{RESULTS}/folds.tsv"] if FINETUNING else []
    return [
        *folds, *pretrained, *finetuned, *maps, *evaluated, *reported,
        *tissue, *patches,
    ]  # fmt: skip
