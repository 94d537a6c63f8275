"""Where patch extraction spends its CPU, per tile: decoding, the Zarr write, the main thread.

`bench/extract.py` compares extraction with reading the needed pixels once. This script says
why they differ: it runs `dsf.patches.extract` once at the paper's geometry and splits the
process's CPU time per written tile into the reader threads' (`Slide.read`: decoding and
resampling), the main thread's (cutting tiles, the context level) and the rest (the
writer thread and Zarr's codec pool: Blosc compression and shard assembly). The main thread's
share bounds extraction on many cores (1 / its time per tile); decoding over the total bounds
the read-once ratio on any number of cores.

    python bench/extract_cpu.py --slide bench/out/synth-20000.tiff \
        --mask bench/out/synth-20000.mask.tiff --threads 2
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path

from dsf.config import defaults
from dsf.patches import extract
from dsf.slide import Slide, open_slide
from dsf.tissue import read_mask

PAPER = {"target_mpp": 0.25, "scale": 4, "block": 256, "stride": 512, "min_tissue": 0.5}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--mask", type=Path, required=True, help="tissue mask (dsf tissue --mask)")
    p.add_argument("--threads", type=int, default=2, help="reader threads (patches.threads)")
    args = p.parse_args()
    settings = defaults("patches") | PAPER | {"threads": args.threads}
    reads = [0.0]
    lock = threading.Lock()
    plain_read = Slide.read

    def timed_read(self: Slide, *a: object, **k: object) -> object:
        start = time.thread_time()
        out = plain_read(self, *a, **k)
        with lock:
            reads[0] += time.thread_time() - start
        return out

    Slide.read = timed_read  # type: ignore[method-assign]
    slide = open_slide(args.slide)
    mask, mask_mpp = read_mask(args.mask)
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, main0, wall0 = _cpu(), time.thread_time(), time.perf_counter()
        n = extract(slide, mask, mask_mpp, Path(tmp) / "s.zarr", settings, progress=False)
        wall, main = time.perf_counter() - wall0, time.thread_time() - main0
        cpu = _cpu() - cpu0
    ms = {k: 1000 * v / n for k, v in (("read", reads[0]), ("main", main), ("all", cpu))}
    rest = ms["all"] - ms["read"] - ms["main"]
    print(
        f"{args.slide.name}: {n} tiles in {wall:.1f} s ({n / wall:.1f} tiles/s), "
        f"{args.threads} reader threads. CPU ms per tile: readers {ms['read']:.2f}, "
        f"main thread {ms['main']:.2f}, writer and Zarr codecs {rest:.2f}, all {ms['all']:.2f}. "
        f"Main-thread bound {1000 / ms['main']:.0f} tiles/s; decoding / all "
        f"{ms['read'] / ms['all']:.2f}"
    )


if __name__ == "__main__":
    main()
