# Evaluation against the annotations (DESIGN section 4, Evaluate): the paper's tile protocol per
# init x fraction x fold on the fold's labelled validation slides, the whole-slide protocol per
# init x labelled slide on its out-of-fold class map, then the tables and the figure.

# INFER_INITS (common.smk): the inits that get maps; the maps' JSON states the label fraction
# of the models that drew them (infer.fraction).


rule evaluate_tiles:
    input:
        # the labelled validation slides of the fold (maybe none: the table says n/a)
        unpack(lambda w: labelled_stores(w.fold)),
        model=f"{RESULTS}/finetune/{{finit}}/frac{{frac}}/fold{{fold}}/model.pt",
        folds=f"{RESULTS}/folds.tsv",
    output:
        tsv=f"{RESULTS}/eval/tiles/{{finit}}/frac{{frac}}/fold{{fold}}.tsv",
    params:
        opts=stage_opts("evaluate", skip=("panel_slides", "panel_size")),
        fast=fast_param("evaluate_tiles"),
        folds=lambda w, input: (
            f"--folds {shlex.quote(input.folds)}" if "folds" in input.keys() else ""
        ),
        method="",
    threads: 1
    resources:
        gpu=config["evaluate"]["gpus"],
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/evaluate/tiles/{{finit}}/frac{{frac}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/tiles/{{finit}}/frac{{frac}}/fold{{fold}}.tsv"
    shell:
        "dsf evaluate tiles --model {input.model:q} --stores {input.stores:q} "
        "--label-stores {input.label_stores:q} "
        "{params.folds} {params.method} --out {output.tsv:q} {params.opts} {params.fast} "
        "2> {log:q}"


# apply.tile_protocol: one model of a prediction run's name on every annotated slide's store
# (no folds: the models were trained elsewhere; their own fit/selection slides are refused)
use rule evaluate_tiles as evaluate_tiles_model with:
    input:
        unpack(lambda w: labelled_stores()),
        model=lambda w: APPLY[w.finit][int(w.member)],
    output:
        tsv=f"{RESULTS}/eval/tiles/{{finit}}/model{{member}}.tsv",
    params:
        opts=stage_opts("evaluate", skip=("panel_slides", "panel_size")),
        fast=fast_param("evaluate_tiles"),
        folds="",
        method=lambda w: f"--method {shlex.quote(w.finit)}",
    log:
        f"{RESULTS}/logs/evaluate/tiles/{{finit}}/model{{member}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/tiles/{{finit}}/model{{member}}.tsv"


rule evaluate_slide:
    input:
        unpack(labels_input),
        map=f"{RESULTS}/maps/{{finit}}/{{slide}}.tiff",
        meta=f"{RESULTS}/maps/{{finit}}/{{slide}}.json",
        slide=slide_path,
        # a prediction run has no folds: its models were trained elsewhere
        **({} if APPLY else {"folds": f"{RESULTS}/folds.tsv"}),
    output:
        tsv=f"{RESULTS}/eval/slides/{{finit}}/{{slide}}.tsv",
        panel=f"{RESULTS}/eval/slides/{{finit}}/{{slide}}.panel.npz",
    params:
        slide=slide_read_opts,
        opts=stage_opts("evaluate", skip=("amp", "panel_slides")),
        fast=fast_param("evaluate_slide"),
        classes=stage_opts("labels"),
        folds=lambda w, input: (
            f"--folds {shlex.quote(input.folds)}" if "folds" in input.keys() else ""
        ),
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/evaluate/slides/{{finit}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/slides/{{finit}}/{{slide}}.tsv"
    shell:
        "dsf evaluate slide --map {input.map:q} --map-json {input.meta:q} "
        "--slide {input.slide:q} {params.slide} --labels {input.labels:q} {params.folds} "
        "--method {wildcards.finit} --out {output.tsv:q} --panel {output.panel:q} "
        "{params.opts} {params.fast} {params.classes} 2> {log:q}"


# apply.each_model: one model of a prediction run's name alone on an annotated slide
use rule evaluate_slide as evaluate_slide_model with:
    input:
        unpack(labels_input),
        map=f"{RESULTS}/maps/{{finit}}/model{{member}}/{{slide}}.tiff",
        meta=f"{RESULTS}/maps/{{finit}}/model{{member}}/{{slide}}.json",
        slide=slide_path,
    output:
        tsv=f"{RESULTS}/eval/slides/{{finit}}/model{{member}}/{{slide}}.tsv",
        panel=temp(f"{RESULTS}/eval/slides/{{finit}}/model{{member}}/{{slide}}.panel.npz"),
    log:
        f"{RESULTS}/logs/evaluate/slides/{{finit}}/model{{member}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/slides/{{finit}}/model{{member}}/{{slide}}.tsv"


# the paper's tables over folds (the usual run)
if not APPLY:

    rule evaluate_tables:
        input:
            tiles=expand(
                f"{RESULTS}/eval/tiles/{{finit}}/frac{{frac}}/fold{{fold}}.tsv",
                finit=FINITS, frac=FRACS, fold=FOLD_IDS,
            ),
            slides=expand(
                f"{RESULTS}/eval/slides/{{finit}}/{{slide}}.tsv",
                finit=INFER_INITS, slide=sorted(LABELLED),
            ),
            panels=expand(
                f"{RESULTS}/eval/slides/{{finit}}/{{slide}}.panel.npz",
                finit=INFER_INITS, slide=sorted(LABELLED),
            ),
            folds=f"{RESULTS}/folds.tsv",
        output:
            markdown=report(
                f"{RESULTS}/eval/tables.md",
                caption="../report/tables_md.rst",
                category="5. Evaluation",
                subcategory="all folds",
                labels={"result": "tables (markdown, download)"},
            ),
            tile_scores=report(
                f"{RESULTS}/eval/tile_scores.tsv",
                caption="../report/tile_scores.rst",
                category="5. Evaluation",
                subcategory="all folds",
                labels={"result": "tile scores (TSV, download)"},
            ),
            slide_scores=report(
                f"{RESULTS}/eval/slide_scores.tsv",
                caption="../report/slide_scores.rst",
                category="5. Evaluation",
                subcategory="all folds",
                labels={"result": "whole-slide scores (TSV, download)"},
            ),
            figure=report(
                f"{RESULTS}/eval/figure.png",
                caption="../report/figure.rst",
                category="5. Evaluation",
                subcategory="all folds",
                labels={"result": "figure"},
            ),
        params:
            methods=" ".join(shlex.quote(m) for m in FINITS),
            fractions=" ".join(FRACS),
            opts=stage_opts("evaluate", skip=("amp", "panel_size")),
        threads: 1
        resources:
            mem_mb=lambda wildcards, attempt: 2000 * attempt,
            runtime=lambda wildcards, attempt: 60 * attempt,
        conda:
            "../../envs/dsf.yaml"
        log:
            f"{RESULTS}/logs/evaluate/tables.log",
        benchmark:
            f"{RESULTS}/benchmarks/evaluate/tables.tsv"
        shell:
            "dsf evaluate tables --tiles {input.tiles:q} --slides {input.slides:q} "
            "--panels {input.panels:q} --folds {input.folds:q} --methods {params.methods} "
            "--fractions {params.fractions} --markdown {output.markdown:q} "
            "--tile-scores {output.tile_scores:q} --slide-scores {output.slide_scores:q} "
            "--figure {output.figure:q} {params.opts} 2> {log:q}"

else:
    # a prediction run (apply.models): the whole-slide protocol over its labelled slides
    rule evaluate_cohort:
        input:
            slides=expand(
                f"{RESULTS}/eval/slides/{{finit}}/{{slide}}.tsv",
                finit=INFER_INITS, slide=sorted(LABELLED),
            ),
            panels=expand(
                f"{RESULTS}/eval/slides/{{finit}}/{{slide}}.panel.npz",
                finit=INFER_INITS, slide=sorted(LABELLED),
            ),
            # apply.each_model: each model of a name alone
            members=member_scores(),
            # apply.tile_protocol: every model of a name on the annotated slides' stores
            tiles=member_tile_scores(),
        output:
            **(
                {
                    "tile_scores": report(
                        f"{RESULTS}/eval/tile_scores.tsv",
                        caption="../report/tile_scores.rst",
                        category="5. Evaluation",
                        subcategory="all slides",
                        labels={"result": "tile scores (TSV, download)"},
                    )
                }
                if TILE_SCORED
                else {}
            ),
            markdown=report(
                f"{RESULTS}/eval/tables.md",
                caption="../report/tables_md.rst",
                category="5. Evaluation",
                subcategory="all slides",
                labels={"result": "tables (markdown, download)"},
            ),
            slide_scores=report(
                f"{RESULTS}/eval/slide_scores.tsv",
                caption="../report/slide_scores.rst",
                category="5. Evaluation",
                subcategory="all slides",
                labels={"result": "whole-slide scores (TSV, download)"},
            ),
            figure=report(
                f"{RESULTS}/eval/figure.png",
                caption="../report/figure.rst",
                category="5. Evaluation",
                subcategory="all slides",
                labels={"result": "figure"},
            ),
        params:
            methods=" ".join(shlex.quote(m) for m in INFER_INITS),
            tile_scores=lambda w, output: (
                f"--tile-scores {shlex.quote(output.tile_scores)}"
                if "tile_scores" in output.keys()
                else ""
            ),
            opts=stage_opts("evaluate", skip=("amp", "panel_size")),
        threads: 1
        resources:
            mem_mb=lambda wildcards, attempt: 2000 * attempt,
            runtime=lambda wildcards, attempt: 60 * attempt,
        conda:
            "../../envs/dsf.yaml"
        log:
            f"{RESULTS}/logs/evaluate/tables.log",
        benchmark:
            f"{RESULTS}/benchmarks/evaluate/tables.tsv"
        shell:
            "dsf evaluate cohort --slides {input.slides:q} --panels {input.panels:q} "
            "--model-slides {input.members:q} --tiles {input.tiles:q} {params.tile_scores} "
            "--methods {params.methods} "
            "--markdown {output.markdown:q} --slide-scores {output.slide_scores:q} "
            "--figure {output.figure:q} {params.opts} 2> {log:q}"
