# Cross-validation folds over the slides, grouped by patient (the sheet's `group` column).


# Rerun when the split changes, not on every edit of the sheet: folds.tsv is an input of every
# pretraining, fine-tuning and score of a fold, so rewriting it (even unchanged) would rerun
# them all, e.g. for a slide annotated with its fold kept in the sheet (`dsf sheet --folds`).
# The split compared is FOLDS (`split_key`: by slide, so reordered sheet rows are the same
# split), which common.smk computes from the sheet with the same
# `assign_folds` the job runs; the sheet's records reach the job as a param Snakemake derives
# from the job and does not compare (`fast_param`), written to a file for `dsf folds` by the
# run block (`stage_process`).
SHEET_RECORDS = (
    SHEET[["slide", "group", "fold"]]
    .assign(labelled=SHEET.index.isin(LABELLED))
    .to_json(orient="records")
)


rule folds:
    output:
        f"{RESULTS}/folds.tsv",
    params:
        split=split_key(FOLDS),
        sheet=lambda wildcards, threads: SHEET_RECORDS,
        opts=stage_opts("folds"),
    resources:
        mem_mb=1000,
        runtime=10,
    log:
        f"{RESULTS}/logs/folds.log",
    benchmark:
        f"{RESULTS}/benchmarks/folds.tsv"
    run:
        argv = ["--sheet-file", "{sheet.json}", "--out", output[0], *shlex.split(params.opts)]
        stage_process("folds", argv, log[0], {"sheet.json": params.sheet})
