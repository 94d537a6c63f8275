# Tissue mask, QC overlay and stats per slide, from a low-magnification thumbnail.


rule tissue:
    input:
        slide=slide_path,
    output:
        mask=f"{RESULTS}/tissue/{{slide}}.tiff",
        overlay=report(
            f"{RESULTS}/tissue/{{slide}}.jpg",
            caption="../report/tissue.rst",
            category="1. Tissue",
            subcategory="{slide}",
            labels={"slide": "{slide}", "figure": "tissue overlay"},
        ),
        stats=f"{RESULTS}/tissue/{{slide}}.json",
    params:
        slide=slide_read_opts,
        # min_saturation is method otsu's alone
        opts=stage_opts(
            "tissue", inert=("min_saturation",) if config["tissue"]["method"] != "otsu" else ()
        ),
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/tissue/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tissue/{{slide}}.tsv"
    shell:
        "dsf tissue --slide {input.slide:q} {params.slide} "
        "--mask {output.mask:q} --overlay {output.overlay:q} --stats {output.stats:q} "
        "{params.opts} 2> {log:q}"
