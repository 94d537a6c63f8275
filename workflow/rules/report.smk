# What `snakemake --report results/report.html` shows besides the outputs the stage rules flag
# with report(): training curves per run as PNGs and the evaluation tables as an HTML page
# (the report displays images and HTML, not markdown). Captions: workflow/report/*.rst.


rule curves_pretrain:
    input:
        log_tsv=f"{RESULTS}/pretrain/{{init}}/{{unit}}/log.tsv",
    output:
        png=report(
            f"{RESULTS}/report/curves/pretrain/{{init}}/{{unit}}.png",
            caption="../report/curves_pretrain.rst",
            category="2. Pretraining curves",
            subcategory=lambda w: (
                "all slides" if w.unit == "all" else w.unit.replace("fold", "fold ")
            ),
            labels={"init": "{init}"},
        ),
    params:
        fold=lambda w: "" if w.unit == "all" else f"--fold {w.unit.removeprefix('fold')}",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/report/curves/pretrain/{{init}}/{{unit}}.log",
    shell:
        "dsf curves pretrain --log {input.log_tsv:q} --init {wildcards.init} {params.fold} "
        "--out {output.png:q} 2> {log:q}"


rule curves_finetune:
    input:
        history=f"{RESULTS}/finetune/{{finit}}/frac{{frac}}/fold{{fold}}/history.tsv",
    output:
        png=report(
            f"{RESULTS}/report/curves/finetune/{{finit}}/frac{{frac}}/fold{{fold}}.png",
            caption="../report/curves_finetune.rst",
            category="3. Fine-tuning curves",
            subcategory="fold {fold}",
            labels=lambda w: {"init": w.finit, "label fraction": f"{float(w.frac) * 100:g}%"},
        ),
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/report/curves/finetune/{{finit}}/frac{{frac}}/fold{{fold}}.log",
    shell:
        "dsf curves finetune --history {input.history:q} --init {wildcards.finit} "
        "--fraction {wildcards.frac} --fold {wildcards.fold} --out {output.png:q} 2> {log:q}"


rule report_tables:
    input:
        markdown=f"{RESULTS}/eval/tables.md",
    output:
        html=report(
            f"{RESULTS}/report/tables.html",
            caption="../report/tables.rst",
            category="5. Evaluation",
            subcategory="all slides" if APPLY else "all folds",
            labels={"result": "tables"},
        ),
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/report/tables.log",
    shell:
        "dsf curves tables --markdown {input.markdown:q} --out {output.html:q} 2> {log:q}"
