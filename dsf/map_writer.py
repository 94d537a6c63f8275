"""The output side of whole-slide inference: finished core rows from the device to the host,
the class map's pyramid written band by band (optional probabilities as OME-Zarr), on a
thread of its own, and the overlay picture (see `dsf.infer`)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dsf.captions import add_legend
from dsf.class_map import class_counts
from dsf.class_tiff import pyramid_levels, write_block
from dsf.colours import class_colours, tint
from dsf.errors import SlideError
from dsf.tilespool import TileSpool
from dsf.windows import Grid


class RowsToHost:
    """Finished core rows on their way from the device to the writer, in order. On a GPU each
    row is copied into page-locked memory without waiting, and handed on once its copy is done,
    so the model never waits for the writer (a plain `.cpu()` would wait for every queued
    batch); `limit` rows at most are in flight. On the CPU rows pass straight through."""

    def __init__(
        self, writer: MapWriter | WriterThread, device: torch.device, limit: int = 64
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
        """Queue finished core rows of `band` (on the device); the writer gets them once
        their copy to the host is done."""
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
        """Hand every queued row to the writer (waiting for their copies)."""
        while self.pending:
            self.drain(block=True)


class MapWriter:
    """The map's pyramid (and optional probabilities), band by band, in whole row chunks so
    no chunk is written twice. Level i is level 0 subsampled by 2**i (nearest, the centre
    pixel of each 2**i square: `class_tiff.write_block`), written from each block as level 0
    is, so no pass over the finished level 0 is needed. Levels larger than MEMORY_LEVEL_PX are
    spooled to the work directory as compressed TIFF tiles (`TileSpool`, where rows of a
    reduced level wait until they fill whole tile rows), so the TIFF is written by copying
    them."""

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
        #: map pixels (its own level 0, at its mpp) of each class index as written (0: background
        #: or outside tissue), counted on the way so the map's areas cost no second read
        self.counts = np.zeros(n_fg + 1, np.int64)
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
        """Add finished core rows of `band` (classes, optional probabilities); a new band
        ends the last one, and whole tile rows are written as they fill."""
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
            tissue = self._mask(self.y, x, h, w) if self.tissue is not None else None
            if tissue is not None:  # a multiply: several times np.where's speed
                block = np.multiply(block, tissue, dtype=np.uint8)
            write_block(self.levels, self.y, x, block)
            self.counts += class_counts(block, self.n_fg + 1)
            if self.probs is not None and probs is not None:
                p = probs[:, :h, :w]  # the map's background has no probabilities either
                self.probs[:, self.y : self.y + h, x : x + w] = p if tissue is None else p * tissue
        self.y += n
        self.cls_rows = [cls[n:]] if n < cls.shape[0] else []
        if probs is not None:
            self.prob_rows = [probs[:, n:]] if n < cls.shape[0] else []


class WriterThread:
    """The map writer on a thread of its own, fed in order through a bounded queue: the
    subsampling into the pyramid and the compression of the map's tiles then run beside the main
    thread, which launches the GPU's work (on the 40k slide they were seconds of its time). An
    error there is raised in the main thread at its next hand-over, or by `join`; a file-system
    error (a full disk, no permission) as a `SlideError` that names the slide and the map."""

    def __init__(self, writer: MapWriter, slide_id: str, out_map: Path, depth: int = 16) -> None:
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
        """Hand rows to the writer thread (an error it met is raised here, on the next call)."""
        self._put(self.writer.add_row, band, cls, probs)

    def flush(self, final: bool) -> None:
        """Hand a flush to the writer thread (`final`: the band's end)."""
        self._put(self.writer.flush, final)

    def join(self, raise_error: bool = True) -> None:
        """Wait until everything handed over is written (then raise its error, if any)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error:
            self._raise()


def render_overlay(
    thumb: np.ndarray,
    classes_map: np.ndarray,
    names: list[str],
    alpha: float = 0.45,
    *,
    title: str | None = None,
    mpp: float | None = None,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """The thumbnail with predicted classes tinted (`dsf.colours.tint`: over the tissue in grey,
    so each tint has its legend swatch's hue; background untouched) and a legend strip
    (`dsf.captions`: the class colours, with `counts`, the map's pixels per class index, each
    class's share of the mapped area, and with `mpp` the thumbnail's a scale bar)."""
    h, w = thumb.shape[:2]
    cmap = Image.fromarray(classes_map).resize((w, h), Image.Resampling.NEAREST)
    cls = np.asarray(cmap)
    colours = class_colours(len(names)).astype(np.float32)
    out = tint(thumb, np.minimum(cls, len(names) - 1), alpha)
    if counts is not None and (mapped := int(counts[1:].sum())):
        names = [
            n if i == 0 else f"{n} {100 * int(counts[i]) / mapped:.1f}%"
            for i, n in enumerate(names)
        ]
    keys = [(tuple(int(v) for v in colours[i]), name) for i, name in enumerate(names) if i]
    picture = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return add_legend(picture, keys, title=title, mpp=mpp)  # type: ignore[arg-type]


def write_ome_attrs(store: Path, names: list[str], mpp: float) -> None:
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
