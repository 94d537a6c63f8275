# Stitched whole-slide inference per fine-tuning init ({finit}) and slide: a pyramidal class map
# (OpenSlide/QuPath), an overlay and metadata. infer_routing (common.smk) picks the models: an
# annotated slide is predicted by the model of the fold that held it out, others by all folds.


rule infer:
    input:
        unpack(infer_inputs),
    output:
        map=f"{RESULTS}/maps/{{finit}}/{{slide}}.tiff",
        overlay=report(
            f"{RESULTS}/maps/{{finit}}/{{slide}}.jpg",
            caption="../report/map.rst",
            category="4. Maps",
            subcategory="{slide}",
            labels={"slide": "{slide}", "init": "{finit}"},
        ),
        meta=f"{RESULTS}/maps/{{finit}}/{{slide}}.json",
        # infer.probabilities: an output too, so a failed job's is removed with the map's
        **(
            {"probs": directory(f"{RESULTS}/maps/{{finit}}/{{slide}}.probs.zarr")}
            if config["infer"]["probabilities"]
            else {}
        ),
    params:
        slide=slide_read_opts,
        routing=lambda w: infer_routing(w.slide)[0],
        probs=lambda w, output: (
            f"--out-probs {shlex.quote(output.probs)}" if "probs" in output.keys() else ""
        ),
        opts=stage_opts("infer", skip=("inits", "fraction", "unlabelled_fold", "probabilities")),
        fast=fast_param("infer"),
    threads: config["infer"]["threads"]
    resources:
        gpu=config["infer"]["gpus"],
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        # about a minute a slide on a GPU (bench/RESULTS.md); hours on a CPU
        runtime=lambda wildcards, attempt: (120 if config["infer"]["gpus"] else 720) * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/infer/{{finit}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/infer/{{finit}}/{{slide}}.tsv"
    shell:
        "dsf infer --slide {input.slide:q} {params.slide} --tissue-mask {input.mask:q} "
        "--models {input.models:q} --routing {params.routing} --out-map {output.map:q} "
        "--out-overlay {output.overlay:q} --out-meta {output.meta:q} {params.probs} "
        "--threads {threads} --no-progress {params.opts} {params.fast} 2> {log:q}"


# apply.each_model: one model of a prediction run's name alone on an annotated slide, for the
# mean (std) over the models (evaluate_slide_model, evaluate_cohort)
use rule infer as infer_model with:
    input:
        unpack(member_infer_inputs),
    output:
        map=f"{RESULTS}/maps/{{finit}}/model{{member}}/{{slide}}.tiff",
        overlay=f"{RESULTS}/maps/{{finit}}/model{{member}}/{{slide}}.jpg",
        meta=f"{RESULTS}/maps/{{finit}}/model{{member}}/{{slide}}.json",
    params:
        slide=slide_read_opts,
        routing="given",
        probs="",
        opts=stage_opts("infer", skip=("inits", "fraction", "unlabelled_fold", "probabilities")),
        fast=fast_param("infer"),
    log:
        f"{RESULTS}/logs/infer/{{finit}}/model{{member}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/infer/{{finit}}/model{{member}}/{{slide}}.tsv"


# per init (or model set): each slide's predicted area per class, in mm² and as a share of the
# mapped area, one table (the counts are in the maps' JSON: no map is read again)
rule areas:
    input:
        maps=lambda w: expand(f"{RESULTS}/maps/{w.finit}/{{slide}}.tiff", slide=SLIDES),
        meta=lambda w: expand(f"{RESULTS}/maps/{w.finit}/{{slide}}.json", slide=SLIDES),
    output:
        report(
            f"{RESULTS}/maps/{{finit}}/areas.tsv",
            caption="../report/areas.rst",
            category="4. Maps",
            subcategory="all slides",
            labels={"slide": "all (TSV, download)", "init": "{finit}"},
        ),
    resources:
        mem_mb=1000,
        runtime=lambda wildcards, attempt: 30 * attempt,
    log:
        f"{RESULTS}/logs/areas/{{finit}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/areas/{{finit}}.tsv"
    run:
        stage_process(
            "areas",
            ["--maps", *input.maps, "--out", output[0], "--method", wildcards.finit],
            log[0],
        )
