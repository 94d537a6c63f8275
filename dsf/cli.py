"""`dsf <stage> ...`: one console script, one subcommand per stage module.

Each stage module has `main(argv) -> int` and also runs as `python -m dsf.<stage>`.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "sheet": "dsf.sheet",
    "synth": "dsf.synth",
    "tissue": "dsf.tissue",
    "labels": "dsf.labels",
    "patches": "dsf.patches",
    "tile-labels": "dsf.tile_labels",
    "folds": "dsf.folds",
    "norm": "dsf.norm",
    "pretrain": "dsf.pretrain",
    "finetune": "dsf.finetune",
    "infer": "dsf.infer",
    "polygons": "dsf.polygons",
    "evaluate": "dsf.evaluate",
    "curves": "dsf.curves",
}


def pretrain_command(gpus: int) -> list[str]:
    """The command that starts pretraining on `gpus` GPUs: `dsf pretrain`, or above one GPU one
    process per GPU through torchrun (DDP on one node; --standalone picks a free rendezvous
    port, so jobs side by side do not clash)."""
    if gpus > 1:
        torchrun = ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={gpus}"]
        return [*torchrun, "-m", "dsf.pretrain"]
    return ["dsf", "pretrain"]


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a stage's `main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        names = ", ".join(STAGES)
        sys.stderr.write(f"usage: dsf <stage> [options]\nstages: {names}\n")
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage in {"-V", "--version"}:
        from dsf import __version__

        sys.stdout.write(f"dsf {__version__}\n")
        return 0
    if stage not in STAGES:
        sys.stderr.write(f"dsf: unknown stage {stage!r}; stages: {', '.join(STAGES)}\n")
        return 2
    module = importlib.import_module(STAGES[stage])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
