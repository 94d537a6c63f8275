# Prediction polygons: each class map traced into QuPath GeoJSON over its slide (level-0 px),
# to review the predictions as annotations on the slide (polygons.enabled), and optionally as
# Aperio ImageScope XML (polygons.imagescope).


rule polygons:
    input:
        map=f"{RESULTS}/maps/{{finit}}/{{slide}}.tiff",
        meta=f"{RESULTS}/maps/{{finit}}/{{slide}}.json",
        slide=slide_path,
    output:
        geojson=f"{RESULTS}/maps/{{finit}}/{{slide}}.geojson",
        # the same polygons for Aperio ImageScope (polygons.imagescope)
        **(
            {"xml": f"{RESULTS}/maps/{{finit}}/{{slide}}.xml"}
            if config["polygons"]["imagescope"]
            else {}
        ),
    params:
        slide=slide_read_opts,
        opts=stage_opts("polygons", skip=("enabled",)),
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/polygons/{{finit}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/polygons/{{finit}}/{{slide}}.tsv"
    shell:
        "dsf polygons --map {input.map:q} --map-json {input.meta:q} --slide {input.slide:q} "
        "{params.slide} --out {output.geojson:q} {params.opts} 2> {log:q}"
