"""The map writer's per-pixel passes over level 0: masking by the tissue and counting classes.

`MapWriter._write` masks each band's class rows by the tissue mask and counts the pixels of
each class (for `dsf areas`) on the writer thread, over every level-0 map pixel (1.6 Gpx for a
40k x 40k slide mapped at 0.25 um/px). This times the ways of doing each on blocks shaped as
the writer's (256 rows x 16,384 columns, a strided view of a wider band), with map-like
content (uniform regions) and a tissue mask upsampled 8x, and checks they agree.

    .venv/bin/python bench/map_pass.py [--classes 6] [--repeat 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dsf.class_map import class_counts


def _rate(fn, block: np.ndarray, repeat: int) -> float:  # noqa: ANN001
    fn(block)
    t = time.perf_counter()
    for _ in range(repeat):
        fn(block)
    return block.size * repeat / (time.perf_counter() - t) / 1e6


def main() -> None:
    """Print Mpx/s of each way and the seconds each takes for a 1.6 Gpx map."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=6, help="classes with index 0")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    regions = rng.integers(0, args.classes, (16, 80), dtype=np.uint8)
    band = np.repeat(np.repeat(regions, 16, 0), 256, 1)[:256, :20000]
    block = band[:, :16384]
    tissue = np.repeat(np.repeat(rng.random((32, 2048)) < 0.7, 8, 0), 8, 1)
    ways = {
        "mask: np.where(tissue, block, 0).astype(uint8)": lambda b: np.where(tissue, b, 0).astype(
            np.uint8
        ),
        "mask: np.multiply(block, tissue, dtype=uint8)": lambda b: np.multiply(
            b, tissue, dtype=np.uint8
        ),
        "count: np.bincount(block.ravel())": lambda b: np.bincount(
            b.ravel(), minlength=args.classes
        ),
        "count: class_counts (a pass per class)": lambda b: class_counts(b, args.classes),
    }
    ref = np.bincount(block.ravel(), minlength=args.classes)
    assert (class_counts(block, args.classes) == ref).all()
    assert (np.multiply(block, tissue, dtype=np.uint8) == np.where(tissue, block, 0)).all()
    for name, fn in ways.items():
        rate = _rate(fn, block, args.repeat)
        print(f"{name:50s} {rate:8.0f} Mpx/s  {1600 / rate:6.2f} s per 1.6 Gpx")


if __name__ == "__main__":
    main()
