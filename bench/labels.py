"""Benchmark `dsf labels`: PAIP-style per-class masks at the slide's full size -> one label mask
(or, with `--source annotation`, polygon annotations over a base class, as for CAMELYON).

For each synthetic slide (cached in bench/out by bench/extract.py, made by `dsf synth` if
missing) two full-size binary masks are written the way PAIP ships them (uint8 0/1, one page
at level-0 size; here tiled and deflated): "whole tumour" an ellipse over half the slide,
"viable tumour" a smaller one inside it. Then `dsf labels` runs in a fresh process (so its peak
RSS is its own) with the tissue rule as base class, at 0.5 um/px (PAIP's 20x) and at 0.25 (the
slide's own 40x): seconds, output megapixels per second and peak RSS. The target is memory flat
in slide size (the masks alone are 400 MB and 900 MB as pixels). With `--source annotation` the
slide's own region layout, traced into GeoJSON polygons (hundreds per slide), is painted over
the base class instead.

    python bench/labels.py --sizes 20000 30000 --threads 2 [--source annotation]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
CLASSES = ["ignore", "tissue", "whole_tumour", "viable_tumour"]
POLYGON_CLASSES = ["ignore", "normal", "TUM", "STR", "LYM"]
TILE = 512


def _ellipse_mask(path: Path, width: int, height: int, radius: float) -> None:
    """A full-size uint8 0/1 mask: the ellipse of `radius` x the slide's half-axes."""
    cx, cy, ax, ay = width / 2, height / 2, radius * width / 2, radius * height / 2

    def tiles():
        for y in range(0, height, TILE):
            yy = ((np.arange(y, y + TILE) + 0.5 - cy) / ay) ** 2
            for x in range(0, width, TILE):
                xx = ((np.arange(x, x + TILE) + 0.5 - cx) / ax) ** 2
                yield (yy[:, None] + xx[None, :] <= 1).astype(np.uint8)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(height, width),
        dtype=np.uint8,
        tile=(TILE, TILE),
        compression="zlib",
        bigtiff=True,
    )


def _slide(size: int) -> Path:
    path = HERE / "out" / f"synth-{size}.tiff"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["dsf", "synth", "--out", str(path), "--seed", "1", "--width", str(size),
             "--height", str(size), "--mpp", "0.25"],
            check=True,
        )  # fmt: skip
    return path


def _polygons(path: Path, width: int, height: int) -> int:
    """The synthetic slide's regions (seed 1, as `_slide` makes it) as QuPath GeoJSON traced at
    16x downsample; returns the number of polygons."""
    import json

    from dsf.synth import annotation_features
    from dsf.synth_tissue import render_labels

    ds = 16
    labels = render_labels(1, 0, 0, -(-width // ds), -(-height // ds), 0.25, float(ds),
                           slide_width=width, slide_height=height)  # fmt: skip
    features = annotation_features(labels, float(ds))
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return len(features)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 30000])
    ap.add_argument("--mpps", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source", choices=["masks", "annotation"], default="masks")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print("| slide | label mpp | output Mpx | seconds | output Mpx/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        slide = _slide(size)
        with tifffile.TiffFile(slide) as tf:
            height, width = tf.pages[0].shape[:2]
        work = HERE / "out" / f"labels-{size}"
        work.mkdir(exist_ok=True)
        if args.source == "masks":
            whole, viable = work / "whole.tif", work / "viable.tif"
            if not viable.is_file():
                _ellipse_mask(whole, width, height, 0.7)
                _ellipse_mask(viable, width, height, 0.35)
            source = ["--mask", f"whole_tumour={whole}", "--mask", f"viable_tumour={viable}",
                      "--classes", *CLASSES, "--base", "tissue"]  # fmt: skip
        else:
            geojson = work / "regions.geojson"
            n = _polygons(geojson, width, height)
            print(f"{slide.name}: {n} polygons", file=sys.stderr)
            source = ["--annotation", str(geojson), "--classes", *POLYGON_CLASSES,
                      "--base", "normal"]  # fmt: skip
        for mpp in args.mpps:
            out = work / f"labels-{args.source}-{mpp}.tiff"
            cmd = [
                "/usr/bin/time", "-f", "%e %M", "dsf", "labels", "--slide", str(slide),
                *source, "--mpp", str(mpp),
                "--threads", str(args.threads), "--no-progress", "--out", str(out),
            ]  # fmt: skip
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - t0
            rss_mb = int(done.stderr.strip().splitlines()[-1].split()[1]) / 1024
            with tifffile.TiffFile(out) as tf:
                oh, ow = tf.pages[0].shape
            mpx = oh * ow / 1e6
            print(
                f"| synthetic {width} x {height} | {mpp} | {mpx:.0f} | {seconds:.1f} | "
                f"{mpx / seconds:.1f} | {rss_mb:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
