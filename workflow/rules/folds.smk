# Cross-validation folds over the slides, grouped by patient (the sheet's `group` column).


rule folds:
    output:
        f"{RESULTS}/folds.tsv",
    params:
        sheet=SHEET[["slide", "group", "fold"]]
        .assign(labelled=SHEET.index.isin(LABELLED))
        .to_json(orient="records"),
        opts=stage_opts("folds"),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/folds.log",
    benchmark:
        f"{RESULTS}/benchmarks/folds.tsv"
    script:
        "../scripts/folds.py"
