"""Benchmark `dsf tile-labels` against `dsf patches` on one slide: what an annotation edit costs.

Since the labels left the patch stores, editing an annotation reruns `tile-labels` (and what
fine-tunes on it) instead of `patches` and every pretraining that reads the store. A synthetic
slide of SIZE x SIZE px at 0.5 um/px (cached in bench/out) with its label mask and GeoJSON is
cut at the paper's PAIP geometry (target 0.5 um/px, 256 px blocks at scale 4: 1024 px tiles,
stride 512), then labelled from each annotation: seconds of each, tiles per second, store sizes.

    python bench/tile_labels.py --size 12288 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = ["ignore", "TUM", "STR", "LYM"]


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=12288, help="slide side in level-0 px")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    work = HERE / "out" / f"tile-labels-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    slide = work / "s.tiff"
    if not slide.is_file():
        from dsf.synth import write_synthetic_slide

        write_synthetic_slide(
            slide, seed=7, width=args.size, height=args.size, mpp=0.5, tile=256, quality=85,
            region_um=300, labels_tiff=work / "s.labels.tiff", labels_geojson=work / "s.geojson",
        )  # fmt: skip
    mask = work / "mask.tiff"
    if not mask.is_file():
        _timed([
            "dsf", "tissue", "--slide", str(slide), "--mask", str(mask), "--overlay",
            str(work / "mask.jpg"), "--stats", str(work / "mask.json"), "--method", "rgb",
        ])  # fmt: skip
    store = work / "s.zarr"
    shutil.rmtree(store, ignore_errors=True)
    patches_s = _timed([
        "dsf", "patches", "--slide", str(slide), "--tissue-mask", str(mask), "--out", str(store),
        "--no-progress", "--threads", str(args.threads), "--target-mpp", "0.5", "--block", "256",
        "--scale", "4", "--stride", "512",
    ])  # fmt: skip
    import zarr

    n = int(zarr.open_group(str(store), mode="r").attrs["n_tiles"])
    print(f"slide {args.size} x {args.size} px at 0.5 um/px, {n} tiles of 1024 px (stride 512)")
    print("| step | seconds | tiles/s | store MB | labelled tiles |")
    print("|---|---|---|---|---|")
    print(f"| dsf patches ({args.threads} threads) | {patches_s:.1f} | {n / patches_s:.1f} | "
          f"{_size_mb(store):.0f} | |")  # fmt: skip
    for name in ("s.labels.tiff", "s.geojson"):
        out = work / f"{name}.labels.zarr"
        shutil.rmtree(out, ignore_errors=True)
        sec = _timed([
            "dsf", "tile-labels", "--store", str(store), "--labels", str(work / name),
            "--out", str(out), "--no-progress", "--classes", *CLASSES,
        ])  # fmt: skip
        kept = int(zarr.open_group(str(out), mode="r").attrs["n_tiles"])
        print(f"| dsf tile-labels ({name}) | {sec:.1f} | {n / sec:.1f} | {_size_mb(out):.1f} | "
              f"{kept} |")  # fmt: skip


if __name__ == "__main__":
    main()
