# Input normalisation per pretraining unit (pretrain.mean/std null): the per-channel mean and std
# of pretrain.norm_tiles tiles drawn from the unit's training stores (a fold's never include its
# validation slides), read by the unit's pretraining and by its folds' fine-tuning.


rule norm:
    input:
        unpack(lambda w: split_input(w.unit)),
        stores=lambda w: train_stores(w.unit),
    output:
        f"{RESULTS}/norm/{{unit}}.json",
    params:
        fold=split_opt,
        tiles=config["pretrain"]["norm_tiles"],
        seed=config["pretrain"]["seed"],
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/norm/{{unit}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/norm/{{unit}}.tsv"
    shell:
        "dsf norm --stores {input.stores:q} {params.fold} "
        "--out {output:q} --norm-tiles {params.tiles} --seed {params.seed} --no-progress "
        "2> {log:q}"
