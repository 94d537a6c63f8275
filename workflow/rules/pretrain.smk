# Self-supervised DSF-WSI pretraining, per pretraining method ({init}) and fold, on the fold's
# training slides only. checkpoint.pt is deliberately not a declared output: Snakemake deletes
# the outputs of a failed job, and a killed job must resume from its last checkpoint.


rule pretrain:
    input:
        stores=lambda w: train_stores(int(w.fold)),
        folds=f"{RESULTS}/folds.tsv",
    output:
        encoders=f"{RESULTS}/pretrain/{{init}}/fold{{fold}}/encoders.pt",
        log_tsv=f"{RESULTS}/pretrain/{{init}}/fold{{fold}}/log.tsv",
    params:
        out_dir=lambda w, output: os.path.dirname(output.encoders),
        opts=stage_opts("pretrain", skip=("method", "methods")),
    threads: max(1, config["pretrain"]["workers"])
    resources:
        gpu=config["pretrain"]["gpus"],
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/pretrain/{{init}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{init}}/fold{{fold}}.tsv"
    shell:
        "dsf pretrain --stores {input.stores:q} --folds {input.folds:q} --fold {wildcards.fold} "
        "--out-dir {params.out_dir:q} --method {wildcards.init} --resume "
        "--no-progress {params.opts} 2> {log:q}"
