# Self-supervised DSF-WSI pretraining, per pretraining method ({init}) and unit: fold{k} = on
# fold k's training slides only (pretrain.scope fold), all = on every slide (scope all).
# checkpoint.pt is deliberately not a declared output: Snakemake deletes the outputs of a failed
# job, and a killed job must resume from its last checkpoint.


rule pretrain:
    input:
        unpack(lambda w: norm_input(w.unit)),
        unpack(lambda w: split_input(w.unit)),
        stores=lambda w: train_stores(w.unit),
    output:
        encoders=f"{RESULTS}/pretrain/{{init}}/{{unit}}/encoders.pt",
        log_tsv=f"{RESULTS}/pretrain/{{init}}/{{unit}}/log.tsv",
    params:
        out_dir=lambda w, output: os.path.dirname(output.encoders),
        fold=split_opt,
        launch=pretrain_launcher(),
        opts=stage_opts("pretrain", skip=("method", "methods", "scope")),
        norm=norm_opt,
    # loader workers are per process, one process per GPU
    threads: max(1, config["pretrain"]["workers"]) * max(1, config["pretrain"]["gpus"])
    resources:
        gpu=config["pretrain"]["gpus"],
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/pretrain/{{init}}/{{unit}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{init}}/{{unit}}.tsv"
    shell:
        "{params.launch} --stores {input.stores:q} {params.fold} "
        "--out-dir {params.out_dir:q} --method {wildcards.init} --resume "
        "--no-progress {params.opts} {params.norm} 2> {log:q}"
