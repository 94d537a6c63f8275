"""`dsf <stage> ...`: one console script, one subcommand per stage module.

Each stage module has `main(argv) -> int` and also runs as `python -m dsf.<stage>`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

#: stage -> (module, what it does), in the workflow's order; `dsf <stage> -h` tells the rest
STAGES = {
    "sheet": ("dsf.sheet", "write a slide sheet for a folder of slides (groups, mpp, labels)"),
    "synth": ("dsf.synth", "write a synthetic H&E-like slide with exact class labels"),
    "tissue": ("dsf.tissue", "tissue mask, QC overlay and statistics of one slide"),
    "labels": ("dsf.labels", "one label mask of a slide from per-class masks or an annotation"),
    "patches": ("dsf.patches", "context/target patch store (Zarr) over a slide's tissue"),
    "tile-labels": ("dsf.tile_labels", "labels of a patch store's tiles from its slide's labels"),
    "folds": ("dsf.folds", "cross-validation folds over the slides, grouped by patient"),
    "norm": ("dsf.norm", "input normalisation mean and std of a set of patch stores"),
    "pretrain": ("dsf.pretrain", "self-supervised DSF-WSI pretraining of one fold (GPUs or CPU)"),
    "finetune": ("dsf.finetune", "HookNet fine-tuning of one init, label fraction and fold"),
    "infer": ("dsf.infer", "whole-slide class map (pyramidal TIFF for QuPath) of one slide"),
    "polygons": ("dsf.polygons", "a class map traced into QuPath GeoJSON / ImageScope XML"),
    "areas": ("dsf.areas", "each slide's predicted area per class (mm², % of the mapped area)"),
    "evaluate": ("dsf.evaluate", "per-class F1 and accuracy, and the paper's tables"),
    "curves": ("dsf.curves", "training curves and report pages"),
}


#: Seconds torchrun gives its processes after a signal before it kills them (its default is
#: 30): the rule asks SLURM for the signal 300 s before the time limit, and the processes
#: checkpoint at the next step they agree on (up to 50 steps, then a 1.5 GB file). torch 2.14
#: reads it (as `--shutdown-timeout`, which older torchruns refuse); older ones ignore it.
TORCHRUN_SHUTDOWN_S = 270


def pretrain_command(gpus: int) -> list[str]:
    """The command that starts pretraining on `gpus` GPUs: `dsf pretrain --gpus N`, which
    above one GPU starts itself again under torchrun, one process per GPU (`torchrun_argv`)."""
    return ["dsf", "pretrain", f"--gpus={gpus}"]


def torchrun_argv(module: str, gpus: int, argv: list[str], folder: Path) -> list[str]:
    """The command that runs `python -m module argv` as `gpus` processes through torchrun on
    this machine (DDP; --standalone picks a free rendezvous port, so jobs side by side do not
    clash), with this Python; a cohort's arguments go in a file in `folder` (`spill_args`):
    torchrun starts each process with them."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    spilled = spill_args(argv, folder, ".torchrun-args.json")
    return [*launcher, f"--nproc-per-node={gpus}", "-m", module, *spilled]


def usage() -> str:
    """`dsf -h`: the stages, one line each, in the workflow's order."""
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in STAGES.items()]
    return (
        "usage: dsf <stage> [options]   (dsf <stage> -h: the stage's options; dsf --version)\n"
        "DSF-WSI whole-slide pipeline stages (the Snakemake workflow runs them all):\n"
        + "\n".join(lines)
        + "\n"
    )


#: `dsf <stage> --args-file F`: the stage's arguments are those in F, a JSON list or each
#: ended by a NUL byte (the workflow passes a cohort's thousands of paths so: a command line
#: holds at most 2 MiB, about 24,000 store paths)
ARGS_FILE = "--args-file"
#: Arguments longer than this (bytes, all together) go in an arguments file.
ARGS_INLINE = 100_000

#: The prefix of every shell rule's command (Snakemake's `shell.prefix`): bash's strict mode,
#: as Snakemake's own prefix sets it, and a shell function `dsf` that passes arguments past
#: ARGS_INLINE to `dsf <stage>` in a file (`--args-file`). A shell function is called without
#: the kernel's limit on a command line, so a rule's `dsf pretrain --stores {input.stores}`
#: of any cohort starts; the rules' commands, which Snakemake compares, stay as they were.
SHELL_PREFIX = (
    "set -euo pipefail; "
    "dsf() { "
    "local _n=0 _a _f _s _rc=0; "
    'for _a in "$@"; do _n=$((_n + ${#_a} + 1)); done; '
    f'if [ "$_n" -le {ARGS_INLINE} ] || [ "$#" -lt 2 ]; then command dsf "$@"; return; fi; '
    '_f=$(mktemp "${TMPDIR:-/tmp}/dsf-args.XXXXXX") || return 1; '
    '_s=$1; shift; printf \'%s\\0\' "$@" > "$_f"; '
    f'command dsf "$_s" {ARGS_FILE} "$_f" || _rc=$?; '
    'rm -f "$_f"; return "$_rc"; '
    "}; "
)


def spill_args(argv: list[str], folder: Path, name: str = "args.json") -> list[str]:
    """`argv`, or `--args-file F` with them written to F (`name` in `folder`) when they pass
    `ARGS_INLINE` bytes (a cohort's paths: more than the process could be started with)."""
    if sum(len(a.encode()) + 1 for a in argv) <= ARGS_INLINE:
        return argv
    import json

    path = folder / name
    path.write_text(json.dumps(argv))
    return [ARGS_FILE, str(path)]


def args_from_file(rest: list[str]) -> list[str]:
    """`rest`, or the arguments its `--args-file F` names: F's NUL-ended arguments (as the
    workflow's shell function writes them), or its JSON list (`spill_args`)."""
    if len(rest) != 2 or rest[0] != ARGS_FILE:
        return rest
    import json
    import os

    data = Path(rest[1]).read_bytes()
    if data.endswith(b"\0"):  # as the shell wrote them: bytes, decoded as argv is
        return [os.fsdecode(a) for a in data[:-1].split(b"\0")]
    text = data.decode()
    args = json.loads(text) if text.lstrip().startswith("[") else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SystemExit(f"dsf: {rest[1]} holds neither a JSON list nor NUL-ended arguments")
    return args


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a stage's `main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        out = sys.stdout if argv else sys.stderr  # asked for: stdout; a bare `dsf`: an error
        out.write(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage in {"-V", "--version"}:
        from dsf import __version__

        sys.stdout.write(f"dsf {__version__}\n")
        return 0
    if stage not in STAGES:
        sys.stderr.write(f"dsf: unknown stage {stage!r}; stages: {', '.join(STAGES)}\n")
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return module.main(args_from_file(rest))


if __name__ == "__main__":
    sys.exit(main())
