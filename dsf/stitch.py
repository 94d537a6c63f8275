"""Blending of whole-slide inference: the tissue windows cut from the streamed row chunks on
the model's device, run in batches (fold models averaged), blended with Hann weights into a
band's core rows, each finished row handed to the map writer (see `dsf.infer`)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dsf.chunk_reader import reduce_rows
from dsf.map_writer import MapWriter, RowsToHost, WriterThread
from dsf.predict import Predictor
from dsf.windows import Band, Grid, final_rows, hann_weights

#: Bytes the blend of a band's core rows may hold before the queued windows run, short of a
#: batch: each core row their blend touches is held at the band's width ((classes + 1) x
#: stride x band width floats, 31 MB at block 256, overlap 0.25, 32 windows and 5 classes), so
#: a batch filled from sparse rows (a band at the tissue's edge, one window a row) had held
#: batch_size of them (1.85 GiB at batch 64). Dense bands fill a batch within a few rows.
BLEND_BYTES = 512 << 20
#: Window rows the queued windows may span whatever the budget.
MIN_SPAN = 2


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


class BandAccumulator:
    """Blended foreground probabilities of one band's core rows, on the model's device: per
    core row one (n_fg + 1, stride, cells * stride) tensor, the weighted probabilities and, as
    the last plane, the sum of the weights. Its columns are cells of `stride` px, cell c
    starting where the block of window column wcols[0] + c starts, so every window of the band
    starts on a cell."""

    def __init__(
        self, grid: Grid, band: Band, n_fg: int, device: torch.device, want_probs: bool
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
        row_bytes = 4 * (n_fg + 1) * s * self.cells * s
        #: window rows the queue may span: their core rows, and a block's more, within budget
        self.max_span = max(MIN_SPAN, BLEND_BYTES // row_bytes - self.pieces - 1)

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
            # the last core row and column reach past the slide's edge: those pixels are
            # padding, zeroed (weights too) so they take no part in an output pixel's average
            rows_in = max(0, g.height - r * g.stride)
            cols_in = max(0, g.width - self.band.cores[0] * g.stride)
            acc[:, rows_in:] = 0
            acc[:, :, cols_in:] = 0
            # an output pixel is the mean of its target pixels' blended probabilities, each
            # pixel counted once (pooled as weighted sums, pixels near a core's corner, of small
            # blending weight, had counted less) over the pixels windows covered
            covered = (acc[-1] > 0).to(acc.dtype)
            mean = acc[:-1] / acc[-1].clamp_min(1e-12) * covered
            acc = torch.nn.functional.avg_pool2d(torch.cat([mean, covered[None]])[None], f)[0]
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


class Stitcher:
    """Cuts the tissue windows from the streamed row chunks band by band, runs the models in
    batches (averaging their probabilities), blends them into the band's accumulator and hands
    every finished core row to the writer."""

    def __init__(
        self,
        grid: Grid,
        run_grid: np.ndarray,
        preds: list[Predictor],
        writer: MapWriter | WriterThread,
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
        self.to_host = RowsToHost(writer, self.device)
        self.windows = 0
        # queued pieces of window rows: (window row, their cells on the device, contexts, targets)
        self.batch: deque[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self.queued = 0  # windows in the queue
        self.tgt: dict[int, torch.Tensor] = {}  # chunk index -> target-mpp rows, on the device
        self.ctx: dict[int, torch.Tensor] = {}  # chunk index -> the same rows reduced by scale
        self.band: Band | None = None
        self.acc: BandAccumulator | None = None
        self.pending: deque[int] = deque()  # window rows of the band still to cut
        self.next_row = 0  # next core row of the band to write
        # a window whose probabilities were not finite (NaN weights, an fp16 overflow): kept
        # on the device, so no batch waits for the GPU; read once, when the slide is done
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def run(self, bands: list[Band], chunks: Iterator[tuple[int, int, Any, Any]]) -> None:
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

    def _start(self, band: Band) -> None:
        self.band = band
        self.acc = BandAccumulator(
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
        gathers, and run the batches that fill up (or span the accumulator's max_span window
        rows)."""
        assert self.band is not None and self.acc is not None
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
        while self.queued >= self.batch_size or (
            self.batch and wr - self.batch[0][0] + 1 >= self.acc.max_span
        ):
            self._run_batch()
            # every window of the rows before wr has run: their core rows are final
            self._finish_rows(final_rows(g, wr - 1))
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
        self.nonfinite |= ~torch.isfinite(probs).all()
        start = 0
        for wr, cells, *_ in take:
            self.acc.add(wr, cells, probs[start : start + cells.shape[0]])
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
