"""Deflate-encoded TIFF tiles of a large uint8 image, spooled to disk as its rows arrive.

The class map's large levels are written band by band while the slide is predicted. Each tile is
compressed once, in the form a TIFF's deflate tile holds (a zlib stream of the tile's raw bytes,
zero-padded to the whole tile), appended to a file, and indexed; `dsf.class_tiff.write_tiff` then
copies the bytes into the TIFF as they are. Compressing there, after the last window, was a serial
pass over the whole level 0 (6.4 s of a 40k x 40k slide on 2 cores); here it runs on the map
writer's thread (and a few encoder threads: zlib frees the GIL) while the model works.

A tile written in pieces (where a band's edge or the end of its rows cuts it) is kept as its
pieces and put together when the TIFF is written. Memory holds the index only, so it stays
flat in slide size; the spool file is about as large as the map.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["ZLIB_LEVEL", "TileSpool"]

# zlib level 1: on class maps 2-10x faster than zlib's default (6) for maps 1.1-3x larger (a
# 40k x 40k slide's map stays tens of MB); this runs beside the slide reads that bound a GPU run
ZLIB_LEVEL = 1


def _encode(a: np.ndarray) -> bytes:
    return zlib.compress(np.ascontiguousarray(a), ZLIB_LEVEL)


class TileSpool:
    """An (height, width) uint8 image as deflate tiles of `tile` px in a spool file.

    `write` takes any rectangle; pixels never written are 0. Rows that continue the previous
    write (same columns, the next rows) wait until they fill whole tile rows, so a band's
    reduced levels, which arrive a few rows at a time, are still stored as whole tiles; `flush`
    (at a band's end) stores what waits. Not thread-safe: one writer, then `tiles` or `asarray`
    once `close` has run.
    """

    def __init__(self, path: Path, shape: tuple[int, int], tile: int, pool: ThreadPoolExecutor):
        self.path, self.shape, self.tile, self.pool = path, shape, tile, pool
        self.file = path.open("wb")
        self.end = 0
        # (tile row, tile column) -> pieces: (offset, bytes, y, x, h, w) with y, x in the tile
        self.index: dict[tuple[int, int], list[tuple[int, int, int, int, int, int]]] = {}
        self.waiting: tuple[int, int, np.ndarray] | None = None  # (y, x, rows)

    def _full(self, ty: int, tx: int) -> tuple[int, int]:
        """The height and width of tile (ty, tx) inside the image."""
        h, w, t = *self.shape, self.tile
        return min(t, h - ty * t), min(t, w - tx * t)

    def write(self, y: int, x: int, block: np.ndarray) -> None:
        """Store `block` at rows [y, y + h), columns [x, x + w): whole tile rows now, the rows
        after the last whole one when they are filled, or at `flush`."""
        bh, bw = block.shape
        if y < 0 or x < 0 or y + bh > self.shape[0] or x + bw > self.shape[1]:
            raise ValueError(f"block {block.shape} at ({y}, {x}) outside the image {self.shape}")
        if self.waiting is not None:
            wy, wx, rows = self.waiting
            if (wx, wy + rows.shape[0], rows.shape[1]) == (x, y, bw):
                block, y = np.concatenate([rows, block]), wy
                self.waiting = None
            else:
                self.flush()
        end = y + block.shape[0]
        if end < self.shape[0]:  # rows short of a tile row (and of the image's end) wait
            end = max(y, end // self.tile * self.tile)
        if end < y + block.shape[0]:
            self.waiting = (end, x, block[end - y :])
        if end > y:
            self._store(y, x, block[: end - y])

    def flush(self) -> None:
        """Store the rows waiting for the rest of their tile row."""
        if self.waiting is not None:
            y, x, rows = self.waiting
            self.waiting = None
            self._store(y, x, rows)

    def _store(self, y: int, x: int, block: np.ndarray) -> None:
        """Compress and append `block` at (y, x), tile by tile (whole tiles TIFF-ready)."""
        bh, bw = block.shape
        t = self.tile
        pieces, where = [], []
        for ty in range(y // t, -(-(y + bh) // t)):
            for tx in range(x // t, -(-(x + bw) // t)):
                y0, y1 = max(y, ty * t), min(y + bh, (ty + 1) * t)
                x0, x1 = max(x, tx * t), min(x + bw, (tx + 1) * t)
                part = block[y0 - y : y1 - y, x0 - x : x1 - x]
                rect = (y0 - ty * t, x0 - tx * t, y1 - y0, x1 - x0)
                if rect == (0, 0, *self._full(ty, tx)):  # the whole tile: padded, TIFF-ready
                    if part.shape != (t, t):
                        part = np.pad(part, ((0, t - part.shape[0]), (0, t - part.shape[1])))
                    rect = (0, 0, t, t)
                pieces.append(part)
                where.append((ty, tx, rect))
        for (ty, tx, rect), data in zip(where, self.pool.map(_encode, pieces), strict=True):
            self.file.write(data)
            self.index.setdefault((ty, tx), []).append((self.end, len(data), *rect))
            self.end += len(data)

    def close(self) -> None:
        """Store what waits and finish writing (the spool can then be read)."""
        self.flush()
        self.file.close()

    def tiles(self) -> Iterator[bytes]:
        """Every tile's deflate bytes in TIFF order (row by row): a tile stored whole as it is,
        one never written as an encoded all-0 tile, one in pieces put together and encoded."""
        t = self.tile
        empty = zlib.compress(bytes(t * t), ZLIB_LEVEL)
        rows, cols = -(-self.shape[0] // t), -(-self.shape[1] // t)
        with self.path.open("rb") as f:
            for ty in range(rows):
                for tx in range(cols):
                    pieces = self.index.get((ty, tx))
                    if not pieces:
                        yield empty
                    elif len(pieces) == 1 and pieces[0][2:] == (0, 0, t, t):
                        f.seek(pieces[0][0])
                        yield f.read(pieces[0][1])
                    else:
                        yield _encode(self._assemble(f, pieces))

    def _assemble(self, f: BinaryIO, pieces: list[tuple[int, ...]]) -> np.ndarray:
        """One tile (tile x tile) from its pieces in the spool file `f`."""
        out = np.zeros((self.tile, self.tile), np.uint8)
        for off, n, y, x, h, w in pieces:
            f.seek(off)
            out[y : y + h, x : x + w] = np.frombuffer(zlib.decompress(f.read(n)), np.uint8).reshape(
                h, w
            )
        return out

    def asarray(self) -> np.ndarray:
        """The whole image decoded (for the small levels the overlay reads)."""
        t = self.tile
        out = np.zeros(self.shape, np.uint8)
        with self.path.open("rb") as f:
            for (ty, tx), pieces in self.index.items():
                h, w = self._full(ty, tx)
                out[ty * t : ty * t + h, tx * t : tx * t + w] = self._assemble(f, pieces)[:h, :w]
        return out
