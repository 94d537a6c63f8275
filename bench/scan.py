"""Benchmark the slide-folder scan (`dsf.scan.scan_folder`) against the cohort size.

The workflow scans the slide folder at every start and in every cluster job (each parses the
Snakefile), so its cost is paid some seven times per slide. This writes a flat folder of N
empty `.svs` files with TCGA-style names (the scan reads names, not pixels), every third with
a GeoJSON beside it, and times `scan_folder` on it (the best of `--repeat`). The target is
growth in proportion to N: the annotation lookup had matched every file against every slide.

    python bench/scan.py --sizes 1000 4000 16000
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path


def make_folder(folder: Path, n: int) -> None:
    """N empty slide files with TCGA-style names, every third annotated beside it."""
    for i in range(n):
        sid = f"TCGA-A{i % 7}-{i:04d}-01Z-00-DX1.5E1C58B1-63C6-4F4A-8F4D-{i:012d}"
        (folder / f"{sid}.svs").touch()
        if i % 3 == 0:
            (folder / f"{sid}.geojson").write_text('{"type": "FeatureCollection", "features": []}')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    logging.disable(logging.WARNING)  # the empty files' notes are not measured
    from dsf.scan import scan_folder

    print("slides\tannotated\tseconds\tus_per_slide")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_folder(folder, n)
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                rows = scan_folder(folder, mpp=0.25)
                best = min(best, time.perf_counter() - start)
            annotated = sum(1 for r in rows if r["labels"])
            assert len(rows) == n and annotated == (n + 2) // 3, (len(rows), annotated)
            print(f"{n}\t{annotated}\t{best:.3f}\t{1e6 * best / n:.0f}")


if __name__ == "__main__":
    main()
