"""Stitched whole-slide inference: full-slide class maps from fine-tuned HookNets (issue 5).

Windows: every target block of `block` px at the target mpp, with its concentric context
(`scale` x the field of view, reduced by `scale` exactly as `dsf patches` made the training
contexts), on a grid of step `stride` = block x (1 - overlap). Each window owns the central
`stride` x `stride` cell ("core") of its block; the cores tile the slide. A window runs when its
block touches tissue (the tissue mask of `dsf tissue`); neighbouring windows are blended with a
smooth (Hann) weight window, so no seams show, and the class is the argmax of the blended
foreground probabilities (0 = background: outside the tissue or never predicted).

Streaming, so memory is flat in slide size: the slide is cut into column bands of
`band_windows` cores; each band is read top to bottom in row chunks of `stride` px (each chunk
read once, and only the columns its windows' contexts cover, by prefetching reader threads,
overlapped with the model), each chunk goes to the model's device once, the windows of a window
row are cut there in one gather and blended in a few ops per row (whatever its number of
windows), and a core row is written out as soon as no later window touches it. Band edges
recompute the one or two windows whose blocks reach into the neighbour band, instead of holding
a full-width accumulator. The map's pyramid is built as its rows are written (each level a
subsampling of level 0; the large levels spooled to disk as compressed TIFF tiles, compressed
while the model works), then written as a tiled, pyramidal, palette TIFF that OpenSlide and
QuPath open at the slide's scale (resolution tags in px/cm).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dsf import __version__
from dsf.atomic import atomic_path, remove
from dsf.class_tiff import pyramid_levels, write_block, write_tiff
from dsf.colours import class_colours
from dsf.config import add_section_arguments, section_from_args
from dsf.errors import ConfigError, SlideError
from dsf.predict import Predictor, load_predictor
from dsf.runner import run, setup_logging
from dsf.slide import Slide, open_slide
from dsf.tilespool import TileSpool

log = logging.getLogger(__name__)

#: out_of_fold: the model of the fold that held the slide out; ensemble: every fold's averaged;
#: fold: one fold's (infer.unlabelled_fold); given: models named by apply.models (a prediction
#: run with models trained before)
ROUTINGS = ("out_of_fold", "ensemble", "fold", "given")
WEIGHT_FLOOR = 1e-3  # Hann weights never reach 0, so a pixel seen by one window edge is kept


# -- geometry ---------------------------------------------------------------------------------
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
        raise ConfigError(
            f"infer.overlap {overlap} leaves no stride for {block} px blocks at scale {scale} and "
            f"output factor {out_factor}; lower infer.overlap"
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


# -- reading ----------------------------------------------------------------------------------
def reduce_rgb(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Exact box average by `factor` (PIL reduce), as `dsf patches` made the contexts."""
    if factor == 1:
        return rgb
    return np.asarray(Image.fromarray(rgb).reduce(factor))


def reduce_rows(rgb: torch.Tensor, factor: int) -> torch.Tensor:
    """`reduce_rgb` in torch, on the rows' device: a (H, W, 3) uint8 tensor with H and W
    multiples of `factor` -> (H / factor, W / factor, 3), equal to PIL's reduce to the bit (its
    fixed-point rounding: (sum + n / 2) * floor(2**24 / n) >> 24 over the n = factor**2 px)."""
    if factor == 1:
        return rgb
    h, w, c = rgb.shape
    n = factor * factor
    sums = rgb.view(h // factor, factor, w // factor, factor, c).sum((1, 3), dtype=torch.int64)
    return (((sums + n // 2) * int((1 << 24) / n)) >> 24).to(torch.uint8)


@dataclass
class _Band:
    index: int
    cores: tuple[int, int]  # first, last core column (inclusive)
    wcols: tuple[int, int]  # first, last window column (inclusive)
    wrows: list[int]  # window rows with a tissue window, ascending
    x0: int  # target px of the band's read origin (left of the first context)
    y0: int  # target px of chunk 0's top
    width: int  # width of the band's row chunks (target px)
    chunks: list[int]  # chunk indices to read, ascending
    spans: dict[int, tuple[int, int]]  # chunk index -> columns [a, b) its windows need


def _bands(grid: Grid, run_grid: np.ndarray) -> list[_Band]:
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
        band = _Band(j, (first, last), (wc0, wc1), wrows, x0, y0, width, sorted(spans), spans)
        bands.append(band)
    return bands


class _Reader:
    """Prefetches (band, chunk) row chunks at the target mpp with their reduced contexts, as
    uint8 tensors. With `pin` (a GPU run) the rows land in page-locked memory, so the copy to
    the GPU is asynchronous, and the context is left to the device (`reduce_rows`, None here):
    a reader thread then holds the GIL only for microseconds per chunk, so the main thread,
    which launches the GPU's work, rarely waits for it."""

    def __init__(
        self, slide: Slide, grid: Grid, target_mpp: float, threads: int, pin: bool = False
    ) -> None:
        self.slide, self.grid, self.mpp, self.pin = slide, grid, target_mpp, pin
        self.contexts_on_device = pin
        self.f0 = target_mpp / slide.mpp
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dsf-read")
        self.ahead = 2 * threads
        self.pending: deque[tuple[int, int, Future[tuple[torch.Tensor, torch.Tensor | None]]]]
        self.pending = deque()

    def _read(self, band: _Band, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunk k of the band, full band width: the columns its windows need read from the
        slide, the others (which no window reads) set to the slide's background."""
        y = band.y0 + k * self.grid.stride
        a, b = band.spans[k]
        rgb = self.slide.read(
            (band.x0 + a) * self.f0, y * self.f0, b - a, self.grid.stride, self.mpp
        )
        bg, sc = self.slide.background, self.grid.scale
        rows = _full_width(rgb, a, band.width, bg, self.pin)
        if self.contexts_on_device:
            return rows, None
        # only the read columns are reduced (a and b - a are multiples of the scale)
        return rows, _full_width(reduce_rgb(rgb, sc), a // sc, band.width // sc, bg, self.pin)

    def stream(
        self, bands: list[_Band]
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """(band index, chunk index, target rows, context rows or None) in band and row order."""
        todo = iter([(b, k) for b in bands for k in b.chunks])
        try:
            while True:
                while len(self.pending) < self.ahead:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    band, k = nxt
                    self.pending.append((band.index, k, self.pool.submit(self._read, band, k)))
                if not self.pending:
                    return
                j, k, fut = self.pending.popleft()
                yield j, k, *fut.result()
        finally:
            for *_, fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _full_width(
    rgb: np.ndarray, x: int, width: int, background: tuple[int, int, int], pin: bool
) -> torch.Tensor:
    """`rgb` placed at column x of a (h, width, 3) uint8 tensor (page-locked when `pin`), the
    columns outside it the background; `rgb` itself when it spans the whole width."""
    h, w, _ = rgb.shape
    if x == 0 and w == width:
        return _tensor(rgb, pin)
    out = torch.empty((h, width, 3), dtype=torch.uint8, pin_memory=pin)
    a = out.numpy()
    a[:, x : x + w] = rgb
    a[:, :x] = background
    a[:, x + w :] = background
    return out


def _tensor(a: np.ndarray, pin: bool) -> torch.Tensor:
    """A uint8 array as a tensor: copied into page-locked memory when `pin`, else shared (copied
    only when read-only, as PIL's arrays are, since torch tensors are writable)."""
    if pin:
        t = torch.empty(a.shape, dtype=torch.uint8, pin_memory=True)
        t.numpy()[...] = a
        return t
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _rows(chunks: dict[int, torch.Tensor], chunk_h: int, y: int, size: int) -> torch.Tensor:
    """Rows [y, y + size) of the band's concatenated chunks (H, W, 3): a view where one chunk
    holds them, else one copy on the chunks' device."""
    k, r = divmod(y, chunk_h)
    if r + size <= chunk_h:
        return chunks[k][r : r + size]
    parts, done = [], 0
    while done < size:
        k, r = divmod(y + done, chunk_h)
        n = min(size - done, chunk_h - r)
        parts.append(chunks[k][r : r + n])
        done += n
    return torch.cat(parts)


def _windows(strip: torch.Tensor, x0: int, step: int, cells: torch.Tensor) -> torch.Tensor:
    """The (n, h, h, 3) squares of an (h, W, 3) strip at columns x0 + cells * step: one
    `index_select` over the strip's windows as a view (each window's rows whole runs of bytes),
    so a window row costs a few ops on the main thread whatever its number of windows."""
    h, w, c = strip.shape
    runs = strip[:, x0:].reshape(h, (w - x0) * c).unfold(1, h * c, step * c)  # (h, L, h * c)
    return runs.transpose(0, 1).index_select(0, cells).view(-1, h, h, c)


def _index(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 index tensor on `device`; to a GPU from page-locked memory without blocking
    (a plain copy of a host tensor would wait for all the queued work)."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


# -- accumulation and output ------------------------------------------------------------------
class _BandAccumulator:
    """Blended foreground probabilities of one band's core rows, on the model's device: per
    core row one (n_fg + 1, stride, cells * stride) tensor, the weighted probabilities and, as
    the last plane, the sum of the weights. Its columns are cells of `stride` px, cell c
    starting where the block of window column wcols[0] + c starts, so every window of the band
    starts on a cell."""

    def __init__(
        self, grid: Grid, band: _Band, n_fg: int, device: torch.device, want_probs: bool
    ) -> None:
        self.grid, self.band, self.n_fg, self.device = grid, band, n_fg, device
        self.want_probs = want_probs
        s = grid.stride
        wc0, wc1 = band.wcols
        self.pieces = math.ceil(grid.block / s)  # cells one block spans
        self.cells = wc1 - wc0 + self.pieces
        x_own = band.cores[0] * s  # target px of the band's first owned column
        self.w_own = (band.cores[1] - band.cores[0] + 1) * s
        first = x_own - (wc0 * s - grid.offset)  # the owned columns, in the rows' columns
        self.own = slice(first, first + self.w_own)
        self.rows: dict[int, torch.Tensor] = {}
        self.weights = torch.from_numpy(hann_weights(grid.block)).to(device)

    def _row(self, r: int) -> torch.Tensor:
        if r not in self.rows:
            shape = (self.n_fg + 1, self.grid.stride, self.cells * self.grid.stride)
            self.rows[r] = torch.zeros(shape, device=self.device)
        return self.rows[r]

    def add(self, wrow: int, cells: torch.Tensor, probs: torch.Tensor) -> None:
        """Add the (n, n_fg, block, block) probabilities of window row `wrow`'s windows in
        `cells` (their columns less the band's first, on the device) with the blending weights.

        Cut into pieces of `stride` columns, the windows of one row put each piece in cells of
        their own, so one `index_add_` per piece and core row adds all of them: a few ops per
        row whatever its number of windows (one slice-add per window and core row made the
        main thread, which launches a GPU's work, the bottleneck of a GPU run).
        """
        g = self.grid
        s, b = g.stride, g.block
        w = self.weights.expand(probs.shape[0], 1, b, b)
        weighted = torch.cat([probs * w, w], 1)  # the weights ride along as the last plane
        at = [cells + p if p else cells for p in range(self.pieces)]
        y = wrow * s - g.offset  # block top
        for r in range(max(0, math.floor(y / s)), min(g.cores[0], math.ceil((y + b) / s))):
            top, bottom = max(y, r * s), min(y + b, (r + 1) * s)
            src = weighted[:, :, top - y : bottom - y]  # (n, C, h, block)
            dst = self._row(r)[:, top - r * s : bottom - r * s].unflatten(2, (self.cells, s))
            for p, index in enumerate(at):
                width = min(s, b - p * s)
                piece = src[..., p * s : p * s + width].permute(1, 2, 0, 3)  # (C, h, n, width)
                dst[..., :width].index_add_(2, index, piece)

    def pop(self, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Core row r as output px, on the device: (classes uint8 (h, w), foreground
        probabilities uint8 (n_fg, h, w) or None when not wanted or nothing ran there)."""
        g = self.grid
        f = g.out_factor
        h, w = g.stride // f, self.w_own // f
        if r not in self.rows:
            return torch.zeros((h, w), dtype=torch.uint8, device=self.device), None
        acc = self.rows.pop(r)[:, :, self.own]
        if f > 1:
            acc = torch.nn.functional.avg_pool2d(acc[None], f)[0]
        acc, wsum = acc[:-1], acc[-1]
        # argmax over the few class planes by elementwise comparison: torch's argmax over the
        # leading dimension was 30% of a CPU run
        best, cls = acc[0], torch.ones(acc.shape[1:], dtype=torch.uint8, device=acc.device)
        for c in range(1, acc.shape[0]):
            better = acc[c] > best
            best = torch.where(better, acc[c], best)
            cls[better] = c + 1
        cls[wsum <= 0] = 0
        if not self.want_probs:
            return cls, None
        total = acc.sum(0, keepdim=True).clamp_min(1e-12)
        return cls, (acc / total * 255).round().to(torch.uint8)


class _RowsToHost:
    """Finished core rows on their way from the device to the writer, in order. On a GPU each
    row is copied into page-locked memory without waiting, and handed on once its copy is done,
    so the model never waits for the writer (a plain `.cpu()` would wait for every queued
    batch); `limit` rows at most are in flight. On the CPU rows pass straight through."""

    def __init__(
        self, writer: _MapWriter | _WriterThread, device: torch.device, limit: int = 64
    ) -> None:
        self.writer, self.limit = writer, limit
        self.gpu = device.type == "cuda"
        self.new_event: Any = torch.cuda.Event
        # the stream the copies run on: that of `device`, whichever card is current
        self.stream: Any = torch.cuda.current_stream(device) if self.gpu else None
        self.pending: deque[tuple[int, torch.Tensor, torch.Tensor | None, Any]] = deque()

    def _host(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not self.gpu:
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out

    def put(self, band: int, cls: torch.Tensor, probs: torch.Tensor | None) -> None:
        event = None
        cls_h, probs_h = self._host(cls), self._host(probs)
        if self.gpu:
            event = self.new_event()
            event.record(self.stream)
        self.pending.append((band, cls_h, probs_h, event))  # type: ignore[arg-type]
        self.drain(block=len(self.pending) > self.limit)

    def drain(self, block: bool) -> None:
        """Hand on the rows whose copies are done (with `block`, the oldest, waiting for it,
        and every one done by then; `drain(block=True)` until empty to flush)."""
        while self.pending:
            band, cls, probs, event = self.pending[0]
            if event is not None and not event.query():
                if not block:
                    return
                event.synchronize()
                block = False
            self.pending.popleft()
            self.writer.add_row(band, cls.numpy(), None if probs is None else probs.numpy())

    def flush(self) -> None:
        while self.pending:
            self.drain(block=True)


class _MapWriter:
    """The map's pyramid (and optional probabilities), band by band, in whole row chunks so
    no chunk is written twice. Level i is level 0 subsampled by 2**i (nearest, the top-left
    pixel of each 2**i square), written from each block as level 0 is, so no pass over the
    finished level 0 is needed. Levels larger than MEMORY_LEVEL_PX are spooled to the work
    directory as compressed TIFF tiles (`TileSpool`, where rows of a reduced level wait until
    they fill whole tile rows), so the TIFF is written by copying them."""

    def __init__(
        self,
        work: Path,
        grid: Grid,
        n_fg: int,
        tissue: np.ndarray | None,
        tissue_f: float,
        probs: Path | None,
        tile: int,
        threads: int = 4,
    ) -> None:
        self.grid = grid
        ow, oh = grid.out_size
        self.band_w = grid.band_cores * grid.stride // grid.out_factor
        self.chunk_h = tile
        work.mkdir(parents=True)
        # zlib frees the GIL: a few threads (within the job's) compress the tiles
        self.pool = ThreadPoolExecutor(min(4, threads), thread_name_prefix="dsf-zlib")
        self.levels = pyramid_levels(work, oh, ow, tile, self.pool)
        self.probs = None
        if probs is not None:
            import zarr

            proot = zarr.open_group(str(probs), mode="w", zarr_format=3)
            self.probs = proot.create_array(
                "0",
                shape=(n_fg, oh, ow),
                chunks=(n_fg, self.chunk_h, self.band_w),
                dtype="uint8",
                fill_value=0,
            )
        self.tissue, self.tissue_f = tissue, tissue_f
        self.n_fg = n_fg
        self._reset(0)

    def close(self) -> None:
        """Finish the spools (after the last flush)."""
        for level in self.levels:
            if isinstance(level, TileSpool):
                level.close()
        self.pool.shutdown()

    def _reset(self, band: int) -> None:
        self.band = band
        self.y = 0
        self.cls_rows: list[np.ndarray] = []
        self.prob_rows: list[np.ndarray] = []

    def _mask(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The tissue mask (nearest) over output px [y, y+h) x [x, x+w)."""
        assert self.tissue is not None
        mh, mw = self.tissue.shape
        ys = np.minimum(((np.arange(y, y + h) + 0.5) * self.tissue_f).astype(np.int64), mh - 1)
        xs = np.minimum(((np.arange(x, x + w) + 0.5) * self.tissue_f).astype(np.int64), mw - 1)
        return self.tissue[ys][:, xs]

    def add_row(self, band: int, cls: np.ndarray, probs: np.ndarray | None) -> None:
        if band != self.band:
            self.flush(final=True)
            self._reset(band)
        self.cls_rows.append(cls)
        if self.probs is not None:
            if probs is None:
                probs = np.zeros((self.n_fg, *cls.shape), np.uint8)
            self.prob_rows.append(probs)
        if sum(r.shape[0] for r in self.cls_rows) >= self.chunk_h:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write the whole tile rows received (all rows when `final`, the band's end)."""
        if self.cls_rows:
            self._write(final)
        if final:  # the band's end: its rows waiting for a whole tile row are stored
            for level in self.levels:
                if isinstance(level, TileSpool):
                    level.flush()

    def _write(self, final: bool) -> None:
        cls = np.concatenate(self.cls_rows, axis=0)
        probs = np.concatenate(self.prob_rows, axis=1) if self.prob_rows else None
        ow, oh = self.grid.out_size
        x = self.band * self.band_w
        n = cls.shape[0] if final else cls.shape[0] // self.chunk_h * self.chunk_h
        h, w = min(n, oh - self.y), min(self.band_w, ow - x)
        if h > 0 and w > 0:
            block = cls[:h, :w]
            if self.tissue is not None:
                block = np.where(self._mask(self.y, x, h, w), block, 0).astype(np.uint8)
            write_block(self.levels, self.y, x, block)
            if self.probs is not None and probs is not None:
                self.probs[:, self.y : self.y + h, x : x + w] = probs[:, :h, :w]
        self.y += n
        self.cls_rows = [cls[n:]] if n < cls.shape[0] else []
        if probs is not None:
            self.prob_rows = [probs[:, n:]] if n < cls.shape[0] else []


class _WriterThread:
    """The map writer on a thread of its own, fed in order through a bounded queue: the
    subsampling into the pyramid and the compression of the map's tiles then run beside the main
    thread, which launches the GPU's work (on the 40k slide they were seconds of its time). An
    error there is raised in the main thread at its next hand-over, or by `join`; a file-system
    error (a full disk, no permission) as a `SlideError` that names the slide and the map."""

    def __init__(self, writer: _MapWriter, slide_id: str, out_map: Path, depth: int = 16) -> None:
        import queue
        import threading

        self.writer, self.slide_id, self.out_map = writer, slide_id, out_map
        self.queue: queue.Queue[tuple[Any, tuple[Any, ...]] | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="dsf-write", daemon=True)
        self.thread.start()

    @property
    def probs(self) -> Any:
        return self.writer.probs

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error, only drain until told to stop
                fn, args = item
                try:
                    fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc

    def _put(self, fn: Any, *args: Any) -> None:
        self._raise()
        self.queue.put((fn, args))

    def _raise(self) -> None:
        if isinstance(self.error, OSError):
            raise SlideError(
                self.slide_id,
                f"writing its map {self.out_map} failed ({type(self.error).__name__}: "
                f"{self.error}); free disk space there or fix its permissions, then rerun",
            ) from self.error
        if self.error is not None:
            raise self.error

    def add_row(self, band: int, cls: np.ndarray, probs: np.ndarray | None) -> None:
        self._put(self.writer.add_row, band, cls, probs)

    def flush(self, final: bool) -> None:
        self._put(self.writer.flush, final)

    def join(self, raise_error: bool = True) -> None:
        """Wait until everything handed over is written (then raise its error, if any)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error:
            self._raise()


def render_overlay(
    thumb: np.ndarray, classes_map: np.ndarray, names: list[str], alpha: float = 0.45
) -> np.ndarray:
    """The thumbnail with predicted classes tinted (background untouched) and a legend strip."""
    h, w = thumb.shape[:2]
    cmap = Image.fromarray(classes_map).resize((w, h), Image.Resampling.NEAREST)
    cls = np.asarray(cmap)
    colours = class_colours(len(names)).astype(np.float32)
    out = thumb.astype(np.float32)
    fg = cls > 0
    out[fg] = out[fg] * (1 - alpha) + colours[cls[fg]] * alpha
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    # the legend scales with the picture so it stays readable at any overlay size
    size = max(12, w // 60)
    font = ImageFont.load_default(size=size)
    pad = size // 2
    canvas = Image.new("RGB", (w, h + size + 2 * pad), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for i, name in enumerate(names[1:], start=1):
        c = tuple(int(v) for v in colours[i])
        draw.rectangle([x, h + pad, x + size, h + pad + size], fill=c, outline=(0, 0, 0))
        draw.text((x + size + pad // 2, h + pad), name, fill=(0, 0, 0), font=font)
        x += size + pad + int(draw.textlength(name, font=font)) + 2 * pad
    return np.asarray(canvas)


# -- the stage --------------------------------------------------------------------------------
def _check_models(preds: list[Predictor]) -> None:
    ref = preds[0]
    for p in preds[1:]:
        for key in ("classes", "scale", "block", "target_mpp", "init"):
            if getattr(p, key) != getattr(ref, key):
                raise ConfigError(
                    f"models to ensemble differ in {key} ({getattr(ref, key)} vs "
                    f"{getattr(p, key)}); they must come from one fine-tuning configuration"
                )
    fractions = sorted({float(p.meta.get("fraction", 1.0)) for p in preds})
    if len(fractions) > 1:  # e.g. apply.models pointing at results/finetune/<init>, not frac<f>
        log.warning(
            "the %d models averaged were fine-tuned on different label fractions %s; to use "
            "one, give the folder of that fraction (results/finetune/<init>/frac<f>)",
            len(preds),
            fractions,
        )


def out_factor(out_mpp: float | None, target_mpp: float) -> int:
    """Integer output pixel size in target px (infer.out_mpp must be a multiple)."""
    if out_mpp is None:
        return 1
    f = out_mpp / target_mpp
    if f < 1 - 1e-6 or abs(f - round(f)) > 1e-6:
        raise ConfigError(
            f"infer.out_mpp {out_mpp} must be a whole multiple of the target mpp {target_mpp} "
            f"(e.g. {target_mpp}, {2 * target_mpp}, {4 * target_mpp})"
        )
    return int(round(f))


class _Stitcher:
    """Cuts the tissue windows from the streamed row chunks band by band, runs the models in
    batches (averaging their probabilities), blends them into the band's accumulator and hands
    every finished core row to the writer."""

    def __init__(
        self,
        grid: Grid,
        run_grid: np.ndarray,
        preds: list[Predictor],
        writer: _MapWriter | _WriterThread,
        batch_size: int,
        bar: Any,
    ) -> None:
        self.grid, self.run_grid, self.preds, self.writer = grid, run_grid, preds, writer
        self.batch_size, self.bar = batch_size, bar
        rows, cols = grid.cores
        self.r0, _ = grid.windows_touching(0, rows - 1)
        self.c0, _ = grid.windows_touching(0, cols - 1)
        self.n_fg = len(preds[0].classes) - 1
        self.device = preds[0].device
        self.to_host = _RowsToHost(writer, self.device)
        self.windows = 0
        # queued pieces of window rows: (window row, their cells on the device, contexts, targets)
        self.batch: deque[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self.queued = 0  # windows in the queue
        self.tgt: dict[int, torch.Tensor] = {}  # chunk index -> target-mpp rows, on the device
        self.ctx: dict[int, torch.Tensor] = {}  # chunk index -> the same rows reduced by scale
        self.band: _Band | None = None
        self.acc: _BandAccumulator | None = None
        self.pending: deque[int] = deque()  # window rows of the band still to cut
        self.next_row = 0  # next core row of the band to write

    def run(self, bands: list[_Band], chunks: Iterator[tuple[int, int, Any, Any]]) -> None:
        """Consume (band, chunk, target rows, context rows) in band and row order."""
        todo = iter(bands)
        n_c = self.grid.chunks_per_window
        for j, k, rgb, ctx in chunks:
            while self.band is None or j != self.band.index:
                if self.band is not None:
                    self._close()
                self._start(next(todo))
            self.tgt[k] = rgb.to(self.device, non_blocking=True)
            if ctx is None:  # left to the device by the reader
                self.ctx[k] = reduce_rows(self.tgt[k], self.grid.scale)
            else:
                self.ctx[k] = ctx.to(self.device, non_blocking=True)
            # a window row is cut once its last chunk has arrived
            while self.pending and self.pending[0] - self.r0 + n_c - 1 <= k:
                self._emit(self.pending.popleft())
        if self.band is not None:
            self._close()
        for band in todo:  # bands without tissue after the last chunk: background rows
            self._start(band)
            self._close()

    def _start(self, band: _Band) -> None:
        self.band = band
        self.acc = _BandAccumulator(
            self.grid, band, self.n_fg, self.device, self.writer.probs is not None
        )
        self.pending = deque(band.wrows)
        self.next_row = 0
        self.tgt.clear()
        self.ctx.clear()

    def _close(self) -> None:
        while self.pending:
            self._emit(self.pending.popleft())
        while self.batch:
            self._run_batch()
        self._finish_rows(self.grid.cores[0])
        self.to_host.flush()
        self.writer.flush(final=True)

    def _emit(self, wr: int) -> None:
        """Cut the tissue windows of window row `wr` (all its chunks are on the device) in two
        gathers, and run the batches that fill up."""
        assert self.band is not None
        g = self.grid
        s, b, sc = g.stride, g.block, g.scale
        k0 = wr - self.r0
        wc0, wc1 = self.band.wcols
        run = self.run_grid[wr - self.r0, wc0 - self.c0 : wc1 - self.c0 + 1]
        wcols = np.flatnonzero(run) + wc0
        if len(wcols):
            cells = _index(wcols - wc0, self.device)
            tgt = _windows(_rows(self.tgt, s, k0 * s + g.halo, b), g.halo, s, cells)
            ctx = _windows(_rows(self.ctx, s // sc, k0 * s // sc, b), 0, s // sc, cells)
            self.batch.append((wr, cells, ctx, tgt))
            self.queued += len(wcols)
        while self.queued >= self.batch_size:
            self._run_batch()
            # every window of the rows before wr has run: their core rows are final
            self._finish_rows(_final_rows(g, wr - 1))
        for k in [k for k in self.tgt if k <= k0]:
            del self.tgt[k], self.ctx[k]

    def _run_batch(self) -> None:
        """Run the first `batch_size` queued windows (pieces of window rows, split if need be)
        and blend them into the band's accumulator."""
        if not self.batch:
            return
        assert self.acc is not None
        take: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        n = 0
        while self.batch and n < self.batch_size:
            wr, cells, ctx, tgt = self.batch.popleft()
            room = self.batch_size - n
            if cells.shape[0] > room:  # split the row piece; the rest stays first in the queue
                self.batch.appendleft((wr, cells[room:], ctx[room:], tgt[room:]))
                cells, ctx, tgt = cells[:room], ctx[:room], tgt[:room]
            take.append((wr, cells, ctx, tgt))
            n += cells.shape[0]
        ctx = torch.cat([c for *_, c, _ in take]) if len(take) > 1 else take[0][2]
        tgt = torch.cat([t for *_, t in take]) if len(take) > 1 else take[0][3]
        probs = sum(m.probabilities(ctx, tgt) for m in self.preds) / len(self.preds)
        start = 0
        for wr, cells, *_ in take:
            self.acc.add(wr, cells, probs[start : start + cells.shape[0], 1:])
            start += cells.shape[0]
        self.queued -= n
        self.windows += n
        self.bar.update(n)

    def _finish_rows(self, upto: int) -> None:
        """Write core rows next_row..upto-1 of the band (every window touching them ran)."""
        assert self.acc is not None and self.band is not None
        while self.next_row < min(upto, self.grid.cores[0]):
            self.to_host.put(self.band.index, *self.acc.pop(self.next_row))
            self.next_row += 1


def infer_slide(
    slide: Slide,
    mask: np.ndarray,
    mask_mpp: float,
    preds: list[Predictor],
    settings: dict[str, Any],
    out_map: Path,
    out_overlay: Path,
    out_meta: Path,
    out_probs: Path | None = None,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict the whole slide and write the map, overlay, metadata (and probabilities)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    _check_models(preds)
    p = preds[0]
    t = p.target_mpp
    f = out_factor(settings["out_mpp"], t)
    width, height = slide.size_at(t)
    grid = make_grid(
        width, height, p.block, p.scale, settings["overlap"], f, settings["band_windows"]
    )
    run_grid = tissue_windows(grid, mask, mask_mpp, t)
    bands = _bands(grid, run_grid)
    n_fg = len(p.classes) - 1
    log.info(
        "%s: %dx%d px at %.4g um/px, %d windows of %d px over tissue (stride %d, %d bands)",
        slide.slide_id,
        width,
        height,
        t,
        int(run_grid.sum()),
        grid.block,
        grid.stride,
        len(bands),
    )
    phases: dict[str, float] = {}  # seconds per phase: where a run's time went
    clock = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 3)
        clock[0] = now

    work = out_map.with_name(f".{out_map.name}.work")
    remove(work)
    out_mpp = t * f
    tissue = mask if settings["mask_output"] else None
    # the overlay's thumbnail is read beside the prediction, not after it
    thumb_mpp = max(out_mpp, max(slide.dimensions) * slide.mpp / settings["overlay_px"])
    thumbs = ThreadPoolExecutor(1, thread_name_prefix="dsf-thumb")
    thumb = thumbs.submit(slide.thumbnail, thumb_mpp)
    try:
        probs_ctx = atomic_path(out_probs) if out_probs is not None else nullcontext()
        with probs_ctx as probs_tmp:
            writer = _MapWriter(
                work,
                grid,
                n_fg,
                tissue,
                out_mpp / mask_mpp,
                probs_tmp,
                settings["tile"],
                settings["threads"],
            )
            bar = tqdm(
                total=int(run_grid.sum()), unit="win", disable=not progress, desc=slide.slide_id
            )
            sink = _WriterThread(writer, slide.slide_id, out_map)
            try:
                stitcher = _Stitcher(grid, run_grid, preds, sink, settings["batch_size"], bar)
                reader = _Reader(slide, grid, t, settings["threads"], pin=p.device.type == "cuda")
                with closing(reader.stream(bands)) as chunks:
                    stitcher.run(bands, chunks)
                sink.join()
            finally:  # the writer stops before its work directory is removed
                sink.join(raise_error=False)
                writer.close()
            n_windows = stitcher.windows
            bar.close()
            if probs_tmp is not None:
                _write_ome_attrs(probs_tmp, p.classes[1:], out_mpp)
        levels = writer.levels
        lap("predict")
        with atomic_path(out_map) as tmp:
            write_tiff(tmp, levels, out_mpp, len(p.classes), settings["tile"], settings["threads"])
        lap("tiff")
        level = min(len(levels) - 1, max(0, int(math.floor(math.log2(thumb_mpp / out_mpp)))))
        small = levels[level]
        small = small.asarray() if isinstance(small, TileSpool) else small
        overlay = render_overlay(thumb.result(), small, p.classes)
        with atomic_path(out_overlay) as tmp:
            Image.fromarray(overlay).save(tmp, format="JPEG", quality=90)
        lap("overlay")
    finally:
        thumbs.shutdown(wait=True, cancel_futures=True)
        remove(work)
    ow, oh = grid.out_size
    meta = {
        "slide": slide.slide_id,
        "init": p.init,
        "fraction": p.meta.get("fraction"),
        "mpp": out_mpp,
        "width": ow,
        "height": oh,
        "classes": p.classes,
        "windows": n_windows,
        "stride": grid.stride,
        "block": grid.block,
        "scale": grid.scale,
        "target_mpp": t,
        "seconds": round(time.perf_counter() - t0, 3),
        "phase_seconds": phases,
        "settings": settings,
        "dsf_version": __version__,
        **(extra_meta or {}),
    }
    with atomic_path(out_meta) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log.info("%s: %d windows in %.1f s -> %s", slide.slide_id, n_windows, meta["seconds"], out_map)
    return meta


def _final_rows(grid: Grid, last_done_wrow: int) -> int:
    """Core rows below which every touching window row is <= last_done_wrow (exclusive)."""
    # core row r is touched by window rows up to r + ceil(offset / stride)
    return max(0, last_done_wrow - math.ceil(grid.offset / grid.stride) + 1)


def _write_ome_attrs(store: Path, names: list[str], mpp: float) -> None:
    """OME-Zarr (NGFF 0.5) multiscales metadata for the (class, y, x) probability array."""
    import zarr

    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": "probabilities",
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp, mpp]}],
                    }
                ],
            }
        ],
        "omero": {"channels": [{"label": n} for n in names]},
    }
    root.attrs["dsf"] = {"classes": names, "scale": "probability x 255 (uint8)"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--slide", required=True, type=Path, help="slide file")
    p.add_argument("--slide-id", help="slide id (default: file stem)")
    p.add_argument("--sheet-mpp", type=float, help="mpp from the sheet (overrides the file)")
    p.add_argument("--tissue-mask", required=True, type=Path, help="tissue mask of dsf tissue")
    p.add_argument("--models", nargs="+", required=True, type=Path, help="model.pt (averaged)")
    p.add_argument("--routing", choices=ROUTINGS, default="out_of_fold")
    p.add_argument("--out-map", required=True, type=Path, help="class map (.tiff)")
    p.add_argument("--out-overlay", required=True, type=Path, help="overlay (.jpg)")
    p.add_argument("--out-meta", required=True, type=Path, help="metadata (.json)")
    p.add_argument("--out-probs", type=Path, help="probabilities (OME-Zarr, .zarr)")
    p.add_argument("--no-progress", action="store_true")
    add_section_arguments(p, "infer")
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf infer`: one slide -> class map, overlay, metadata."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        from dsf.devices import use_device
        from dsf.tissue import read_mask

        st = section_from_args(args, "infer")
        device = use_device(st["device"], "infer.device")
        preds = [load_predictor(m, device, st["amp"]) for m in args.models]
        slide = open_slide(args.slide, mpp=args.sheet_mpp, slide_id=args.slide_id)
        mask, mask_mpp = read_mask(args.tissue_mask)
        infer_slide(
            slide,
            mask,
            mask_mpp,
            preds,
            st,
            args.out_map,
            args.out_overlay,
            args.out_meta,
            args.out_probs,
            extra_meta={
                "models": [str(m) for m in args.models],
                "folds": [int(pr.meta.get("fold", -1)) for pr in preds],
                "routing": args.routing,
            },
            progress=not args.no_progress,
        )

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
