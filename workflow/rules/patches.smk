# Context/target patch pyramids per slide: one sharded Zarr v3 store each.


rule patches:
    input:
        unpack(labels_input),
        slide=slide_path,
        mask=f"{RESULTS}/tissue/{{slide}}.tiff",
        stats=f"{RESULTS}/tissue/{{slide}}.json",
    output:
        store=directory(f"{RESULTS}/patches/{{slide}}.zarr"),
    params:
        slide=slide_opts,
        labels=labels_opt,
        opts=patches_opts,
        fast=fast_param("patches"),
        classes=patches_label_opts,
    threads: config["patches"]["threads"]
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/patches/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/patches/{{slide}}.tsv"
    shell:
        "dsf patches --slide {input.slide:q} {params.slide} --tissue-mask {input.mask:q} "
        "--tissue-stats {input.stats:q} {params.labels} --out {output.store:q} --no-progress "
        "--threads {threads} {params.opts} {params.fast} {params.classes} 2> {log:q}"
