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
        # with the given pretrain.mean/std: in opts, a param Snakemake compares with the last
        # run's (one of the input, as `norm` is, it never compares), so a change reruns
        opts=lambda w: finetune_opts(w.finit) + given_norm_opts(),
        fast=fast_param("finetune"),
        # of the labels settings only the classes: the tiles are labelled already
        classes=cli_args("labels", {"classes": config["labels"]["classes"]}),
        # a computed normalisation (results/norm/): the file, an input
        norm=norm_opt,
    # its loader workers and itself
    threads: config["finetune"]["workers"] + 1
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
