"""Benchmark DSF-WSI pretraining: data path, augmentation, model step, and end to end.

One sample = one tile = 2 context crops + 2 x 16 target crops (34 images of `out` px). Measured
on real patch stores on disk (e.g. the 40k synthetic slide's store written by
`bench/extract.py`, 1024 px tiles), so the data path is included end to end:

    python bench/pretrain.py --stores bench/out/synth-40000.zarr --batch 32 --device cuda
    python bench/pretrain.py --stores bench/out/synth-40000.zarr --batch 4 --device cpu

Prints a markdown row per measurement; `bench/RESULTS.md` records them. `--profile-steps N`
adds where N training steps (augmentation and update) spend the device's time, by kernel
category and by kernel: what a faster step has to cut. `--count-ops` adds the torch operations
one step dispatches: each is host time, and on a GPU the host has to issue them faster than the
card runs them (a count a CPU-only machine measures for the GPU).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opcount import OpCounter  # noqa: E402 - bench helper

from dsf.config import defaults  # noqa: E402
from dsf.pretrain import Trainer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_read(trainer: Trainer, steps: int) -> float:
    """Tiles per second through the trainer's tile loader alone (its workers and settings),
    each slot given back at once, within one epoch (no read-ahead from the epoch before)."""
    loader = trainer.loader
    it = loader.epoch(10**6)
    loader.release(next(it)[0])  # warm-up (the workers' start)
    t0, n = time.perf_counter(), 0
    for slot, tiles in itertools.islice(it, min(steps, len(loader) - 1)):
        n += tiles.shape[0]
        loader.release(slot)
    return n / (time.perf_counter() - t0)


def bench_augment(trainer: Trainer, tiles: torch.Tensor, steps: int, fused: bool) -> float:
    """Milliseconds per batch for both views, as the trainer makes them (its dtype and memory
    format), with the colour pass fused (compiled) or eager."""
    dev = trainer.device
    gen = torch.Generator(device=dev).manual_seed(0)
    saved = trainer.st["compile_augment"]
    trainer.st["compile_augment"] = fused
    try:
        trainer.views(tiles, gen)  # warm-up (and the compile, when fused)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.views(tiles, gen)
        _sync(dev)
    finally:
        trainer.st["compile_augment"] = saved
    return (time.perf_counter() - t0) / steps * 1000


def bench_model_step(trainer: Trainer, tiles: torch.Tensor, steps: int) -> float:
    """Milliseconds per optimiser step on fixed pre-augmented views (no data, no augmentation)."""
    gen = torch.Generator(device=trainer.device).manual_seed(0)
    views = trainer.views(tiles, gen)
    trainer.update(views)
    _sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.update(views)
    _sync(trainer.device)
    return (time.perf_counter() - t0) / steps * 1000


def serial_epoch(trainer: Trainer, steps: int) -> float:
    """Samples per second end to end with each batch copied and augmented just before its own
    step, on the step's stream: what `Trainer.batches` overlapping them saves."""
    dev = trainer.device
    gen = torch.Generator(device=dev).manual_seed(0)
    _sync(dev)
    t0, n = time.perf_counter(), 0
    for slot, tiles in itertools.islice(trainer.loader.epoch(trainer.epoch), steps):
        on_device = tiles.to(dev, non_blocking=True)  # on the CPU: the loader's slot itself
        copied = torch.cuda.current_stream(dev).record_event() if dev.type == "cuda" else None
        views = trainer.views(on_device, gen)
        trainer.loader.release(slot, copied)
        trainer.update(views)
        n += tiles.shape[0]
    _sync(dev)
    return n / (time.perf_counter() - t0)


def count_step_ops(trainer: Trainer, tiles: torch.Tensor, top: int = 10) -> str:
    """The torch operations one optimiser step dispatches (forward, backward, Adam), after a
    warm-up step, as markdown: the total, the views among them, and the most frequent."""
    views = trainer.views(tiles, torch.Generator(device=trainer.device).manual_seed(0))
    trainer.update(views)
    with OpCounter() as counter:
        trainer.update(views)
    with OpCounter() as adam:  # the gradients are still there: one more optimiser step alone
        trainer.opt.step()
    _sync(trainer.device)
    model = counter.total - adam.total
    lines = [
        f"| torch ops per model step | {counter.total:,}: forward and backward {model:,} "
        f"({counter.views - adam.views:,} of them views), optimiser {adam.total:,} |"
    ]
    lines += [f"| {op} | {n} |" for op, n in counter.ops.most_common(top)]
    return "\n".join(lines)


#: kernel categories by name (first match wins; the names of cuDNN, cuBLAS and ATen kernels)
CATEGORIES = (
    ("convolution", r"conv|cudnn|xmma|implicit_gemm|dgrad|wgrad|fprop|nchw|nhwc"),
    ("batch norm", r"batch_?norm|bn_|welford"),
    ("matmul (heads)", r"gemm|cutlass|cublas|matmul|addmm|\bmm\b|linear"),
    ("crops (roi_align)", r"roi_?align"),
    ("optimiser", r"adam|multi_tensor|foreach"),
    ("pooling and reductions", r"pool|reduce|mean|sum|norm"),
    ("elementwise and copies", r"elementwise|vectorized|unrolled|copy|fill|where|relu|threshold"),
)


def profile_steps(trainer: Trainer, tiles: torch.Tensor, steps: int, top: int = 12) -> str:
    """Where `steps` training steps (both views' augmentation, then the update) spend their
    time: kernel time on a GPU (CPU op self time on the CPU), per step, by category and for
    the `top` kernels, as markdown. On a GPU also the kernel time against the steps' wall time
    (under the profiler): the rest is the card waiting for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    dev = trainer.device
    gen = torch.Generator(device=dev).manual_seed(0)
    trainer.update(trainer.views(tiles, gen))  # warm-up
    _sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.update(trainer.views(tiles, gen))
        _sync(dev)
        wall = (time.perf_counter() - t0) / steps * 1000
    if dev.type == "cuda":  # kernels only: an op's device time is its kernels' (counted twice)
        events = [e for e in prof.key_averages() if e.device_type != DeviceType.CPU]
        times = [(e.key, e.self_device_time_total / 1e3 / steps) for e in events]
    else:
        times = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    times = [(k, ms) for k, ms in times if ms > 0]
    total = sum(ms for _, ms in times)
    by_cat: collections.Counter[str] = collections.Counter()
    for k, ms in times:
        name = next((c for c, rx in CATEGORIES if re.search(rx, k, re.IGNORECASE)), "other")
        by_cat[name] += ms
    unit = "kernel" if dev.type == "cuda" else "CPU op"
    lines = [f"{unit} time per step: {total:.1f} ms of {wall:.1f} ms wall ({total / wall:.0%})"]
    lines += ["", "| category | ms/step | share |"]
    lines += ["|---|---|---|"]
    lines += [f"| {c} | {ms:.1f} | {ms / total:.0%} |" for c, ms in by_cat.most_common()]
    lines += ["", f"| {unit} | ms/step | share |", "|---|---|---|"]
    for k, ms in sorted(times, key=lambda t: -t[1])[:top]:
        lines.append(f"| {k[:90]} | {ms:.2f} | {ms / total:.1%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stores", nargs="+", type=Path, required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--read-batches", type=int, default=20, help="batches timed for loading")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--compile-encoders",
        action="store_true",
        help="torch.compile only the two encoders (the step's convolutions and batch norms; on "
        "the CPU it compiled in 39 s against the whole model's 102 s)",
    )
    p.add_argument(
        "--compile-mode",
        choices=["reduce-overhead", "max-autotune-no-cudagraphs"],
        help="torch.compile the model in this mode (reduce-overhead: replayed as CUDA graphs, "
        "so the host issues no kernels one by one)",
    )
    p.add_argument(
        "--amp-dtype",
        choices=["auto", "bfloat16", "float16"],
        default="auto",
        help="AMP dtype on a GPU (auto: what dsf picks, bf16 on capability 8.0+). To test "
        "whether float16 (with a loss scaler) lets PyTorch take cuDNN's batch norm: in bf16 the "
        "H200 profile showed PyTorch's own channels-last kernels, 27%% of kernel time",
    )
    p.add_argument("--profile-steps", type=int, default=0, help="profile this many steps")
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="count the torch ops of one model step (each a host-side call; on a GPU, all but "
        "the views a kernel launch)",
    )
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = p.parse_args()

    settings = defaults("pretrain") | {
        "batch_size": args.batch,
        "workers": args.workers,
        "device": args.device,
        "backbone": args.backbone,
        "epochs": 1000,  # the loader reads the next epoch ahead, as in a long run
        "steps_per_epoch": args.steps,
        "checkpoint_every": 10**6,
        "compile": args.compile,
        # BCSS's published statistics (config/presets/bcss.yaml): computing them would read
        # the stores once more, warming the page cache before the loader is timed
        "mean": [0.6998, 0.4785, 0.6609],
        "std": [0.2203, 0.2407, 0.1983],
    }
    run_dir = args.out_dir / "pretrain-bench"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(settings, args.stores, run_dir)
    if (args.compile_encoders or args.compile_mode) and trainer.net is not trainer.model:
        raise SystemExit(
            "--compile-encoders and --compile-mode are for one process without --compile"
        )
    if args.compile_mode:
        trainer.net = torch.compile(trainer.model, mode=args.compile_mode)
    if args.compile_encoders:
        trainer.model.context_encoder = torch.compile(trainer.model.context_encoder)
        trainer.model.target_encoder = torch.compile(trainer.model.target_encoder)
    dev = trainer.device
    if args.amp_dtype != "auto":
        if dev.type != "cuda":
            raise SystemExit("--amp-dtype is for a GPU")
        trainer.amp = getattr(torch, args.amp_dtype)
        trainer.scaler = torch.amp.GradScaler("cuda", enabled=trainer.amp == torch.float16)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    print(
        f"# {time.strftime('%Y-%m-%d')} {name or 'cpu'} ({os.cpu_count()} cores), torch "
        f"{torch.__version__}, {args.backbone}, batch {args.batch}, out "
        f"{settings['out_size']}, amp {trainer.amp}, tile {trainer.data.tile_shape[0]} px, "
        f"compile {'encoders' if args.compile_encoders else args.compile_mode or args.compile}"
    )
    read = bench_read(trainer, args.read_batches)
    print(f"| data loading ({args.workers} workers) | {read:.1f} tiles/s |")
    tiles = torch.stack([trainer.data[i] for i in range(args.batch)]).to(dev)
    aug_ms = bench_augment(trainer, tiles, args.steps, fused=False)
    print(f"| augmentation, both views, eager colour pass | {aug_ms:.1f} ms/batch |")
    if dev.type == "cuda" and settings["compile_augment"]:
        aug_ms = bench_augment(trainer, tiles, args.steps, fused=True)
        print(f"| augmentation, both views, fused colour pass | {aug_ms:.1f} ms/batch |")
    step_ms = bench_model_step(trainer, tiles, args.steps)
    print(
        f"| model step alone | {step_ms:.0f} ms/step = {args.batch / step_ms * 1000:.1f} "
        f"samples/s |"
    )
    print(f"| augmentation / model step | {aug_ms / step_ms:.1%} |")
    if args.count_ops:
        print(count_step_ops(trainer, tiles), flush=True)
    if args.profile_steps:
        print(profile_steps(trainer, tiles, args.profile_steps), flush=True)
    trainer.train_epoch(progress=False)  # warm-up: starts the loader's workers (persistent)
    row = trainer.train_epoch(progress=False)
    print(
        f"| end to end (store -> loader -> augment -> step), {args.steps} steps, after one "
        "warm-up epoch | "
        f"{row['samples_per_s']:.1f} samples/s, {row['data_wait']:.0%} of it waiting for "
        "tiles |",
        flush=True,
    )
    serial = serial_epoch(trainer, args.steps)
    print(f"| end to end, each batch augmented just before its step | {serial:.1f} samples/s |")
    trainer.close()


if __name__ == "__main__":
    main()
