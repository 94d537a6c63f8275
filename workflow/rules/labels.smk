# One label mask per slide annotated by per-class binary masks (labels.masks, PAIP's whole and
# viable tumour), or with labels.base by any annotation, with the tissue outside them as
# labels.base; patches and evaluate read it.


rule labels:
    input:
        unpack(mask_inputs),
        slide=slide_path,
    output:
        tiff=f"{RESULTS}/labels/{{slide}}.tiff",
    params:
        slide=labels_read_opts,
        masks=mask_opts,
        mpp=setting_value("patches", "target_mpp", config["patches"]["target_mpp"]),
        rgb_max=" ".join(str(v) for v in config["tissue"]["rgb_max"]),
        classes=stage_opts("labels"),
    threads: config["patches"]["threads"]
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/labels/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/labels/{{slide}}.tsv"
    shell:
        "dsf labels --slide {input.slide:q} {params.slide} {params.masks} --out {output.tiff:q} "
        "--mpp {params.mpp} --rgb-max {params.rgb_max} --threads {threads} --no-progress "
        "{params.classes} 2> {log:q}"
