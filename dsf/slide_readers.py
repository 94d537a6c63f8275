"""The readers behind a `dsf.slide.Slide`: OpenSlide, tifffile and PIL, which one opens a file,
and the resolution a file states (DESIGN section 4).

- OpenSlide for vendor formats (Aperio, Hamamatsu, MIRAX, Philips, DICOM, tiled generic TIFF);
- tifffile for OME-TIFF, the TIFFs OpenSlide refuses (stripped, unusual compression) and the
  pyramids only it sees (SubIFDs in a plain TIFF);
- PIL for plain images (PNG/JPEG regions of interest), which carry their mpp in the sheet.

A file is routed by what it holds, not its suffix. Its stated resolution is kept only when it
is a scan's (not a default DPI, square pixels: `file_resolution`); layouts that are not a
brightfield RGB scan (fluorescence, palette, CMYK) are refused by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsf.errors import SlideError

log = logging.getLogger(__name__)

#: A resolution coarser than this (um/px) is no scan: in a file it is a default DPI (72 dpi is
#: 353 um/px, 600 dpi 42) and is ignored; in the sheet it is warned about (an objective power?).
#: A 1.25x scan is about 8 um/px.
MAX_PLAUSIBLE_MPP = 16.0
#: Pixels whose x and y sizes differ by more than this (relative) are not square.
SQUARE_TOLERANCE = 0.02

#: A compressed chunk (tile or strip) that decodes to more than this is refused: every read
#: would decode it whole (a single-strip image); above SLOW_CHUNK_BYTES a warning says so.
MAX_CHUNK_BYTES = 1 << 30
SLOW_CHUNK_BYTES = 64 << 20

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
#: OME's length units (UnitsLength) in um; "µm" also with the Greek mu some writers use.
_UM_PER_UNIT = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "\u03bcm": 1.0, "um": 1.0, "mm": 1e3,
    "cm": 1e4, "dm": 1e5, "m": 1e6, "thou": 25.4, "in": 25400.0,
}  # fmt: skip


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


class Backend:
    """Reads a rectangle of one level in that level's pixel coordinates, as RGB uint8."""

    levels: list[LevelInfo]
    file_mpp: float | None
    #: why the file's stated resolution is not used (a default DPI, non-square pixels), if so
    mpp_note: str | None = None
    properties: dict[str, str]
    background: tuple[int, int, int] = (255, 255, 255)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `level` from its pixel (x, y); each backend implements it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""


def _composite(
    rgba: np.ndarray, background: tuple[int, int, int], premultiplied: bool = False
) -> np.ndarray:
    """RGBA -> RGB over a background colour (transparent = no scan data); `premultiplied`
    (TIFF associated alpha) colours are already scaled by their alpha."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    own = rgb.astype(np.float32) if premultiplied else rgb.astype(np.float32) * a
    out = own + np.asarray(background, np.float32) * (1.0 - a)
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


class _OpenSlideBackend(Backend):
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


def _ome_mpp(xml: str, axis: str, size: tuple[int, int]) -> float | None:
    """PhysicalSize{axis} of the OME image of `size` (width, height), converted to um: the
    file's main image, which need not be its first (a label or macro image may come first)."""
    root = ET.fromstring(xml)
    key = f"PhysicalSize{axis}"
    for elem in root.iter():
        shape = (elem.attrib.get("SizeX"), elem.attrib.get("SizeY"))
        if elem.tag.endswith("Pixels") and shape == tuple(map(str, size)) and key in elem.attrib:
            unit = elem.attrib.get(f"{key}Unit", "µm")
            if unit not in _UM_PER_UNIT:  # "pixel", "reference frame": no physical size
                log.warning("OME %sUnit %r is no length dsf knows; resolution not taken", key, unit)
                return None
            return float(elem.attrib[key]) * _UM_PER_UNIT[unit]
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


def _check_layout(series: Any) -> None:
    """Refuse a tifffile series that is not one brightfield RGB(A) or 8-bit grey plane."""
    axes = series.axes
    if axes not in {"YXS", "YX", "CYX", "SYX"}:
        raise UnsupportedLayoutError(
            f"its image has axes {axes!r} (shape {series.shape}), not one RGB plane"
        )
    dtype = np.dtype(series.dtype)
    if dtype not in (np.uint8, np.uint16):
        raise UnsupportedLayoutError(f"its pixels are {dtype} (dsf reads uint8 or uint16)")
    _check_brightfield(series.levels[0].keyframe, axes, tuple(series.shape), dtype)
    if axes in {"CYX", "SYX"} and series.shape[0] not in (3, 4):
        raise UnsupportedLayoutError(f"it has {series.shape[0]} channels (dsf reads RGB or RGBA)")


def _plane_size(series: Any) -> tuple[int, int]:
    """(width, height) of a tifffile series' full-resolution plane; (0, 0) without Y and X."""
    if "Y" not in series.axes or "X" not in series.axes:
        return 0, 0
    return series.shape[series.axes.index("X")], series.shape[series.axes.index("Y")]


def _main_series(tf: Any) -> int:
    """Index of the file's main image: the series with the most pixels (the first of equals).
    A converter may write a label, macro or overview image before the scan; OpenSlide's
    generic TIFF reader and a first-series rule would then read that as the slide."""
    areas = [math.prod(_plane_size(s)) for s in tf.series]
    return areas.index(max(areas))


def _page_levels(tf: Any, main: int) -> list[tuple[int, Any]]:
    """(series index, series) of the file's other images that are downsamples of its main
    image (same axes and type, both sides one factor of it, rounded either way), largest
    first: a pyramid written as plain pages, not flagged as reduced, which tifffile and
    OpenSlide take for separate images (coarse reads then decoded the full level). A label or
    macro image, of another shape, is not one."""
    series = tf.series[main]
    y_ax, x_ax = series.axes.index("Y"), series.axes.index("X")
    h0, w0 = series.shape[y_ax], series.shape[x_ax]
    found: dict[int, tuple[int, Any]] = {}
    for k, other in enumerate(tf.series):
        if k == main:
            continue
        if other.axes != series.axes or other.dtype != series.dtype or len(other.levels) != 1:
            continue
        h, w = other.shape[y_ax], other.shape[x_ax]
        if not 1 <= w < w0 or w in found:
            continue
        if abs(h - h0 * w / w0) <= 1:  # one factor for both sides, rounded either way
            found[w] = (k, other)
    return [found[w] for w in sorted(found, reverse=True)]


def _pyramid(tf: Any, main: int) -> list[tuple[int, int, Any]]:
    """(series index, level index, level) of each pyramid level of series `main`: tifffile's
    levels, or, where it sees one, that image and the plain pages that downsample it."""
    series = tf.series[main]
    if len(series.levels) > 1:
        return [(main, i, level) for i, level in enumerate(series.levels)]
    return [(main, 0, series.levels[0]), *((k, 0, im) for k, im in _page_levels(tf, main))]


class _TiffBackend(Backend):
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
        main = _main_series(tf)
        series = tf.series[main]
        mpp_x = mpp_y = None
        source = "OME PhysicalSizeX/Y values"
        if tf.is_ome and tf.ome_metadata:
            size = _plane_size(series)
            mpp_x, mpp_y = (_ome_mpp(tf.ome_metadata, axis, size) for axis in "XY")
            if len(series.levels) == 1:
                flat = tifffile.TiffFile(str(path), is_ome=False)
                flat_main = _main_series(flat)
                plain = flat.series[flat_main]
                if len(plain.levels) > 1 and plain.shape == series.shape:
                    tf.close()
                    tf, main, series, self._flags = flat, flat_main, plain, {"is_ome": False}
                    self._local.tf = tf
                else:
                    flat.close()
        if main:
            log.info("%s: its main image is image %d of the file (the largest)", path, main)
        if mpp_x is None:
            keyframe = series.levels[0].keyframe
            mpp_x, mpp_y = tiff_tag_mpp(keyframe), tiff_tag_mpp(keyframe, "Y")
            source = "TIFF resolution tags"
        _check_layout(series)
        self._axes = series.axes
        self._dtype = np.dtype(series.dtype)
        keyframe = series.levels[0].keyframe
        # (series, level) of each pyramid level: tifffile's, or further images of the file
        # that are downsamples of the main image without being flagged as reduced (`_page_levels`)
        pyramid = _pyramid(tf, main)
        self._refs = [(k, i) for k, i, _ in pyramid]
        levels = [level for _, _, level in pyramid]
        # uncompressed contiguous levels are memory-mapped (a read touches just its rows);
        # otherwise a read decodes each chunk (tile or strip) it meets whole
        self._mapped = [lv.dataoffset is not None and lv.keyframe.is_memmappable for lv in levels]
        chunk = math.prod(keyframe.chunks) * self._dtype.itemsize
        if not self._mapped[0] and chunk > MAX_CHUNK_BYTES:
            raise UnsupportedLayoutError(
                f"its full-resolution image is stored in compressed chunks of "
                f"{chunk / 2**20:.0f} MiB ({'x'.join(map(str, keyframe.chunks))}), each "
                "decoded whole by every read of a few pixels; re-save it tiled, e.g. "
                "`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`"
            )
        if not self._mapped[0] and chunk > SLOW_CHUNK_BYTES:
            log.warning(
                "%s: stored in compressed chunks of %.0f MiB, each decoded whole by every "
                "read; re-save it tiled (`vips tiffsave ... --tile --pyramid`) for speed",
                path,
                chunk / 2**20,
            )
        # a 4th sample is alpha only where ExtraSamples says so (1 associated, 2 unassociated)
        extra = tuple(getattr(keyframe, "extrasamples", ()) or ())[:1]
        self._alpha = extra in ((1,), (2,))
        self._premultiplied = extra == (1,)
        y_ax, x_ax = self._axes.index("Y"), self._axes.index("X")
        w0 = series.levels[0].shape[x_ax]
        self.levels = [
            LevelInfo(lv.shape[x_ax], lv.shape[y_ax], w0 / lv.shape[x_ax]) for lv in levels
        ]
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
            # tiles a sparse pyramid leaves out (byte count 0) read as white, the background,
            # not as black, which the tissue rule would take for tissue
            fill = np.iinfo(self._dtype).max
            arrays = [
                tifffile.memmap(str(self._path), series=k, level=i, mode="r", **self._flags)
                if mapped
                else zarr.open_array(tf.series[k].aszarr(level=i, fillvalue=fill), mode="r")
                for (k, i), mapped in zip(self._refs, self._mapped, strict=True)
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
            return _composite(data, self.background, self._premultiplied)
        return np.ascontiguousarray(data[..., :3])

    def close(self) -> None:
        tf = getattr(self._local, "tf", None)
        if tf is not None:
            tf.close()


def image_mpp(dpi: Any) -> tuple[float | None, str | None]:
    """A plain image's resolution from its DPI (see `file_resolution`)."""
    if not dpi or not dpi[0]:
        return None, None
    y = 25400.0 / float(dpi[1]) if len(dpi) > 1 and dpi[1] else None
    return file_resolution(25400.0 / float(dpi[0]), y, "DPI values")


#: PIL modes of a brightfield image: RGB(A) or one 8-bit grey channel (with alpha).
_IMAGE_MODES = ("RGB", "RGBA", "L", "LA")


def check_image_mode(mode: str) -> None:
    """Refuse a plain image that is no brightfield RGB or 8-bit grey picture, as the TIFF
    readers do (PIL would convert 16-bit grey by clipping, palettes and CMYK silently)."""
    if mode in _IMAGE_MODES:
        return
    kinds = {
        "P": "palette indices (a label or class map?)",
        "PA": "palette indices (a label or class map?)",
        "CMYK": "CMYK",
        "1": "one bit per pixel (a mask?)",
    }
    what = kinds.get(mode) or (
        f"one {'16-bit' if mode.startswith('I;16') else mode} grey channel (a fluorescence "
        "image or a label mask?)"
    )
    raise UnsupportedLayoutError(
        f"its pixels are {what} (PIL mode {mode}), not a brightfield RGB image; "
        "save it as 8-bit RGB"
    )


class _ImageBackend(Backend):
    """A plain image decoded once (PNG/JPEG cannot be read in parts); for ROI crops."""

    def __init__(self, path: Path) -> None:
        with Image.open(path) as im:
            dpi = im.info.get("dpi")
            check_image_mode(im.mode)
            im = im.convert("RGBA") if im.mode in ("RGBA", "LA") else im.convert("RGB")
            data = np.asarray(im)
        self._data = _composite(data, self.background) if data.shape[2] == 4 else data
        h, w = self._data.shape[:2]
        self.levels = [LevelInfo(w, h, 1.0)]
        self.properties = {"dsf.backend": "image"}
        self.file_mpp, self.mpp_note = image_mpp(dpi)

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


def is_plain_image(path: Path) -> bool:
    """A PNG/JPEG/... by its content, whatever its suffix (a PNG saved as `.tif`); a file
    without a known signature counts by its suffix, so PIL reports what is wrong with it."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return True
    return path.suffix.lower() in _IMAGE_SUFFIXES and not _is_tiff(path)


def _tiff_layout(path: Path) -> tuple[bool, int, int]:
    """(OME-TIFF?, pyramid levels tifffile sees in the main image, SubIFDs included, the main
    image's series index), from one parse; (False, 0, 0) when tifffile cannot parse it (the
    backends then report why).

    Raises UnsupportedLayoutError for a layout that is no brightfield scan: OpenSlide would
    read a tiled fluorescence, palette or CMYK TIFF as RGB without complaint."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tf:
            main = _main_series(tf)
            series = tf.series[main]
            ome, levels = bool(tf.is_ome), len(_pyramid(tf, main))
            layout: UnsupportedLayoutError | None = None
            try:
                _check_layout(series)
            except UnsupportedLayoutError as exc:
                layout = exc
    except Exception:  # noqa: BLE001 - unparsable for tifffile: OpenSlide's view stands
        return False, 0, 0
    if layout is not None:
        raise layout
    return ome, levels, main


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


def _probe(backend: Backend) -> None:
    """Decode a few pixels of the coarsest level so corrupt files fail at open time."""
    lv = len(backend.levels) - 1
    w, h = backend.levels[lv].width, backend.levels[lv].height
    backend.read_level(lv, w // 2, h // 2, max(1, min(16, w - w // 2)), max(1, min(16, h - h // 2)))


def _try(
    factory: type[Backend], path: Path, check: bool, errors: list[str], name: str
) -> Backend | None:
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


def layout_refusal(slide_id: str, path: Path, exc: UnsupportedLayoutError) -> SlideError:
    """The error for a readable file that is no brightfield slide (`UnsupportedLayoutError`)."""
    return SlideError(
        slide_id, f"{path} is not a slide dsf can read: {exc}; remove it from the sheet"
    )


def open_backend(path: Path, slide_id: str, check: bool = True) -> Backend:
    """Choose and open a backend; every failure becomes a SlideError naming the slide."""
    if not path.exists():
        raise SlideError(
            slide_id,
            f"file not found: {path}; fix the `path` column of the sheet (or --slide, run by hand)",
        )
    if not path.is_file():
        raise SlideError(slide_id, f"{path} is not a file (for MIRAX give the .mrxs file)")
    if path.stat().st_size == 0:
        raise SlideError(slide_id, f"{path} is empty (0 bytes): copy it again or remove it")
    errors: list[str] = []
    try:
        backend = _first_backend(path, slide_id, check, errors)
    except UnsupportedLayoutError as exc:
        raise layout_refusal(slide_id, path, exc) from exc
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


def _first_backend(path: Path, slide_id: str, check: bool, errors: list[str]) -> Backend | None:
    """The first backend that opens the file: PIL for plain images (by content), OpenSlide for
    its formats, tifffile for the TIFFs whose pyramid OpenSlide does not see (OME-TIFF, a
    generic TIFF with its levels in SubIFDs) and those OpenSlide refuses."""
    if is_plain_image(path):
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
        # what tifffile sees, only where OpenSlide would otherwise read the file
        layout = _tiff_layout(path) if is_tiff and vendor is not None else (False, 0, 0)
        ome, tiff_levels, main = layout
        backend = None
        # OpenSlide's generic TIFF reader takes the first image for the slide
        if vendor is not None and not ome and not (vendor == "generic-tiff" and main):
            backend = _try(_OpenSlideBackend, path, check, errors, f"OpenSlide ({vendor})")
        if backend is not None and vendor == "generic-tiff" and tiff_levels > len(backend.levels):
            backend.close()
            backend = None
        if backend is None and is_tiff:
            backend = _try(_TiffBackend, path, check, errors, "tifffile")
    return backend


def backend_name(backend: Backend) -> str:
    """`openslide`, `tiff` or `image`: the backend's class name, as reports show it."""
    return type(backend).__name__.strip("_").replace("Backend", "").lower()
