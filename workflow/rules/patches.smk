# Context/target patch pyramids per slide: one sharded Zarr v3 store each, pixels only; the
# labels of an annotated slide's tiles in a store of their own (tile_labels), so editing an
# annotation reruns fine-tuning and evaluation but never a slide's tiles or a pretraining.


rule patches:
    input:
        slide=slide_path,
        mask=f"{RESULTS}/tissue/{{slide}}.tiff",
        stats=f"{RESULTS}/tissue/{{slide}}.json",
    output:
        store=directory(f"{RESULTS}/patches/{{slide}}.zarr"),
    params:
        slide=slide_opts,
        opts=stage_opts("patches", skip=("min_label_frac",)),
        fast=fast_param("patches"),
    threads: config["patches"]["threads"]
    resources:
        # each reader thread holds its strip's level pixels (up to about 450 MB, with PIL's
        # copy, where a slide lacks the level a coarse target needs): 2,371 MB measured at 16
        # threads, 677 MB at 2
        mem_mb=lambda wildcards, threads, attempt: (1200 + 400 * threads) * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/patches/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/patches/{{slide}}.tsv"
    shell:
        "dsf patches --slide {input.slide:q} {params.slide} --tissue-mask {input.mask:q} "
        "--tissue-stats {input.stats:q} --out {output.store:q} --no-progress "
        "--threads {threads} {params.opts} {params.fast} 2> {log:q}"


rule tile_labels:
    input:
        unpack(labels_input),
        store=f"{RESULTS}/patches/{{slide}}.zarr",
    output:
        store=directory(f"{RESULTS}/patches/{{slide}}.labels.zarr"),
    params:
        min_frac=setting_value("patches", "min_label_frac", config["patches"]["min_label_frac"]),
        classes=stage_opts("labels"),
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/tile_labels/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tile_labels/{{slide}}.tsv"
    shell:
        "dsf tile-labels --store {input.store:q} --labels {input.labels:q} "
        "--out {output.store:q} --min-label-frac {params.min_frac} --no-progress "
        "{params.classes} 2> {log:q}"
