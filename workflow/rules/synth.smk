# Synthetic H&E-like slides with their annotations (demo, tests, benchmarks).


rule synth:
    wildcard_constraints:
        slide="|".join(map(__import__("re").escape, SYNTH)) or "(?!)",
    output:
        slide=f"{RESULTS}/synth/{{slide}}.tiff",
        mask=f"{RESULTS}/synth/{{slide}}.labels.tiff",
        geojson=f"{RESULTS}/synth/{{slide}}.geojson",
    params:
        spec=lambda w: "--seed {seed} --width {width} --height {height}".format(
            **config["synth"]["slides"][w.slide]
        ),
        opts=stage_opts("synth", skip=("slides",)),
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/synth/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/synth/{{slide}}.tsv"
    shell:
        "dsf synth --out {output.slide:q} --labels-tiff {output.mask:q} "
        "--labels-geojson {output.geojson:q} {params.spec} {params.opts} 2> {log:q}"
