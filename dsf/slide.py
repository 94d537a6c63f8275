"""Spacing-first slide access over OpenSlide, tifffile and plain images (DESIGN section 4).

Every read is asked in microns per pixel (mpp) and is a bounded region: the reader picks the
pyramid level at or finer than the request, reads just the level pixels the region needs, and
resamples them with exact sub-pixel geometry (PIL box filter over the region's float box).

Backends:
- OpenSlide for vendor formats (Aperio, Hamamatsu, MIRAX, Philips, tiled generic TIFF, ...);
- tifffile for OME-TIFF and TIFF files OpenSlide refuses (stripped, unusual compression);
- PIL for plain images (PNG/JPEG regions of interest), which carry their mpp in the sheet.

The mpp comes from the sheet (`mpp`, which wins) or the file (OpenSlide's `openslide.mpp-x`,
which covers Aperio `MPP` and TIFF resolution tags; OME `PhysicalSizeX`; TIFF resolution tags
with their unit). Handles are opened lazily and per process, so a `Slide` can be handed to
DataLoader workers or other processes after a fork.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import math
import os
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsf.errors import SlideError

log = logging.getLogger(__name__)

#: Refuse single reads above this many level pixels: callers must tile bigger work.
MAX_READ_PIXELS = 256 * 1024 * 1024
#: A resolution coarser than this (um/px) is no scan: in a file it is a default DPI (72 dpi is
#: 353 um/px, 600 dpi 42) and is ignored; in the sheet it is warned about (an objective power?).
#: A 1.25x scan is about 8 um/px.
MAX_PLAUSIBLE_MPP = 16.0
#: Pixels whose x and y sizes differ by more than this (relative) are not square.
SQUARE_TOLERANCE = 0.02

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_UM_PER_UNIT = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: size (w, h) in its own pixels and downsample relative to level 0."""

    width: int
    height: int
    downsample: float


class UnsupportedLayoutError(ValueError):
    """A readable file whose pixels are not a brightfield RGB slide (fluorescence, ...)."""


def file_resolution(
    x: float | None, y: float | None, source: str
) -> tuple[float | None, str | None]:
    """(mpp, why not): a file's stated pixel size as dsf uses it, or None and the reason.

    Stated sizes above MAX_PLAUSIBLE_MPP are a default DPI written by the software, not a
    scan resolution; pixels that are not square would stretch every read (dsf's geometry is
    one um/px for both axes), so neither is taken as the slide's resolution.
    """
    if x is None or not math.isfinite(x) or x <= 0:
        return None, None
    if x > MAX_PLAUSIBLE_MPP:
        return None, (
            f"its {source} give {x:.4g} um/px, coarser than any scan: a default DPI written by "
            "the software that saved it, not the scan's resolution"
        )
    if y is not None and math.isfinite(y) and y > 0 and abs(y / x - 1) > SQUARE_TOLERANCE:
        return None, (
            f"its {source} give pixels that are not square ({x:.4g} x {y:.4g} um), and dsf "
            "reads one resolution for both axes (resample it to square pixels, e.g. with "
            "`vips resize`)"
        )
    return x, None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


class _Backend:
    """Reads a rectangle of one level in that level's pixel coordinates, as RGB uint8."""

    levels: list[LevelInfo]
    file_mpp: float | None
    #: why the file's stated resolution is not used (a default DPI, non-square pixels), if so
    mpp_note: str | None = None
    properties: dict[str, str]
    background: tuple[int, int, int] = (255, 255, 255)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGBA -> RGB over a background colour (transparent = no scan data)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + np.asarray(background, np.float32) * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _openslide_read() -> Any:
    """openslide_read_region through openslide-python's ctypes binding, or None without it.

    Reading into our own buffer and converting with numpy holds the GIL only for microseconds
    per read; `OpenSlide.read_region` holds it for milliseconds (PIL's channel check, RGBA -> RGB
    and `tobytes`), which serialises reader threads with a main thread that launches GPU work.
    """
    try:
        from openslide import lowlevel
    except ImportError:  # OpenSlide itself missing: opening a slide reports it
        return None
    return getattr(lowlevel, "_read_region", None)


_OPENSLIDE_READ = _openslide_read()
#: reads up to this many px reuse a per-thread buffer (16 MB each)
SCRATCH_PIXELS = 4 * 1024 * 1024
_ARGB_P = ctypes.POINTER(ctypes.c_uint32)
#: OpenSlide's native-endian 0xAARRGGBB pixels as bytes: the R, G, B slice and the alpha byte
_LITTLE = sys.byteorder == "little"
_RGB_BYTES, _ALPHA_BYTE = (slice(2, None, -1), 3) if _LITTLE else (slice(1, 4), 0)


def _premultiplied_to_rgb(argb: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """OpenSlide's premultiplied ARGB bytes (h, w, 4) -> RGB over the background colour.

    Numpy releases the GIL for these whole-array copies. Premultiplied colour over a
    background is c + bg * (1 - alpha): transparent pixels (no scan data) become background.
    """
    alpha, rgb = argb[..., _ALPHA_BYTE], argb[..., _RGB_BYTES]
    out = np.empty(argb.shape[:2] + (3,), np.uint8)
    if alpha.min() == 255:
        out[...] = rgb
        return out
    rest = (255.0 - alpha[..., None].astype(np.float32)) / 255.0
    colour = rgb.astype(np.float32) + np.asarray(background, np.float32) * rest
    np.clip(colour + 0.5, 0, 255, out=colour)
    out[...] = colour
    return out


class _OpenSlideBackend(_Backend):
    def __init__(self, path: Path) -> None:
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        self._local = threading.local()
        self.properties = dict(self._osr.properties)
        self.levels = [
            LevelInfo(w, h, float(ds))
            for (w, h), ds in zip(
                self._osr.level_dimensions, self._osr.level_downsamples, strict=True
            )
        ]
        self.file_mpp, self.mpp_note = file_resolution(
            _number(self.properties.get("openslide.mpp-x")),
            _number(self.properties.get("openslide.mpp-y")),
            f"OpenSlide properties ({self.properties.get('openslide.vendor', '?')})",
        )
        bg = self.properties.get("openslide.background-color")
        if bg and len(bg) == 6:
            self.background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[assignment]

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.levels[level].downsample
        loc = (int(round(x * ds)), int(round(y * ds)))
        if _OPENSLIDE_READ is None:  # an openslide-python without the ctypes entry point
            region = self._osr.read_region(loc, level, (w, h))
            if region.getchannel("A").getextrema()[0] == 255:  # fully opaque: drop alpha in C
                return np.asarray(region.convert("RGB"))
            return _composite(np.asarray(region), self.background)
        argb = self._scratch(w * h)
        _OPENSLIDE_READ(self._osr._osr, argb.ctypes.data_as(_ARGB_P), *loc, level, w, h)
        return _premultiplied_to_rgb(argb.view(np.uint8).reshape(h, w, 4), self.background)

    def _scratch(self, n: int) -> np.ndarray:
        """An ARGB buffer of n pixels: this thread's reusable one (no page faults on every
        read) up to SCRATCH_PIXELS, a fresh one for larger reads (not kept per thread)."""
        if n > SCRATCH_PIXELS:
            return np.empty(n, np.uint32)
        buf = getattr(self._local, "argb", None)
        if buf is None or buf.size < n:
            buf = self._local.argb = np.empty(n, np.uint32)
        return buf[:n]

    def close(self) -> None:
        self._osr.close()


def tiff_tag_mpp(page: Any, axis: str = "X") -> float | None:
    """MPP from TIFF X/YResolution and ResolutionUnit (2 = inch, 3 = cm); None without a unit."""
    tags = page.tags
    key = f"{axis}Resolution"
    if key not in tags or "ResolutionUnit" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value)
    num, den = tags[key].value
    if num == 0 or den == 0:
        return None
    per_unit = num / den
    um = {2: 25400.0, 3: 10000.0}.get(unit)
    return um / per_unit if um else None


def _ome_mpp(xml: str, axis: str = "X") -> float | None:
    """PhysicalSize{axis} of the first OME Pixels element, converted to um."""
    root = ET.fromstring(xml)
    key = f"PhysicalSize{axis}"
    for elem in root.iter():
        if elem.tag.endswith("Pixels") and key in elem.attrib:
            unit = elem.attrib.get(f"{key}Unit", "µm")
            return float(elem.attrib[key]) * _UM_PER_UNIT.get(unit, 1.0)
    return None


#: TIFF Photometric values read as colour: RGB, and YCbCr (JPEG tiles, decoded to RGB)
_COLOUR_PHOTOMETRIC = (2, 6)


def _check_brightfield(keyframe: Any, axes: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse layouts that are not a brightfield scan, which dsf would otherwise read silently
    wrong: grey channels (fluorescence, multiplex), palette indices (a label or class map),
    CMYK, white-is-zero grey. One 8-bit grey channel is read as grey RGB."""
    photometric = int(keyframe.photometric)
    if photometric in _COLOUR_PHOTOMETRIC:
        return
    channels = (
        shape[axes.index("C")] if "C" in axes else shape[axes.index("S")] if "S" in axes else 1
    )
    if photometric == 1 and channels == 1 and dtype == np.uint8:
        return
    if photometric == 1:
        what = (
            f"{channels} channels of {dtype} grey values"
            if channels > 1
            else f"one {dtype} grey channel"
        )
        raise UnsupportedLayoutError(
            f"it holds {what} (a fluorescence or multiplex image?), not a brightfield RGB scan; "
            "dsf reads brightfield (H&E) slides"
        )
    kinds = {0: "white-is-zero grey", 3: "palette indices (a label or class map?)", 5: "CMYK"}
    name = kinds.get(photometric, f"TIFF Photometric {photometric}")
    raise UnsupportedLayoutError(
        f"its pixels are {name}, not an RGB scan; convert it to an RGB TIFF"
    )


class _TiffBackend(_Backend):
    """tifffile + zarr: bounded reads of tiled or stripped TIFF levels, one handle per thread.

    The pyramid is tifffile's: SubIFDs, reduced-resolution pages, or (an OME file whose OME-XML
    names only the full image, its levels stored as further pages or images) the file read as
    plain TIFF, whose reduced pages then form the pyramid.
    """

    def __init__(self, path: Path) -> None:
        import tifffile

        self._path = path
        self._local = threading.local()
        self._flags: dict[str, bool] = {}
        tf = tifffile.TiffFile(str(path))
        self._local.tf = tf
        series = tf.series[0]
        mpp_x = mpp_y = None
        source = "TIFF resolution tags"
        if tf.is_ome and tf.ome_metadata:
            mpp_x, mpp_y = _ome_mpp(tf.ome_metadata), _ome_mpp(tf.ome_metadata, "Y")
            source = "OME PhysicalSizeX/Y values"
            if len(series.levels) == 1:
                flat = tifffile.TiffFile(str(path), is_ome=False)
                plain = flat.series[0]
                if len(plain.levels) > 1 and plain.shape == series.shape:
                    tf.close()
                    tf, series, self._flags = flat, plain, {"is_ome": False}
                    self._local.tf = tf
                else:
                    flat.close()
        if mpp_x is None:
            keyframe = series.levels[0].keyframe
            mpp_x, mpp_y = tiff_tag_mpp(keyframe), tiff_tag_mpp(keyframe, "Y")
            source = "TIFF resolution tags"
        self._axes = series.axes
        if self._axes not in {"YXS", "YX", "CYX", "SYX"}:
            raise UnsupportedLayoutError(
                f"its image has axes {self._axes!r} (shape {series.shape}), not one RGB plane"
            )
        self._dtype = np.dtype(series.dtype)
        if self._dtype not in (np.uint8, np.uint16):
            raise UnsupportedLayoutError(
                f"its pixels are {self._dtype} (dsf reads uint8 or uint16)"
            )
        keyframe = series.levels[0].keyframe
        _check_brightfield(keyframe, self._axes, tuple(series.shape), self._dtype)
        if self._axes in {"CYX", "SYX"} and series.shape[0] not in (3, 4):
            raise UnsupportedLayoutError(
                f"it has {series.shape[0]} channels (dsf reads RGB or RGBA)"
            )
        # a 4th sample is alpha only where ExtraSamples says so (1 associated, 2 unassociated)
        self._alpha = tuple(getattr(keyframe, "extrasamples", ()) or ())[:1] in ((1,), (2,))
        y_ax, x_ax = self._axes.index("Y"), self._axes.index("X")
        w0 = series.levels[0].shape[x_ax]
        self.levels = [
            LevelInfo(lv.shape[x_ax], lv.shape[y_ax], w0 / lv.shape[x_ax]) for lv in series.levels
        ]
        self._n_levels = len(series.levels)
        self.properties = {"dsf.backend": "tifffile", "tiff.axes": self._axes}
        self.file_mpp, self.mpp_note = file_resolution(mpp_x, mpp_y, source)

    def _arrays(self) -> list[Any]:
        arrays = getattr(self._local, "arrays", None)
        if arrays is None:
            import tifffile
            import zarr

            tf = getattr(self._local, "tf", None) or tifffile.TiffFile(
                str(self._path), **self._flags
            )
            self._local.tf = tf
            arrays = [
                zarr.open_array(tf.series[0].aszarr(level=i), mode="r")
                for i in range(self._n_levels)
            ]
            self._local.arrays = arrays
        return arrays

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr = self._arrays()[level]
        if self._axes in {"CYX", "SYX"}:
            data = np.moveaxis(np.asarray(arr[:, y : y + h, x : x + w]), 0, -1)
        else:
            data = np.asarray(arr[y : y + h, x : x + w])
        if data.ndim == 2:
            data = np.repeat(data[..., None], 3, axis=2)
        if self._dtype == np.uint16:
            data = (data.astype(np.uint32) // 257).astype(np.uint8)
        if data.shape[2] == 4 and self._alpha:
            return _composite(data, self.background)
        return np.ascontiguousarray(data[..., :3])

    def close(self) -> None:
        tf = getattr(self._local, "tf", None)
        if tf is not None:
            tf.close()


def _image_mpp(dpi: Any) -> tuple[float | None, str | None]:
    """A plain image's resolution from its DPI (see `file_resolution`)."""
    if not dpi or not dpi[0]:
        return None, None
    y = 25400.0 / float(dpi[1]) if len(dpi) > 1 and dpi[1] else None
    return file_resolution(25400.0 / float(dpi[0]), y, "DPI values")


class _ImageBackend(_Backend):
    """A plain image decoded once (PNG/JPEG cannot be read in parts); for ROI crops."""

    def __init__(self, path: Path) -> None:
        with Image.open(path) as im:
            dpi = im.info.get("dpi")
            im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "P", "PA") else im.convert("RGB")
            data = np.asarray(im)
        self._data = _composite(data, self.background) if data.shape[2] == 4 else data
        h, w = self._data.shape[:2]
        self.levels = [LevelInfo(w, h, 1.0)]
        self.properties = {"dsf.backend": "image"}
        self.file_mpp, self.mpp_note = _image_mpp(dpi)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._data[y : y + h, x : x + w]


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's logger while probing a file: a file it half-parses (an SVS named
    `.ndpi`) logs errors the chosen backend never meets; real failures are raised, not logged."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


#: Leading bytes of the plain image formats PIL reads here.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def _is_plain_image(path: Path) -> bool:
    """A PNG/JPEG/... by its content, whatever its suffix (a PNG saved as `.tif`); a file
    without a known signature counts by its suffix, so PIL reports what is wrong with it."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return True
    return path.suffix.lower() in _IMAGE_SUFFIXES and not _is_tiff(path)


def _tiff_level_count(path: Path) -> int:
    """Pyramid levels tifffile sees in the file's first series (SubIFDs included)."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tf:
            return len(tf.series[0].levels)
    except Exception:  # noqa: BLE001 - unparsable for tifffile: OpenSlide's view stands
        return 0


def _ifd_chain_problem(path: Path, size: int) -> str | None:
    """The first IFD of the main chain that lies (partly) beyond the end of the file, if any."""
    import struct

    with open(path, "rb") as fh:
        head = fh.read(16)
        bo = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(bo + "H", head[2:4])[0] == 43
        off_fmt, off_size = (bo + "Q", 8) if big else (bo + "I", 4)
        n_fmt, n_size, entry = (bo + "Q", 8, 20) if big else (bo + "H", 2, 12)
        offset = struct.unpack(off_fmt, head[8:16] if big else head[4:8])[0]
        seen: set[int] = set()
        while offset and offset not in seen and len(seen) < 100_000:
            seen.add(offset)
            if offset + n_size > size:
                return f"IFD {len(seen) - 1} starts at byte {offset}"
            fh.seek(offset)
            count = struct.unpack(n_fmt, fh.read(n_size))[0]
            end = offset + n_size + count * entry + off_size
            if end > size:
                return f"IFD {len(seen) - 1} ends at byte {end}"
            fh.seek(end - off_size)
            offset = struct.unpack(off_fmt, fh.read(off_size))[0]
    return None


def _tiff_truncation(path: Path) -> str | None:
    """Why a TIFF-based file is cut short, or None.

    A truncated TIFF often still opens: OpenSlide or tifffile use the IFDs that survive and
    return background or stale pixels for tiles past the end of the file, so the slide would be
    processed silently wrong. Every IFD of the chain and every tile or strip of every page must
    lie inside the file.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tf:
            if not tf.is_ndpi:  # NDPI keeps the high bits of its offsets elsewhere
                problem = _ifd_chain_problem(path, size)
                if problem:
                    return problem
            pages = [p for p in tf.pages if p is not None]
            pages += [p for s in tf.series for lv in s.levels for p in lv.pages if p is not None]
            for page in pages:
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                ends = offsets[counts > 0] + counts[counts > 0]
                if ends.size and int(ends.max()) > size:
                    return f"image data of page {page.index} ends at byte {int(ends.max())}"
    except Exception:  # noqa: BLE001 - unparsable TIFF: let the backends report it
        return None
    return None


def _probe(backend: _Backend) -> None:
    """Decode a few pixels of the coarsest level so corrupt files fail at open time."""
    lv = len(backend.levels) - 1
    w, h = backend.levels[lv].width, backend.levels[lv].height
    backend.read_level(lv, w // 2, h // 2, max(1, min(16, w - w // 2)), max(1, min(16, h - h // 2)))


def _try(
    factory: type[_Backend], path: Path, check: bool, errors: list[str], name: str
) -> _Backend | None:
    """Open (and probe) one backend; record the failure instead of raising (a layout dsf does
    not read, `UnsupportedLayoutError`, is raised: no other backend would read it either)."""
    backend = None
    try:
        backend = factory(path)
        if check:
            _probe(backend)
        return backend
    except UnsupportedLayoutError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend failure is reported to the user
        if backend is not None:
            backend.close()
        errors.append(f"{name}: {type(exc).__name__}: {exc}")
        return None


def _open_backend(path: Path, slide_id: str, check: bool = True) -> _Backend:
    """Choose and open a backend; every failure becomes a SlideError naming the slide."""
    if not path.exists():
        raise SlideError(slide_id, f"file not found: {path}; fix the `path` column of the sheet")
    if not path.is_file():
        raise SlideError(slide_id, f"{path} is not a file (for MIRAX give the .mrxs file)")
    if path.stat().st_size == 0:
        raise SlideError(slide_id, f"{path} is empty (0 bytes): copy it again or remove it")
    errors: list[str] = []
    try:
        backend = _first_backend(path, slide_id, check, errors)
    except UnsupportedLayoutError as exc:
        raise SlideError(
            slide_id, f"{path} is not a slide dsf can read: {exc}; remove it from the sheet"
        ) from exc
    if backend is not None:
        return backend
    if not errors:
        raise SlideError(
            slide_id,
            f"{path} is not a slide format dsf can read (OpenSlide formats, TIFF/OME-TIFF, "
            "PNG/JPEG); convert it or remove it from the sheet",
        )
    raise SlideError(
        slide_id,
        f"cannot read {path}: {'; '.join(errors)}. The file is corrupt, truncated or in an "
        "unsupported encoding: re-export it (e.g. as tiled JPEG TIFF) or remove it from the sheet",
    )


def _first_backend(path: Path, slide_id: str, check: bool, errors: list[str]) -> _Backend | None:
    """The first backend that opens the file: PIL for plain images (by content), OpenSlide for
    its formats (a generic TIFF whose pyramid only tifffile sees, in SubIFDs, goes to
    tifffile), tifffile for OME-TIFF and the TIFFs OpenSlide refuses."""
    if _is_plain_image(path):
        backend = _try(_ImageBackend, path, check, errors, "PIL")
    else:
        import openslide

        is_tiff = _is_tiff(path)
        problem = _tiff_truncation(path) if is_tiff and check else None
        if problem:
            raise SlideError(
                slide_id,
                f"{path} is truncated: its {problem}, past the end of the file "
                f"({path.stat().st_size} bytes). Copy or export it again in full, or remove it "
                "from the sheet",
            )
        vendor = openslide.OpenSlide.detect_format(str(path))
        backend = None
        if vendor is not None and not (is_tiff and _is_ome(path)):
            backend = _try(_OpenSlideBackend, path, check, errors, f"OpenSlide ({vendor})")
        if (
            backend is not None
            and vendor == "generic-tiff"
            and _tiff_level_count(path) > len(backend.levels)
        ):
            backend.close()
            backend = None
        if backend is None and is_tiff:
            backend = _try(_TiffBackend, path, check, errors, "tifffile")
    return backend


def _is_ome(path: Path) -> bool:
    """OME-TIFF files go to tifffile: OpenSlide ignores their SubIFD pyramids."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tf:
            return bool(tf.is_ome)
    except Exception:  # noqa: BLE001 - unparsable TIFF: let the backends report it
        return False


@dataclass
class Slide:
    """A slide opened lazily per process; all geometry in level-0 pixels, resolution in um/px."""

    path: Path
    slide_id: str
    mpp: float
    levels: list[LevelInfo]
    backend_name: str
    properties: dict[str, str] = field(default_factory=dict)
    #: levels within this relative distance of a requested resolution are read without
    #: resampling (patches.mpp_tolerance; open_slide fills it)
    mpp_tolerance: float = 0.0
    _backend: _Backend | None = field(default=None, repr=False)
    _pid: int = field(default=-1, repr=False)

    # -- process-safe handle ----------------------------------------------------------------
    def _handle(self) -> _Backend:
        if self._backend is None or self._pid != os.getpid():
            self._backend = _open_backend(self.path, self.slide_id, check=False)
            self._pid = os.getpid()
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_backend"], state["_pid"] = None, -1
        return state

    def close(self) -> None:
        """Close the file handle of this process (reopened on the next read)."""
        if self._backend is not None and self._pid == os.getpid():
            self._backend.close()
        self._backend = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- geometry ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size (width, height) in pixels."""
        return self.levels[0].width, self.levels[0].height

    @property
    def background(self) -> tuple[int, int, int]:
        """Colour of areas without scan data (white unless the file says otherwise)."""
        return self._handle().background

    def size_at(self, mpp: float) -> tuple[int, int]:
        """Whole-slide size (width, height) at `mpp`, rounded to whole pixels."""
        f = mpp / self.mpp
        w, h = self.dimensions
        return max(1, int(round(w / f))), max(1, int(round(h / f)))

    def best_level(self, mpp: float) -> int:
        """The coarsest level at or finer than `mpp` (within the tolerance)."""
        f = mpp / self.mpp
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= f * (1 + self.mpp_tolerance):
                best = i if lv.downsample >= self.levels[best].downsample else best
        return best

    def effective_mpp(self, mpp: float) -> float:
        """The resolution `read` actually delivers for a request of `mpp`.

        A level within the tolerance is served as it is, so its own mpp is what the caller gets
        (e.g. 0.2527 for a 0.25 request); otherwise the request itself.
        """
        lv = self.levels[self.best_level(mpp)]
        level_mpp = self.mpp * lv.downsample
        return level_mpp if abs(mpp / level_mpp - 1.0) <= self.mpp_tolerance else mpp

    @property
    def objective_power(self) -> float | None:
        """Objective power stated by the file, if any (informational: dsf works in mpp)."""
        value = self.properties.get("openslide.objective-power")
        try:
            return float(value) if value else None
        except ValueError:
            return None

    # -- pixels -----------------------------------------------------------------------------
    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the region with level-0 top-left (x, y) at `mpp`.

        The region covers width * mpp by height * mpp microns. Outside the slide reads as the
        slide background (never wraps).
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"empty read {width}x{height}")
        f = mpp / self.mpp
        level = self.best_level(mpp)
        lv = self.levels[level]
        r = f / lv.downsample
        if abs(r - 1.0) <= self.mpp_tolerance:
            r = 1.0
        lx, ly = x / lv.downsample, y / lv.downsample
        if r == 1.0 and lx == int(lx) and ly == int(ly):
            return self._read_padded(level, int(lx), int(ly), width, height)
        if r < 1.0:
            log.debug("%s: upsampling x%.2f from level %d", self.slide_id, 1 / r, level)
        ix0, iy0 = math.floor(lx), math.floor(ly)
        ix1, iy1 = math.ceil(lx + width * r), math.ceil(ly + height * r)
        src = self._read_padded(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        box = (lx - ix0, ly - iy0, lx - ix0 + width * r, ly - iy0 + height * r)
        resample = Image.Resampling.BOX if r > 1.0 else Image.Resampling.BILINEAR
        out = Image.fromarray(src).resize((width, height), resample=resample, box=box)
        return np.asarray(out)

    def _read_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read level pixels [x, x+w) x [y, y+h), padding outside the level with background."""
        if w * h > MAX_READ_PIXELS:
            raise ValueError(f"read of {w}x{h} level pixels exceeds the bound; tile the work")
        lv = self.levels[level]
        backend = self._handle()
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + w, lv.width), min(y + h, lv.height)
        try:
            if (cx0, cy0, cx1, cy1) == (x, y, x + w, y + h):
                return backend.read_level(level, x, y, w, h)
            out = np.empty((h, w, 3), np.uint8)
            out[:] = np.asarray(backend.background, np.uint8)
            if cx1 > cx0 and cy1 > cy0:
                part = backend.read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
                out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = part
            return out
        except SlideError:
            raise
        except Exception as exc:
            self.close()
            raise SlideError(
                self.slide_id,
                f"cannot decode pixels of {self.path} (level {level}, x {x}, y {y}): "
                f"{type(exc).__name__}: {exc}; the file is corrupt or truncated: re-export it "
                "or remove it from the sheet",
            ) from exc

    def thumbnail(self, mpp: float, chunk: int = 2048) -> np.ndarray:
        """The whole slide at `mpp` (RGB uint8), read in bounded chunks of the chosen level."""
        out_w, out_h = self.size_at(mpp)
        f = mpp / self.mpp  # level-0 px per output px: chunk origins stay on one sampling grid
        lv = self.levels[self.best_level(mpp)]
        step = max(16, int(chunk * lv.downsample / f))  # output px per chunk
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, step):
            for ox in range(0, out_w, step):
                w, h = min(step, out_w - ox), min(step, out_h - oy)
                out[oy : oy + h, ox : ox + w] = self.read(ox * f, oy * f, w, h, mpp)
        return out


def _backend_name(backend: _Backend) -> str:
    """`openslide`, `tiff` or `image`: the backend's class name, as reports show it."""
    return type(backend).__name__.strip("_").replace("Backend", "").lower()


@dataclass(frozen=True)
class SlideFacts:
    """What a slide file says of itself: its reader, level-0 size, pyramid levels and
    resolution in um/px (None: the file states none, the sheet must)."""

    reader: str
    width: int
    height: int
    levels: int
    mpp: float | None


def describe_slide(path: str | os.PathLike[str], slide_id: str | None = None) -> SlideFacts:
    """The facts of a slide file, for listing a folder; an unreadable file raises SlideError.

    A small region is decoded (as `open_slide` does), except in plain images, whose header is
    enough and whose pixels would otherwise be decoded whole.
    """
    path = Path(path)
    sid = slide_id or _default_id(path)
    if path.is_file() and path.stat().st_size and _is_plain_image(path):
        try:
            with Image.open(path) as im:
                mpp, note = _image_mpp(im.info.get("dpi"))
                size = im.size
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SlideError(sid, f"cannot read {path}: {exc}") from exc
        if note:
            log.warning("%s: %s", sid, note)
        return SlideFacts("image", size[0], size[1], 1, mpp)
    backend = _open_backend(path, sid, check=True)
    if backend.mpp_note:
        log.warning("%s: %s", sid, backend.mpp_note)
    try:
        props = backend.properties
        reader = _backend_name(backend)
        if "openslide.vendor" in props:
            reader = f"{reader} ({props['openslide.vendor']})"
        lv0 = backend.levels[0]
        return SlideFacts(reader, lv0.width, lv0.height, len(backend.levels), backend.file_mpp)
    finally:
        backend.close()


def _default_id(path: Path) -> str:
    """A slide's id from its file name, as `dsf sheet` and a slides folder name it."""
    from dsf.scan import slide_id as id_from_name

    return id_from_name(path.name)


def tolerance(value: float | None = None) -> float:
    """`value`, or the schema's patches.mpp_tolerance."""
    if value is not None:
        return float(value)
    from dsf.config import defaults

    return float(defaults("patches")["mpp_tolerance"])


def add_tolerance_argument(parser: argparse.ArgumentParser) -> None:
    """`--mpp-tolerance` of a stage that reads a slide: patches.mpp_tolerance (the workflow
    passes it), so the stage reads the slide at the resolution its patches were cut at."""
    parser.add_argument(
        "--mpp-tolerance",
        type=float,
        default=tolerance(),
        help="relative distance from the wanted um/px at which a slide level is read without "
        "resampling (patches.mpp_tolerance, default %(default)s; give the patches' value)",
    )


def open_slide(
    path: str | os.PathLike[str],
    mpp: float | None = None,
    slide_id: str | None = None,
    *,
    mpp_tolerance: float | None = None,
    check: bool = True,
) -> Slide:
    """Open a slide; `mpp` (from the sheet) overrides the file's resolution. `mpp_tolerance`
    defaults to patches.mpp_tolerance: every stage reads a slide as the patches were cut.

    With `check`, a small region is decoded so corrupt files fail here, with the slide's name,
    rather than deep inside a later stage.
    """
    path = Path(path)
    sid = slide_id or _default_id(path)
    if mpp is not None and not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise SlideError(sid, f"sheet mpp {mpp!r} is not a positive number; fix the `mpp` column")
    backend = _open_backend(path, sid, check)
    file_mpp = backend.file_mpp
    if mpp is None and file_mpp is None:
        backend.close()
        raise SlideError(
            sid,
            (
                f"{path}: {backend.mpp_note}; "
                if backend.mpp_note
                else f"{path} states no resolution (no openslide.mpp-x, Aperio MPP, OME "
                "PhysicalSizeX or TIFF resolution tags); "
            )
            + "fill the `mpp` column (um/px) of the slide sheet (with `slides` a folder: write "
            "its sheet with `dsf sheet FOLDER --out slides.tsv`; a stage run by hand takes "
            "`--sheet-mpp`)",
        )
    if mpp is not None and backend.mpp_note:
        log.warning("%s: the sheet's mpp %.4g um/px is used (%s)", sid, mpp, backend.mpp_note)
    if mpp is not None and file_mpp is not None and abs(mpp / file_mpp - 1) > 0.05:
        log.warning("%s: sheet mpp %.4g overrides the file's %.4g um/px", sid, mpp, file_mpp)
    if mpp is not None and mpp > MAX_PLAUSIBLE_MPP:
        log.warning(
            "%s: sheet mpp %.4g um/px is coarser than any scan (a 1.25x scan is about 8): is "
            "that an objective power (20, 40) in the `mpp` column? 40x is about 0.25 um/px, "
            "20x about 0.5",
            sid,
            mpp,
        )
    slide = Slide(
        path=path,
        slide_id=sid,
        mpp=float(mpp if mpp is not None else file_mpp),  # type: ignore[arg-type]
        levels=list(backend.levels),
        backend_name=_backend_name(backend),
        properties=dict(backend.properties),
        mpp_tolerance=tolerance(mpp_tolerance),
        _backend=backend,
        _pid=os.getpid(),
    )
    return slide
