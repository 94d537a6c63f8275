"""Row chunks of a slide for stitched inference: read in column bands at the target mpp by
prefetching threads, with their contexts reduced by the scale exactly as `dsf patches` made
the training contexts (see `dsf.infer`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from dsf.slide import Slide
from dsf.windows import Band, Grid


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


class ChunkReader:
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

    def _read(self, band: Band, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        self, bands: list[Band]
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
