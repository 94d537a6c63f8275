# HookNet fine-tuning per init ({finit}: random, unet or a pretraining method), label fraction
# and fold, on the fold's annotated training slides; model selection on held-out ones.


rule finetune:
    input:
        unpack(finetune_inputs),
        folds=f"{RESULTS}/folds.tsv",
    output:
        model=f"{RESULTS}/finetune/{{finit}}/frac{{frac}}/fold{{fold}}/model.pt",
        history=f"{RESULTS}/finetune/{{finit}}/frac{{frac}}/fold{{fold}}/history.tsv",
    params:
        out_dir=lambda w, output: os.path.dirname(output.model),
        encoders=lambda w, input: (
            f"--encoders {shlex.quote(input.encoders)}" if "encoders" in input.keys() else ""
        ),
        opts=stage_opts("finetune", skip=("init", "inits", "fractions")),
        fast=fast_param("finetune"),
        classes=stage_opts("labels", skip=("class_map", "other_class", "names", "geojson_names")),
        # the pretraining's normalisation: computed (results/norm/) or pretrain.mean/std
        norm=lambda w, input: (
            norm_opt(w, input)
            if NORM_COMPUTED
            else " ".join(
                ["--norm-mean", *map(repr, config["pretrain"]["mean"])]
                + ["--norm-std", *map(repr, config["pretrain"]["std"])]
            )
        ),
    threads: max(1, config["finetune"]["workers"])
    resources:
        gpu=config["finetune"]["gpus"],
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=720,  # a retry resumes from its last epoch's checkpoint
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/finetune/{{finit}}/frac{{frac}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune/{{finit}}/frac{{frac}}/fold{{fold}}.tsv"
    shell:
        "dsf finetune --stores {input.stores:q} --label-stores {input.label_stores:q} --folds {input.folds:q} --fold {wildcards.fold} "
        "--fraction {wildcards.frac} --init {wildcards.finit} {params.encoders} "
        "--out-dir {params.out_dir:q} --resume {params.opts} {params.fast} {params.classes} "
        "{params.norm} 2> {log:q}"
