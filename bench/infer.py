"""Benchmark stitched whole-slide inference (issue 5): slide megapixels/s, windows/s, peak RSS.

Synthetic 40x slides (0.25 um/px, `dsf synth`, cached in bench/out with their tissue masks) are
predicted end to end by `dsf.infer.infer_slide` in a fresh process per run (so peak RSS is its
own): reading with prefetch threads, context reduction, the model, Hann blending, the Zarr work
store, the pyramidal TIFF and the overlay. The paper's geometry: 256 px blocks at 0.25 um/px,
scale 4 (1024 px contexts), overlap 25% (stride 192).

Models: `hooknet` = a HookNet of the paper's size (ResNet-18, 6 classes, 28,952,780 parameters,
random weights: the speed does not depend on them); `stub` = a 1x1 convolution, so the run
measures everything but the model (the pipeline's own ceiling). GPU busy fraction = time inside
the model's forward (CUDA events) / wall time.

    python bench/infer.py --sizes 20000 40000 --model stub           # RSS flatness, pipeline
    python bench/infer.py --sizes 40000 --model hooknet --device cuda --batch 256
    python bench/infer.py --forward-only --model hooknet             # model windows/s alone
    python bench/infer.py --sizes 20000 --count-ops                  # main-thread ops/window

`--count-ops` counts the torch operations the main thread dispatches per window (every one a
Python call, most of them a kernel launch on a GPU, where that thread feeds the card): a figure
a CPU-only machine can measure for the GPU run (its timings are then meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import _ensure_mask, _ensure_synth  # noqa: E402 - bench helper reuse
from opcount import OpCounter  # noqa: E402

from dsf.config import defaults  # noqa: E402
from dsf.devices import amp_dtype  # noqa: E402
from dsf.predict import Predictor  # noqa: E402

HERE = Path(__file__).resolve().parent
CLASSES = ["ignore", "TUM", "STR", "LYM", "NEC", "OTR"]
BCSS_NORM = ([0.6998, 0.4785, 0.6609], [0.2203, 0.2407, 0.1983])  # config/presets/bcss.yaml


class Stub(nn.Module):
    """A 1x1 convolution on the target: the cheapest model with the right output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, len(CLASSES), 1)

    def forward(
        self, context: torch.Tensor, target: torch.Tensor, context_logits: bool = True
    ) -> tuple[torch.Tensor, None]:
        return self.conv(target), None


class Timed(nn.Module):
    """Wraps a model and adds up the time spent in its forward (CUDA events on a GPU)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.device = model, device
        self.events: list[tuple[object, object]] = []
        self.cpu_seconds = 0.0
        self.calls = 0  # forward passes: windows / calls is the mean batch

    def forward(self, *args: torch.Tensor, **kw: bool) -> object:
        self.calls += 1
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.model(*args, **kw)
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.model(*args, **kw)
        self.cpu_seconds += time.perf_counter() - t0
        return out

    def busy_seconds(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events) / 1e3  # type: ignore[attr-defined]
        return self.cpu_seconds


def build(model: str, device: torch.device, amp: bool) -> tuple[Predictor, Timed]:
    from dsf.models.fold import fold_batchnorm
    from dsf.models.hooknet import HookNet

    torch.manual_seed(0)  # the same random weights every run: the same map to write
    net: nn.Module = Stub()
    if model == "hooknet":
        net = HookNet(len(CLASSES), scale=4, input_size=256)
    net = net.eval()
    fold_batchnorm(net)  # as dsf.predict does
    net = net.to(device, memory_format=torch.channels_last)
    timed = Timed(net, device)
    pred = Predictor(
        model=timed,
        init="random",
        classes=CLASSES,
        scale=4,
        block=256,
        target_mpp=0.25,
        mean=torch.tensor(BCSS_NORM[0], device=device).view(1, 3, 1, 1),
        std=torch.tensor(BCSS_NORM[1], device=device).view(1, 3, 1, 1),
        device=device,
        amp=amp_dtype(device, amp),
    )
    return pred, timed


def run_worker(args: argparse.Namespace) -> dict:
    from dsf.infer import infer_slide
    from dsf.slide import open_slide
    from dsf.tissue import read_mask

    device = torch.device(args.device)
    pred, timed = build(args.model, device, not args.no_amp)
    slide = open_slide(args.slide)
    mask, mask_mpp = read_mask(args.mask)
    st = defaults("infer") | {"batch_size": args.batch, "threads": args.threads}
    counter = OpCounter() if args.count_ops else None
    with tempfile.TemporaryDirectory(dir=args.out) as tmp, counter or contextlib.nullcontext():
        out = Path(tmp)
        t0 = time.perf_counter()
        meta = infer_slide(
            slide,
            mask,
            mask_mpp,
            [pred],
            st,
            out / "m.tiff",
            out / "m.jpg",
            out / "m.json",
            progress=False,
        )
        wall = time.perf_counter() - t0
        map_mb = (out / "m.tiff").stat().st_size / 1e6
    w, h = slide.dimensions
    ops = {}
    if counter is not None:
        ops = {
            "ops_per_window": round(counter.total / meta["windows"], 2),
            "top_ops_per_window": {
                k: round(v / meta["windows"], 2) for k, v in counter.ops.most_common(8)
            },
        }
    return {
        "seconds": wall,
        "windows": meta["windows"],
        "slide_mpx": w * h / 1e6,
        "busy": timed.busy_seconds() / wall,
        "batches": timed.calls,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "map_mb": map_mb,
        "phases": meta["phase_seconds"],
        **ops,
    }


def forward_only(args: argparse.Namespace) -> dict:
    """The model alone on random 256 px windows already on the device: windows per second at
    the batch size."""
    device = torch.device(args.device)
    pred, _ = build(args.model, device, not args.no_amp)
    ctx = torch.randint(0, 255, (args.batch, 256, 256, 3), dtype=torch.uint8, device=device)
    tgt = torch.randint(0, 255, (args.batch, 256, 256, 3), dtype=torch.uint8, device=device)
    pred.probabilities(ctx, tgt)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        pred.probabilities(ctx, tgt)
        n += args.batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"windows_per_s": n / (time.perf_counter() - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[20000, 40000])
    p.add_argument("--model", choices=["hooknet", "stub"], default="stub")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--count-ops", action="store_true", help="main-thread torch ops per window")
    p.add_argument("--seconds", type=float, default=20.0, help="forward-only duration")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--slide")
    p.add_argument("--mask")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        sys.stdout.write(json.dumps(run_worker(args)) + "\n")
        return
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} {card} {os.cpu_count()} cores, "
        f"model {args.model}, device {args.device}, batch {args.batch}, threads {args.threads}, "
        f"torch {torch.__version__}"
    )
    if args.forward_only:
        print(json.dumps(forward_only(args)))
        return
    print("| slide | windows | seconds | slide Mpx/s | windows/s | model busy | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        slide = _ensure_synth(args.out, size)
        mask = _ensure_mask(slide, None, args.out)
        cmd = [
            sys.executable, __file__, "--worker", "--slide", str(slide), "--mask", str(mask),
            "--model", args.model, "--device", args.device, "--batch", str(args.batch),
            "--threads", str(args.threads), "--out", str(args.out),
        ] + (["--no-amp"] if args.no_amp else [])  # fmt: skip
        cmd += ["--count-ops"] if args.count_ops else []
        # the worker's stderr (its log, or a traceback) passes through; stdout holds its result
        res = json.loads(
            subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[
                -1
            ]
        )
        print(
            f"| synthetic {size} x {size}, 0.25 um/px | {res['windows']} | {res['seconds']:.1f} | "
            f"{res['slide_mpx'] / res['seconds']:.1f} | {res['windows'] / res['seconds']:.1f} | "
            f"{res['busy']:.0%} | {res['peak_rss_mb']:.0f} |",
            flush=True,
        )
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in res["phases"].items())
        print(
            f"#   {size}: {phases}; map {res['map_mb']:.1f} MB; {res['batches']} batches "
            f"(mean {res['windows'] / res['batches']:.1f} windows)",
            flush=True,
        )
        if args.count_ops:
            print(
                f"#   {size}: main-thread torch ops per window {res['ops_per_window']}: "
                f"{json.dumps(res['top_ops_per_window'])} (timings slowed by the count)"
            )


if __name__ == "__main__":
    main()
