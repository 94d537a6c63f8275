# Self-supervised DSF-WSI pretraining, per pretraining method ({init}) and unit: fold{k} = on
# fold k's training slides only (pretrain.scope fold), all = on every slide (scope all).
# checkpoint.pt is deliberately not a declared output: Snakemake deletes the outputs of a failed
# job, and a killed job must resume from its last checkpoint.


rule pretrain:
    input:
        unpack(lambda w: norm_input(w.unit)),
        unpack(lambda w: split_input(w.unit)),
        # a local weights file both encoders start from: replaced, it reruns the pretraining
        unpack(lambda w: {"weights": p} if (p := config["pretrain"]["weights"]) else {}),
        stores=lambda w: train_stores(w.unit),
    output:
        encoders=f"{RESULTS}/pretrain/{{init}}/{{unit}}/encoders.pt",
        log_tsv=f"{RESULTS}/pretrain/{{init}}/{{unit}}/log.tsv",
    params:
        out_dir=lambda w, output: os.path.dirname(output.encoders),
        fold=split_opt,
        # the norm rule samples norm_tiles; pretraining is given its result or the mean/std
        opts=lambda w: pretrain_opts(w.init),
        fast=fast_param("pretrain"),
        launch=fast_param("launch_pretrain"),
        norm=norm_opt,
    # per process (one per GPU): its loader workers and itself
    threads: (config["pretrain"]["workers"] + 1) * max(1, config["pretrain"]["gpus"])
    resources:
        gpu=config["pretrain"]["gpus"],
        # per process: the tile ring in /dev/shm (1.8 GiB at 8 workers, batch 32 of 1024 px),
        # the workers (about 0.5 GB each) and the training process
        # the same at every retry: a retry mostly follows a time limit (16, 32, 48 GB per GPU
        # had outgrown 4-GPU nodes), and the need does not grow with the epochs
        mem_mb=16000 * max(1, config["pretrain"]["gpus"]),
        # a retry resumes from the last checkpoint and adds epochs: one job's 24 h each time
        # (a growing request would outgrow the 24-48 h most GPU partitions cap a job at)
        runtime=1440,
        # torchrun starts every process on one machine
        nodes=1,
        # SIGUSR1 5 minutes before the time limit: the job checkpoints where it is and its
        # retry resumes there (dsf.pretrain.STOP_SIGNALS; a site's own slurm_extra replaces it).
        # Where SLURM tracks processes by cgroup the signal ends Snakemake's job step instead:
        # pretraining in a SLURM job also stops by itself before the time squeue says it has.
        # torchrun (several GPUs) dies of SIGUSR1, leaving its ranks behind: it forwards SIGTERM
        slurm_extra=(
            "--signal=USR1@300" if config["pretrain"]["gpus"] <= 1 else "--signal=TERM@300"
        ),
    conda:
        "../../envs/dsf.yaml"
    log:
        f"{RESULTS}/logs/pretrain/{{init}}/{{unit}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{init}}/{{unit}}.tsv"
    shell:
        "{params.launch} --stores {input.stores:q} {params.fold} "
        "--out-dir {params.out_dir:q} --method {wildcards.init} --resume "
        "--no-progress {params.opts} {params.fast} {params.norm} 2> {log:q}"
