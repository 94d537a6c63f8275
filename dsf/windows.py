"""The window grid of stitched whole-slide inference (DESIGN section 4, Infer): target blocks
with their concentric contexts on a grid of step `stride`, the tissue windows, their Hann
blending weights, and the column bands the slide is streamed in (see `dsf.infer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dsf.errors import ConfigError

WEIGHT_FLOOR = 1e-3  # Hann weights never reach 0, so a pixel seen by one window edge is kept


@dataclass(frozen=True)
class Grid:
    """The window grid at the target mpp (all in target px).

    Window (row i, col j) has its block at x = j * stride - offset, y = i * stride - offset and
    owns the core [j * stride, (j + 1) * stride) x [i * stride, (i + 1) * stride).
    """

    width: int
    height: int
    block: int
    scale: int
    stride: int
    out_factor: int
    band_cores: int
    offset: int  # block origin = core origin - offset

    @property
    def halo(self) -> int:
        """Context margin around the block: (scale - 1) * block / 2."""
        return (self.scale - 1) * self.block // 2

    @property
    def cores(self) -> tuple[int, int]:
        """(rows, cols) of cores covering the slide."""
        return math.ceil(self.height / self.stride), math.ceil(self.width / self.stride)

    def windows_touching(self, first: int, last: int) -> tuple[int, int]:
        """Window indices (inclusive) whose block touches cores first..last on one axis."""
        s, o, b = self.stride, self.offset, self.block
        lo = math.floor(first - (b - o) / s) + 1
        hi = math.ceil(last + 1 + o / s) - 1
        return lo, hi

    @property
    def chunks_per_window(self) -> int:
        """Row chunks of `stride` px one window's context spans."""
        return math.ceil(self.scale * self.block / self.stride)

    @property
    def out_size(self) -> tuple[int, int]:
        """(width, height) of the map at the output mpp."""
        f = self.out_factor
        return math.ceil(self.width / f), math.ceil(self.height / f)


def make_grid(
    width: int, height: int, block: int, scale: int, overlap: float, out_factor: int, band: int
) -> Grid:
    """The grid for a slide of (width, height) target px; the stride is rounded down to a
    multiple of the scale (contexts stay on one reduction grid) and of the output factor."""
    if block % 2:
        raise ConfigError(f"block {block} must be even for concentric contexts")
    unit = math.lcm(scale, out_factor)
    stride = int(block * (1.0 - overlap)) // unit * unit
    if stride < unit:
        fix = (
            "lower infer.overlap"
            if block >= unit
            else f"use a smaller infer.out_mpp: a map pixel ({out_factor} target px, with the "
            f"scale {scale} one step of {unit}) must fit in one {block} px block"
        )
        raise ConfigError(
            f"infer.overlap {overlap} leaves no stride for {block} px blocks at scale {scale} and "
            f"output factor {out_factor}; {fix}"
        )
    # the core sits near the block's centre, shifted so every context starts on a multiple of
    # `scale` (one reduction grid anchored at the slide origin, like a global low-power image)
    halo = (scale - 1) * block // 2
    fits = [o for o in range(block - stride + 1) if (o + halo) % scale == 0]
    if not fits:
        raise ConfigError(
            f"no window offset keeps {block} px blocks at scale {scale} on the context grid; "
            "use a block that is a multiple of 2 x patches.scale"
        )
    offset = min(fits, key=lambda o: abs(o - (block - stride) / 2))
    return Grid(width, height, block, scale, stride, out_factor, band, offset)


def hann_weights(block: int) -> np.ndarray:
    """(block, block) separable Hann window with a small floor: smooth blending weights."""
    u = (np.arange(block) + 0.5) / block
    w = np.maximum(np.sin(np.pi * u) ** 2, WEIGHT_FLOOR)
    return np.outer(w, w).astype(np.float32)


def tissue_windows(grid: Grid, mask: np.ndarray, mask_mpp: float, target_mpp: float) -> np.ndarray:
    """Bool (rows, cols) over all windows whose block touches tissue, with the window index
    offsets (row0, col0) of element [0, 0]: windows_touching(0, cores - 1) per axis."""
    rows, cols = grid.cores
    r0, r1 = grid.windows_touching(0, rows - 1)
    c0, c1 = grid.windows_touching(0, cols - 1)
    integral = np.pad(np.asarray(mask, bool).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = mask.shape
    f = target_mpp / mask_mpp  # mask px per target px

    def edges(idx: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        start = idx * grid.stride - grid.offset
        a = np.clip(np.floor(start * f).astype(np.int64), 0, limit)
        b = np.clip(np.ceil((start + grid.block) * f).astype(np.int64), 0, limit)
        return a, b

    ya, yb = edges(np.arange(r0, r1 + 1), mh)
    xa, xb = edges(np.arange(c0, c1 + 1), mw)
    total = integral[yb][:, xb] - integral[ya][:, xb] - integral[yb][:, xa] + integral[ya][:, xa]
    return total > 0


def out_factor(out_mpp: float | None, target_mpp: float, tolerance: float = 0.0) -> int:
    """Integer output pixel size in target px: infer.out_mpp must be a whole multiple of
    `target_mpp` within the relative `tolerance` (patches.mpp_tolerance: the map is made at
    what the slide's level delivers, 0.2527 x 2 for a model of 0.5 on a 40x scan, and a model
    records its tiles' mpp, 0.505 for such a scan's)."""
    if out_mpp is None:
        return 1
    f = out_mpp / target_mpp
    n = max(1, round(f))
    if abs(f / n - 1) > max(tolerance, 1e-6):
        within = f" (within patches.mpp_tolerance {tolerance:g})" if tolerance else ""
        raise ConfigError(
            f"infer.out_mpp {out_mpp} must be a whole multiple of the target mpp {target_mpp:g}"
            f"{within} (e.g. {target_mpp:g}, {2 * target_mpp:g}, {4 * target_mpp:g})"
        )
    return n


def final_rows(grid: Grid, last_done_wrow: int) -> int:
    """Core rows below which every touching window row is <= last_done_wrow (exclusive)."""
    # core row r is touched by window rows up to r + ceil(offset / stride)
    return max(0, last_done_wrow - math.ceil(grid.offset / grid.stride) + 1)


@dataclass
class Band:
    """One column band of the slide: its cores, windows and the row chunks read for them."""

    index: int
    cores: tuple[int, int]  # first, last core column (inclusive)
    wcols: tuple[int, int]  # first, last window column (inclusive)
    wrows: list[int]  # window rows with a tissue window, ascending
    x0: int  # target px of the band's read origin (left of the first context)
    y0: int  # target px of chunk 0's top
    width: int  # width of the band's row chunks (target px)
    chunks: list[int]  # chunk indices to read, ascending
    spans: dict[int, tuple[int, int]]  # chunk index -> columns [a, b) its windows need


def plan_bands(grid: Grid, run_grid: np.ndarray) -> list[Band]:
    """The column bands, each with the chunks its tissue windows need and, per chunk, the
    columns those windows' contexts cover: only they are read (a band's columns without tissue
    nearby cost no decoding; 20% fewer pixels on the 40k synthetic slide)."""
    rows, cols = grid.cores
    r0, _ = grid.windows_touching(0, rows - 1)
    c0, _ = grid.windows_touching(0, cols - 1)
    s, n_c = grid.stride, grid.chunks_per_window
    field = grid.scale * grid.block  # a window's context, in target px
    bands = []
    for j, first in enumerate(range(0, cols, grid.band_cores)):
        last = min(cols, first + grid.band_cores) - 1
        wc0, wc1 = grid.windows_touching(first, last)
        sub = run_grid[:, wc0 - c0 : wc1 - c0 + 1]
        has = sub.any(axis=1)
        wrows = [int(i) + r0 for i in np.flatnonzero(has)]
        # per window row the first and last tissue window (relative to wc0)
        lo = np.where(has, sub.argmax(axis=1), sub.shape[1])
        hi = np.where(has, sub.shape[1] - 1 - sub[:, ::-1].argmax(axis=1), -1)
        spans: dict[int, tuple[int, int]] = {}
        for i in np.flatnonzero(has):  # window row i needs chunks i .. i + n_c - 1
            for k in range(int(i), int(i) + n_c):
                a, b = spans.get(k, (sub.shape[1], -1))
                spans[k] = (min(a, int(lo[i])), max(b, int(hi[i])))
        spans = {k: (a * s, b * s + field) for k, (a, b) in spans.items()}
        y0 = r0 * s - grid.offset - grid.halo
        x0 = wc0 * s - grid.offset - grid.halo
        width = (wc1 - wc0) * s + field
        band = Band(j, (first, last), (wc0, wc1), wrows, x0, y0, width, sorted(spans), spans)
        bands.append(band)
    return bands
