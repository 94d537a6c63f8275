"""How much the stitcher's reader threads slow a launch-bound main thread (issue 5).

On a GPU the stitcher's main thread is bound by Python and kernel launches: every torch call
releases the GIL and takes it back, so reader threads that hold the GIL for milliseconds at a
time (PIL's channel check, RGBA -> RGB and `tobytes` in `OpenSlide.read_region`) make it wait
at every call. This measures it without a GPU: the main thread runs tiny torch ops (a stand-in
for launches) while `threads` readers run `dsf.chunk_reader.ChunkReader._read` on a synthetic
slide: with openslide-python's `read_region` (the previous reader), with dsf's direct read
(`dsf.slide_readers._OPENSLIDE_READ`), and with the context reduction left to the device as a
GPU run does (here the "device" is the CPU, so only the reader's share is measured). Reported:
main-thread ops/s and reader Mpx/s (target rows read; contexts not counted).

    python bench/gil.py --threads 2 16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import _ensure_synth  # noqa: E402 - bench helper reuse

import dsf.slide_readers  # noqa: E402
from dsf.chunk_reader import ChunkReader  # noqa: E402
from dsf.slide import open_slide  # noqa: E402
from dsf.windows import make_grid, plan_bands  # noqa: E402

HERE = Path(__file__).resolve().parent


def main_loop(stop: threading.Event) -> tuple[int, float]:
    """Tiny torch ops until `stop`: (ops, seconds)."""
    a, b = torch.zeros(64), torch.ones(64)
    n, t0 = 0, time.perf_counter()
    while not stop.is_set():
        for _ in range(100):
            a.add_(b)
        n += 100
    return n, time.perf_counter() - t0


def measure(
    slide_path: Path, threads: int, seconds: float, device_contexts: bool
) -> tuple[float, float]:
    """(main-thread ops/s, reader Mpx/s) with `threads` readers for `seconds`."""
    slide = open_slide(slide_path)
    w, h = slide.size_at(slide.mpp)
    grid = make_grid(w, h, 256, 4, 0.25, 1, 32)
    rows, cols = grid.cores
    r0, r1 = grid.windows_touching(0, rows - 1)
    c0, c1 = grid.windows_touching(0, cols - 1)
    band = plan_bands(grid, np.ones((r1 - r0 + 1, c1 - c0 + 1), bool))[1]
    chunks = band.chunks[10:-10]  # inside the slide
    reader = ChunkReader(slide, grid, slide.mpp, threads)
    reader.contexts_on_device = device_contexts  # as on a GPU (no page-locked memory here)
    stop = threading.Event()
    done = [0]

    def read() -> None:
        k = 0
        while not stop.is_set():
            reader._read(band, chunks[k % len(chunks)])
            done[0] += 1
            k += 1

    pool = [threading.Thread(target=read) for _ in range(threads)]
    for t in pool:
        t.start()
    timer = threading.Timer(seconds, stop.set)
    t0 = time.perf_counter()
    timer.start()
    ops, secs = main_loop(stop)
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    return ops / secs, done[0] * band.width * grid.stride / 1e6 / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="*", default=[2, 16])
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=HERE / "out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = _ensure_synth(args.out, args.size)
    torch.set_num_threads(1)
    stop = threading.Event()
    threading.Timer(args.seconds, stop.set).start()
    ops, secs = main_loop(stop)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {os.cpu_count()} cores, torch "
          f"{torch.__version__}; main thread alone: {ops / secs:,.0f} ops/s")  # fmt: skip
    print("| readers | reader | main-thread ops/s | reader Mpx/s |")
    print("|---|---|---|---|")
    direct = dsf.slide_readers._OPENSLIDE_READ
    readers = (
        ("openslide-python read_region, contexts by PIL in the thread", None, False),
        ("dsf direct read, contexts by PIL in the thread", direct, False),
        ("dsf direct read, contexts on the device (the GPU path)", direct, True),
    )
    for threads in args.threads:
        for name, fn, device_contexts in readers:
            dsf.slide_readers._OPENSLIDE_READ = fn
            ops_s, mpx_s = measure(path, threads, args.seconds, device_contexts)
            print(f"| {threads} | {name} | {ops_s:,.0f} | {mpx_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
