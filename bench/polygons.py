"""Benchmark `dsf polygons`: a whole-slide class map traced into QuPath GeoJSON.

A class map like `dsf infer` writes one (palette pyramid, `dsf.class_tiff.write_tiff`) is made
for a slide of WIDTH x HEIGHT level-0 px at 0.25 um/px (40x): the synthetic slides' region
layout (`dsf.synth_tissue.render_labels`) at the map's mpp, with a share of pixels relabelled in
small random blobs the way a barely trained model speckles its output. Then the map is traced
in a fresh process (so its peak RSS is its own) at each `polygons.mpp` asked for: seconds,
regions, vertices, GeoJSON size, then the same polygons as ImageScope XML (seconds, size), and
peak RSS. The target: seconds and a few hundred MB for a
paper-scale slide, regardless of how finely the map itself was written. `--map` traces a map
`dsf infer` wrote instead (a real model's ragged regions, e.g. `make demo`'s), with `--slide-mpp`
its slide's level-0 um/px.

    python bench/polygons.py --size 100000 80000 --map-mpp 2.0 --trace-mpp 4 8 --noise 0.02
    python bench/polygons.py --map results/maps/dsf/TCGA-CR-7395.tiff --slide-mpp 2.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = ["ignore", "TUM", "STR", "LYM"]
MPP0 = 0.25

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from dsf.class_map import open_map
from dsf.polygons import map_polygons
tiff, out = Path(sys.argv[1]), Path(sys.argv[3])
mpp, mpp0 = float(sys.argv[2]), float(sys.argv[4])
t0 = time.perf_counter()
doc = map_polygons(open_map(tiff), mpp0,
                   {"mpp": mpp, "min_um2": 500.0, "tolerance": 0.5})
out.write_text(json.dumps(doc, separators=(",", ":")))
traced = time.perf_counter() - t0
from dsf.imagescope import imagescope_xml
out.with_suffix(".xml").write_bytes(imagescope_xml(doc["features"], mpp0))
xml_s = time.perf_counter() - t0 - traced
n = sum(len(r) for f in doc["features"] for r in f["geometry"]["coordinates"])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": traced, "xml_seconds": xml_s, "regions": len(doc["features"]),
                  "vertices": n, "rss_mb": rss}))
"""


def make_map(path: Path, width: int, height: int, map_mpp: float, noise: float) -> None:
    """The class map of a `width` x `height` slide at 0.25 um/px, written at `map_mpp`."""
    from dsf.class_tiff import pyramid_shapes, write_tiff
    from dsf.synth_tissue import render_labels

    ds = map_mpp / MPP0
    w, h = round(width / ds), round(height / ds)
    level0 = render_labels(1, 0, 0, w, h, MPP0, ds, 300.0, slide_width=width,
                           slide_height=height)  # fmt: skip
    rng = np.random.default_rng(0)
    n_blobs = int(noise * w * h / 9)  # 3 x 3 px blobs
    ys, xs = rng.integers(0, h - 3, n_blobs), rng.integers(0, w - 3, n_blobs)
    cls = rng.integers(1, len(CLASSES), n_blobs).astype(np.uint8)
    inside = level0[ys, xs] > 0  # speckles on tissue only, like a model's
    for dy in range(3):
        for dx in range(3):
            level0[ys[inside] + dy, xs[inside] + dx] = cls[inside]
    levels = [level0]
    for lh, lw in pyramid_shapes(h, w, 512)[1:]:
        levels.append(levels[-1][::2, ::2][:lh, :lw])
    write_tiff(path, levels, map_mpp, len(CLASSES), tile=512, threads=2)
    meta = {"slide": "bench", "init": "dsf", "fraction": 1.0, "mpp": map_mpp, "width": w,
            "height": h, "classes": CLASSES, "folds": [0], "routing": "out_of_fold"}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(meta))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[100_000, 80_000], metavar=("W", "H"))
    p.add_argument("--map-mpp", type=float, default=2.0)
    p.add_argument("--trace-mpp", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument("--noise", type=float, default=0.02, help="share of tissue pixels relabelled")
    p.add_argument("--map", type=Path, help="trace this class map of `dsf infer` instead")
    p.add_argument("--slide-mpp", type=float, default=MPP0, help="with --map: its slide's mpp")
    args = p.parse_args()
    if args.map:
        from dsf.class_map import open_map

        cmap = open_map(args.map)
        ds = cmap.level_mpp(0) / args.slide_mpp
        w, h = round(cmap.width * ds), round(cmap.height * ds)
        args.map_mpp, args.noise = cmap.level_mpp(0), "-"
        out = HERE / "out" / f"polygons-{args.map.stem}"
        tiff = args.map
    else:
        w, h = args.size
        out = HERE / "out" / f"polygons-{w}x{h}"
        tiff = out / f"map-{args.map_mpp}-{args.noise}.tiff"
    out.mkdir(parents=True, exist_ok=True)
    if not tiff.is_file():
        t0 = time.perf_counter()
        make_map(tiff, w, h, args.map_mpp, args.noise)
        print(f"map {tiff.name}: made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print("| slide (px) | map mpp | trace mpp | noise | s | regions | vertices | MB | XML s | "
          "XML MB | RSS MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mpp in args.trace_mpp:
        geo = out / f"trace-{mpp}.geojson"
        res = subprocess.run([sys.executable, "-c", _CHILD, str(tiff), str(mpp), str(geo),
                              str(args.slide_mpp)], check=True, capture_output=True,
                             text=True)  # fmt: skip
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {w} x {h} | {args.map_mpp} | {mpp} | {args.noise} | {r['seconds']:.1f} | "
              f"{r['regions']} | {r['vertices']} | {geo.stat().st_size / 1e6:.1f} | "
              f"{r['xml_seconds']:.1f} | {geo.with_suffix('.xml').stat().st_size / 1e6:.1f} | "
              f"{r['rss_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
