"""Single-channel integer masks of a slide, sampled like slide regions without loading them.

Annotation masks come at any downsample of the slide, up to the slide's full level-0 size
(PAIP's per-class masks, CAMELYON's and ASAP's exports: tens of gigapixels). A TIFF mask is read
through tifffile's Zarr view of its pages, from the coarsest pyramid level that is still at
least as fine as the request, one window of tiles or strips at a time, so memory stays bounded
by the request, not the mask. PNG masks cannot be read in parts and are small in practice:
they are held in memory. JPEG masks (files, or JPEG-compressed TIFFs) are refused: lossy
compression changes the codes along every border and adds codes no class has.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from dsf.errors import AnnotationError

#: Level pixels read at once when a request subsamples a large window (rows are read in blocks).
_WINDOW_PX = 32 * 1024 * 1024

log = logging.getLogger(__name__)

#: TIFF compressions of JPEG (old-style and new), which no class mask survives
_JPEG_TIFF = (6, 7)


class _LossyMaskError(Exception):
    """A mask stored with lossy compression (the reason in its text)."""


class _Level:
    """One resolution of a mask: a lazy array (h, w) or (h, w, c) and its downsample."""

    def __init__(self, array: Any, channel_last: bool) -> None:
        self.array = array
        self.channel_last = channel_last
        self.height, self.width = (int(s) for s in array.shape[:2])

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(h, w) codes, or (h, w, 3) for an RGB(A) mask (`MaskRaster._checked` picks)."""
        if self.channel_last:
            return np.asarray(self.array[r0:r1, c0:c1, :3])
        return np.asarray(self.array[r0:r1, c0:c1])


def _tiff_levels(path: Path) -> tuple[list[_Level], list[Any]]:
    """The pyramid levels of a TIFF's first image series as lazy Zarr arrays (finest first),
    and the open stores to close. The reduced levels only of a mask dsf wrote (each keeps the
    centre pixel of its squares): another tool's may average codes (libvips does), which makes
    classes no pixel holds at class borders (1 beside 3 reads 2), so its full resolution only."""
    import tifffile
    import zarr

    from dsf.class_tiff import description_codes

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        if int(series.keyframe.compression) in _JPEG_TIFF:
            raise _LossyMaskError("its pixels are JPEG-compressed")
        own = description_codes(tf.pages[0].description) is not None
        n_levels = len(series.levels) if own else 1
        shapes = [tuple(lv.shape) for lv in series.levels]
        dtype = series.dtype
    if dtype.kind not in "uib":
        raise ValueError(f"pixels are {dtype}, not integers")
    levels, stores = [], []
    for i in range(n_levels):
        shape = shapes[i]
        squeeze = 0
        while len(shape) > 2 and shape[0] == 1:  # (1, h, w): a single plane
            shape, squeeze = shape[1:], squeeze + 1
        if len(shape) == 3 and shape[-1] in (3, 4):
            channel_last = True
        elif len(shape) == 2:
            channel_last = False
        else:
            raise ValueError(f"image of shape {shapes[i]} is not a single-channel mask")
        store = tifffile.imread(str(path), series=0, level=i, aszarr=True)
        stores.append(store)
        array = zarr.open(store, mode="r")
        for _ in range(squeeze):
            array = _Squeezed(array)
        levels.append(_Level(array, channel_last))
    return levels, stores


class _Squeezed:
    """A view of an array without its leading length-1 axis."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(array.shape[1:])

    def __getitem__(self, key: Any) -> Any:
        return np.asarray(self.array[(0, *key)] if isinstance(key, tuple) else self.array[0, key])


def _factors(big: tuple[int, int], small: tuple[int, int]) -> tuple[float, float]:
    """(x, y) downsample of an image of size `small` made from one of size `big`: a whole
    factor when both sizes are that factor's rounding up or down (as pyramids and exporters
    round; of two such factors, a small image's, the power of two), else size / size (a
    rounded-up mask had been stretched by up to one of its pixels towards its far edge)."""
    ratio = big[0] / small[0]
    whole = [
        d
        for d in sorted({math.floor(ratio), math.ceil(ratio)})
        if d >= 1 and all(m in (n // d, -(-n // d)) for m, n in zip(small, big, strict=True))
    ]
    if len(whole) == 2:
        whole = [d for d in whole if d & (d - 1) == 0]
    if len(whole) == 1:
        return float(whole[0]), float(whole[0])
    return ratio, big[1] / small[1]


class MaskRaster:
    """An integer mask (codes 0-255) over a slide of level-0 size `slide_dims`, at a downsample
    inferred from its size (the same in x and y, else an AnnotationError naming the slide)."""

    def __init__(self, path: Path, slide_id: str, slide_dims: tuple[int, int], what: str) -> None:
        self.path, self.slide_id, self.what = Path(path), slide_id, what
        self._dims = slide_dims
        self._stores: list[Any] = []
        try:
            if self.path.suffix.lower() in {".tif", ".tiff"}:
                self.levels, self._stores = _tiff_levels(self.path)
            else:
                from PIL import Image

                with Image.open(self.path) as im:
                    if im.format in ("JPEG", "MPO"):  # MPO: PIL's name for some JPEGs
                        raise _LossyMaskError("it is a JPEG")
                    data = np.asarray(im)
                if data.dtype.kind not in "uib":
                    raise ValueError(f"pixels are {data.dtype}, not integers")
                if data.ndim == 3 and data.shape[2] == 2:  # grey + alpha: the grey codes
                    data = data[..., 0]
                elif data.ndim == 3 and data.shape[2] in (3, 4):  # RGB(A): codes in RGB
                    data = data[..., :3]
                elif data.ndim != 2:
                    raise ValueError(f"it has shape {data.shape}")
                self.levels = [_Level(data, data.ndim == 3)]
        except AnnotationError:
            raise
        except _LossyMaskError as exc:
            self.close()
            raise AnnotationError(
                slide_id,
                f"{what} {self.path}: {exc}, whose lossy compression changes the class codes "
                "along every border and adds codes no class has (a 95%-quality JPEG mislabels "
                "some 3% of the annotated pixels): export the mask again without loss (PNG, or "
                "TIFF with LZW or Deflate: `vips tiffsave in out.tif --compression deflate "
                "--tile --pyramid` from the original)",
            ) from exc
        except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the slide
            self.close()
            raise AnnotationError(
                slide_id,
                f"cannot read {what} {self.path} as a single-channel integer image: {exc}",
            ) from exc
        lv0 = self.levels[0]
        mw, mh = lv0.width, lv0.height
        sw, sh = slide_dims
        self.ds_x, self.ds_y = _factors((sw, sh), (mw, mh))
        if abs(self.ds_x / self.ds_y - 1) > 0.02 + 2 / min(mw, mh):
            self.close()
            raise AnnotationError(
                slide_id,
                f"{what} {self.path} is {mw}x{mh} px, which is not a downsample of the slide "
                f"({sw}x{sh} px; x factor {self.ds_x:.3f} vs y factor {self.ds_y:.3f}): the mask "
                "does not cover the slide. Check that it is this slide's mask (the sheet's, or "
                "the file found for it beside the slides)",
            )
        coarser = max(self.ds_x, self.ds_y)
        # within 1.5% of the slide's size: its own (exporters round; a mask written at a
        # nominal 0.25 um/px for a 0.2527 um/px scan is 1.1% off), else at least 1.5x smaller
        if coarser < 0.95 or 1.015 + 2 / min(mw, mh) < coarser < 1.5:
            self.close()
            size = "larger than" if coarser < 1 else "near the size of, but not equal to,"
            other = (
                ""
                if coarser < 1
                else f" If it is, it was written at another resolution ({coarser:.3f}x "
                "coarser, as a mask exported at 0.25 um/px for a 0.2265 um/px scan is): "
                "resample it to the slide's size or to a whole downsample"
            )
            raise AnnotationError(
                slide_id,
                f"{what} {self.path} is {mw}x{mh} px, {size} the slide ({sw}x{sh} px): a mask "
                "is the slide's own size or a downsample of it (2x, 4x, ...). Check that it is "
                "this slide's mask (the sheet's, or the file found for it beside the slides)."
                + other,
            )
        if coarser != round(coarser):  # worth a line: a mask at a whole factor is the norm
            log.info(
                "%s: %s %s is 1/%.3f of the slide's size (no whole downsample): its pixels "
                "are spread over the slide by that factor",
                slide_id,
                what,
                self.path,
                coarser,
            )

    def close(self) -> None:
        """Close the TIFF's stores (a later read reopens nothing: use a new MaskRaster)."""
        for store in self._stores:
            store.close()
        self._stores = []

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its arguments: another process opens the file itself."""
        return (type(self), (self.path, self.slide_id, self._dims, self.what))

    def coarsest(self, max_px: int) -> np.ndarray | None:
        """The coarsest level whole, if it has at most `max_px` pixels (else None)."""
        lv = self.levels[-1]
        if lv.height * lv.width > max_px:
            return None
        return self._checked(lv.window(0, lv.height, 0, lv.width))

    def _checked(self, codes: np.ndarray) -> np.ndarray:
        if codes.ndim == 3:
            codes = self._one_channel(codes)
        if codes.dtype == np.uint8:
            return codes
        if codes.dtype.kind == "b":
            return codes.astype(np.uint8)
        if codes.size and (codes.min() < 0 or codes.max() > 255):
            raise AnnotationError(
                self.slide_id,
                f"{self.what} {self.path} holds codes outside 0-255 "
                f"({int(codes.min())}..{int(codes.max())}); a mask holds class codes",
            )
        return codes.astype(np.uint8)

    def _one_channel(self, rgb: np.ndarray) -> np.ndarray:
        """The codes of an RGB mask: the same in every channel (a grey mask saved as RGB), or in
        red with green and blue zero (PANDA's masks). A colour-coded mask would read as codes
        of its red channel alone, its classes merged or lost: refused."""
        red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        if (np.array_equal(red, green) and np.array_equal(red, blue)) or not (
            green.any() or blue.any()
        ):
            return red
        odd = np.flatnonzero(((green != red) | (blue != red)).ravel())[0]
        colour = tuple(int(v) for v in rgb.reshape(-1, 3)[odd])
        raise AnnotationError(
            self.slide_id,
            f"{self.what} {self.path} is a colour image (pixels such as (R, G, B) = {colour}): "
            "a mask holds one class code per pixel, read from its red channel when all "
            "channels agree or only red is used (PANDA), so these colours would lose their "
            "classes. Convert it to a single-channel image of class codes (0 = unlabelled)",
        )

    def _level_for(self, step: float) -> int:
        """The coarsest level whose pixels are no larger than `step` level-0 mask pixels."""
        best = 0
        w0 = self.levels[0].width
        for i, lv in enumerate(self.levels):
            if w0 / lv.width <= step * 1.001:
                best = i
        return best

    def _sampled(
        self, x: float, y: float, width: int, height: int, f: float
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The level `read` samples for the region, the level's columns and rows each output
        pixel's centre falls in, and which of those lie on the mask (columns, rows)."""
        level = self._level_for(f / self.ds_x)
        lv = self.levels[level]
        kx, ky = _factors((self.levels[0].width, self.levels[0].height), (lv.width, lv.height))
        sx, sy = self.ds_x * kx, self.ds_y * ky  # slide px per level px
        cols = np.floor((x + (np.arange(width) + 0.5) * f) / sx).astype(np.int64)
        rows = np.floor((y + (np.arange(height) + 0.5) * f) / sy).astype(np.int64)
        vc = (cols >= 0) & (cols < lv.width)
        vr = (rows >= 0) & (rows < lv.height)
        return level, cols, rows, vc, vr

    def covered(
        self, x: float, y: float, width: int, height: int, f: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which output columns and rows of `read`'s region lie on the mask (1-D bool): the
        pixels past its edges read 0 without the mask saying so."""
        return self._sampled(x, y, width, height, f)[3:]

    def read(self, x: float, y: float, width: int, height: int, f: float) -> np.ndarray:
        """Codes (height, width) uint8 of the region with level-0 slide top-left (x, y) and
        `f` level-0 slide px per output px, nearest-neighbour; outside the mask reads 0."""
        level, cols, rows, vc, vr = self._sampled(x, y, width, height, f)
        lv = self.levels[level]
        out = np.zeros((height, width), np.uint8)
        if not vc.any() or not vr.any():
            return out
        c_in, r_in = cols[vc], rows[vr]
        c0, c1 = int(c_in.min()), int(c_in.max()) + 1
        block = max(1, _WINDOW_PX // (c1 - c0))  # level rows per window read
        r_out = np.flatnonzero(vr)
        c_out = np.flatnonzero(vc)
        start = 0
        while start < len(r_in):
            r0 = int(r_in[start])
            stop = int(np.searchsorted(r_in, r0 + block, side="left"))
            stop = max(stop, start + 1)
            r1 = int(r_in[stop - 1]) + 1
            win = self._checked(lv.window(r0, r1, c0, c1))
            out[np.ix_(r_out[start:stop], c_out)] = win[np.ix_(r_in[start:stop] - r0, c_in - c0)]
            start = stop
        return out
