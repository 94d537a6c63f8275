"""The tifffile reader of `dsf.slide.Slide`: OME-TIFF, the TIFFs OpenSlide refuses (stripped,
unusual compression), the pyramids only tifffile sees (SubIFDs, reduced pages of a plain TIFF,
downsamples stored as plain images), and the checks run on every TIFF-based slide before any
reader opens it: its layout (brightfield RGB, not fluorescence, palette or CMYK) and whether it
is cut short.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dsf.slide_backend import (
    Backend,
    LevelInfo,
    UnsupportedLayoutError,
    composite,
    file_resolution,
)

log = logging.getLogger(__name__)

#: A compressed chunk (tile or strip) that decodes to more than this is refused: every read
#: would decode it whole (a single-strip image); above SLOW_CHUNK_BYTES a warning says so.
MAX_CHUNK_BYTES = 1 << 30
SLOW_CHUNK_BYTES = 64 << 20
#: OME's length units (UnitsLength) in um; "µm" also with the Greek mu some writers use.
_UM_PER_UNIT = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "\u03bcm": 1.0, "um": 1.0, "mm": 1e3,
    "cm": 1e4, "dm": 1e5, "m": 1e6, "thou": 25.4, "in": 25400.0,
}  # fmt: skip


def tiff_tag_mpp(page: Any, axis: str = "X") -> float | None:
    """MPP from TIFF X/YResolution and ResolutionUnit (2 = inch, 3 = cm; without the tag, inch,
    TIFF's default, as OpenSlide reads it: a default DPI is then refused as implausible by
    `file_resolution`); None with unit 1 (none) or no resolution."""
    tags = page.tags
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    um = {2: 25400.0, 3: 10000.0}.get(unit)
    per_pixel = _per_pixel(page, axis)
    return um * per_pixel if um and per_pixel else None


def _ome_pixels(xml: str, size: tuple[int, int]) -> dict[str, str]:
    """The attributes of the OME `Pixels` of the image of `size` (width, height): the file's
    main image, which need not be its first (a label or macro image may come first); {} when
    none is named."""
    for elem in ET.fromstring(xml).iter():
        shape = (elem.attrib.get("SizeX"), elem.attrib.get("SizeY"))
        if elem.tag.endswith("Pixels") and shape == tuple(map(str, size)):
            return dict(elem.attrib)
    return {}


def _ome_mpp(pixels: dict[str, str], axis: str) -> float | None:
    """PhysicalSize{axis} of OME `Pixels` attributes, converted to um."""
    key = f"PhysicalSize{axis}"
    if key not in pixels:
        return None
    unit = pixels.get(f"{key}Unit", "µm")
    if unit not in _UM_PER_UNIT:  # "pixel", "reference frame": no physical size
        log.warning("OME %sUnit %r is no length dsf knows; resolution not taken", key, unit)
        return None
    return float(pixels[key]) * _UM_PER_UNIT[unit]


def sample_max(
    keyframe: Any, dtype: np.dtype, significant_bits: int | None = None
) -> tuple[int, str]:
    """The value of full intensity in 16-bit pixels and where it comes from: MaxSampleValue
    where the TIFF gives it, else the OME SignificantBits, else 65535. A camera's 12-bit data
    stored in 16-bit samples (0-4095), read against 65535, came out nearly black: tissue lost,
    colours wrong. 8-bit pixels are read as they are (255)."""
    top = int(np.iinfo(dtype).max)
    if dtype != np.uint16:
        return top, "the pixel type"
    tag = keyframe.tags.get(281)  # MaxSampleValue: one value, or one per sample
    if tag is not None:
        values = tag.value if isinstance(tag.value, tuple) else (tag.value,)
        value = max(int(v) for v in values)
        if 0 < value < top:
            return value, "its MaxSampleValue tag"
    if significant_bits is not None and 8 <= significant_bits < 16:
        return 2**significant_bits - 1, "its OME SignificantBits"
    return top, "the pixel type"


#: ImageJ's `unit=` values and their size in um
_IMAGEJ_UM = {"micron": 1.0, "um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "nm": 1e-3, "mm": 1e3}
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.]+)")


def description_mpp(tf: Any, keyframe: Any) -> tuple[float | None, float | None, str]:
    """(x, y, source) from a TIFF's text: an Aperio ImageDescription's `MPP =` (OpenSlide
    reads it only from tiled Aperio files), or ImageJ's resolution in its `unit=` (Fiji
    writes ResolutionUnit none and says the unit in its description); (None, None, "")."""
    desc = keyframe.description or ""
    if desc.startswith("Aperio") and (m := _APERIO_MPP.search(desc)):
        mpp = float(m.group(1))
        return mpp, mpp, "Aperio MPP"
    unit = (tf.imagej_metadata or {}).get("unit") if tf.is_imagej else None
    if unit in _IMAGEJ_UM and "XResolution" in keyframe.tags:
        x, y = (_per_pixel(keyframe, axis) for axis in "XY")
        k = _IMAGEJ_UM[unit]
        return (x * k if x else None), (y * k if y else None), f"ImageJ resolution ({unit})"
    return None, None, ""


def _per_pixel(page: Any, axis: str) -> float | None:
    """Units per pixel of X/YResolution (pixels per unit), or None."""
    tag = page.tags.get(f"{axis}Resolution")
    if tag is None:
        return None
    num, den = tag.value
    return den / num if num and den else None


#: ExtraSamples values that make a 4th sample alpha (1 associated, 2 unassociated); 0 is
#: unspecified data, no alpha
_ALPHA = (1, 2)


def _extra_sample(keyframe: Any) -> int | None:
    """The ExtraSamples value of a page's first extra sample, None without one."""
    extra = tuple(getattr(keyframe, "extrasamples", ()) or ())
    return int(extra[0]) if extra else None


#: TIFF compression of Aperio's JPEG 2000 with YCbCr samples (33005: with RGB samples)
APERIO_J2K_YCBCR = 33003


def ycbcr_to_rgb(data: np.ndarray) -> np.ndarray:
    """RGB uint8 of full-range YCbCr samples (JFIF's BT.601, as OpenSlide converts Aperio's
    JPEG 2000 tiles); a 4th sample is kept."""
    ycc = data[..., :3].astype(np.float32)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.concatenate([out, data[..., 3:]], axis=-1) if data.shape[-1] > 3 else out


#: TIFF Photometric values read as colour: RGB, and YCbCr (JPEG tiles, decoded to RGB)
_COLOUR_PHOTOMETRIC = (2, 6)
#: Compressions whose decoder turns YCbCr into RGB (JPEG, JPEG 2000); with any other, tifffile
#: gives the Y, Cb and Cr samples as they are
_YCBCR_DECODED = (6, 7, 33003, 33004, 33005, 34712)


def _check_brightfield(keyframe: Any, axes: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse layouts that are not a brightfield scan, which dsf would otherwise read silently
    wrong: grey channels (fluorescence, multiplex), palette indices (a label or class map),
    CMYK, white-is-zero grey. One 8-bit grey channel (with or without an alpha sample) is
    read as grey RGB."""
    photometric = int(keyframe.photometric)
    if photometric == 6 and int(keyframe.compression) not in _YCBCR_DECODED:
        raise UnsupportedLayoutError(
            "its pixels are YCbCr stored without JPEG compression, which would be read as "
            "false colours; convert it to an RGB TIFF (or a JPEG-compressed one)"
        )
    if photometric in _COLOUR_PHOTOMETRIC:
        return
    channels = (
        shape[axes.index("C")] if "C" in axes else shape[axes.index("S")] if "S" in axes else 1
    )
    if photometric == 1 and channels == 1 and dtype == np.uint8:
        return
    if photometric == 1 and channels == 2 and dtype == np.uint8 and _grey_alpha(keyframe):
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


def _grey_alpha(keyframe: Any) -> bool:
    """Whether a page is one grey sample and an alpha sample (ImageJ's, GIMP's grey + alpha)."""
    return keyframe.samplesperpixel == 2 and _extra_sample(keyframe) in _ALPHA


def _check_layout(series: Any, orientation: bool = True) -> None:
    """Refuse a tifffile series that is not one brightfield RGB(A) or 8-bit grey plane, or
    (`orientation`: for the readers that do not apply it alike) one stored rotated."""
    axes = series.axes
    if axes not in {"YXS", "YX", "CYX", "SYX"}:
        raise UnsupportedLayoutError(
            f"its image has axes {axes!r} (shape {series.shape}), not one RGB plane"
        )
    dtype = np.dtype(series.dtype)
    if dtype not in (np.uint8, np.uint16):
        raise UnsupportedLayoutError(f"its pixels are {dtype} (dsf reads uint8 or uint16)")
    keyframe = series.levels[0].keyframe
    turned = int(keyframe.tags.valueof(274, 1) or 1)  # TIFF Orientation
    if orientation and turned != 1:
        raise UnsupportedLayoutError(
            f"it is stored rotated or mirrored (TIFF Orientation {turned}), which readers "
            "apply differently (OpenSlide to each tile, not to the image); re-save it upright, "
            "e.g. `vips autorot in.tif up.v && vips tiffsave up.v out.tif --tile --pyramid "
            "--compression jpeg`"
        )
    _check_brightfield(keyframe, axes, tuple(series.shape), dtype)
    if axes in {"CYX", "SYX"} and series.shape[0] not in (3, 4) and not _grey_alpha(keyframe):
        raise UnsupportedLayoutError(f"it has {series.shape[0]} channels (dsf reads RGB or RGBA)")


def _plane_size(series: Any) -> tuple[int, int]:
    """(width, height) of a tifffile series' full-resolution plane; (0, 0) without Y and X."""
    if "Y" not in series.axes or "X" not in series.axes:
        return 0, 0
    return series.shape[series.axes.index("X")], series.shape[series.axes.index("Y")]


#: Names of a file's side images (tifffile's series names, an OME Image's Name): the slide's
#: label, the macro photo of the whole glass, an overview or thumbnail
_SIDE_IMAGE = re.compile(r"\s*(label|macro|overview|thumbnail)( image)?\s*", re.IGNORECASE)


def _main_series(tf: Any) -> int:
    """Index of the file's main image: the series with the most pixels (the first of equals)
    among those not named as a side image (label, macro, overview, thumbnail). A converter may
    write such an image before the scan; OpenSlide's generic TIFF reader and a first-series
    rule would then read that as the slide, and a region's scan may be smaller than the macro
    photo carried along with it (bfconvert converts every image of a file)."""
    areas = [math.prod(_plane_size(s)) for s in tf.series]
    scans = [k for k, s in enumerate(tf.series) if not _SIDE_IMAGE.fullmatch(s.name or "")]
    return max(scans or range(len(areas)), key=lambda k: (areas[k], -k))


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


class TiffBackend(Backend):
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
        bits = None  # the OME SignificantBits, read before the file may be read as plain TIFF
        source = "OME PhysicalSizeX/Y values"
        if tf.is_ome and tf.ome_metadata:
            pixels = _ome_pixels(tf.ome_metadata, _plane_size(series))
            mpp_x, mpp_y = (_ome_mpp(pixels, axis) for axis in "XY")
            sig = pixels.get("SignificantBits", "")
            bits = int(sig) if sig.isdigit() else None
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
            mpp_x, mpp_y, source = description_mpp(tf, keyframe)
        if mpp_x is None:
            mpp_x, mpp_y = tiff_tag_mpp(keyframe), tiff_tag_mpp(keyframe, "Y")
            source = "TIFF resolution tags"
        _check_layout(series)
        self._axes = series.axes
        self._dtype = np.dtype(series.dtype)
        keyframe = series.levels[0].keyframe
        self._max, whence = sample_max(keyframe, self._dtype, bits)
        if self._max != np.iinfo(self._dtype).max:
            log.info("%s: samples of 0-%d (%s) read as 0-255", path, self._max, whence)
        # (series, level) of each pyramid level: tifffile's, or further images of the file
        # that are downsamples of the main image without being flagged as reduced (`_page_levels`)
        pyramid = _pyramid(tf, main)
        self._refs = [(k, i) for k, i, _ in pyramid]
        levels = [level for _, _, level in pyramid]
        # uncompressed contiguous levels are memory-mapped (a read touches just its rows);
        # otherwise a read decodes each chunk (tile or strip) it meets whole
        self._mapped = [lv.dataoffset is not None and lv.keyframe.is_memmappable for lv in levels]
        self._strips = [
            not mapped and not lv.keyframe.is_tiled
            for lv, mapped in zip(levels, self._mapped, strict=True)
        ]
        # Aperio's JPEG 2000 YCbCr (33003): the decoder gives Y, Cb and Cr as they are
        self._ycbcr = [int(lv.keyframe.compression) == APERIO_J2K_YCBCR for lv in levels]
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
        extra = _extra_sample(keyframe)
        self._alpha = extra in _ALPHA
        self._premultiplied = extra == 1
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

    def full_width(self, level: int) -> bool:
        """Stripped, compressed levels (`Backend.full_width`)."""
        return self._strips[level]

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr = self._arrays()[level]
        if self._axes in {"CYX", "SYX"}:
            data = np.moveaxis(np.asarray(arr[:, y : y + h, x : x + w]), 0, -1)
        else:
            data = np.asarray(arr[y : y + h, x : x + w])
        if data.ndim == 2:
            data = np.repeat(data[..., None], 3, axis=2)
        elif data.shape[2] == 2:  # grey and alpha: grey RGB and alpha
            data = data[..., [0, 0, 0, 1]]
        if self._ycbcr[level]:
            # tiles a sparse file leaves out read as the fill, 255 in every sample, which is
            # no YCbCr a scan holds: kept white (converted, it is magenta)
            blank = (data[..., :3] == 255).all(axis=-1)
            data = ycbcr_to_rgb(data)
            data[blank, :3] = 255
        if self._dtype == np.uint16:  # to 0-255 against the samples' full intensity
            scaled = data.astype(np.uint32) * 255 // self._max
            data = np.minimum(scaled, 255).astype(np.uint8)
        if data.shape[2] == 4 and self._alpha:
            return composite(data, self.background, self._premultiplied)
        return np.ascontiguousarray(data[..., :3])

    def close(self) -> None:
        tf = getattr(self._local, "tf", None)
        if tf is not None:
            tf.close()


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


def is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def tiff_layout(path: Path, generic: bool = True) -> tuple[bool, int, int, bool]:
    """(OME-TIFF?, pyramid levels tifffile sees in the main image, SubIFDs included, the main
    image's series index, whether tifffile reads it better than OpenSlide's generic TIFF reader:
    16-bit samples, a 4th sample that is no alpha, grey and alpha), from one parse;
    (False, 0, 0, False) when tifffile cannot parse it (the backends then report why).

    Raises UnsupportedLayoutError for a layout that is no brightfield scan: OpenSlide would
    read a tiled fluorescence, palette or CMYK TIFF as RGB without complaint; and, for a
    `generic` TIFF (OpenSlide's generic reader or tifffile, not a vendor's format), for one
    stored rotated, which OpenSlide's generic reader turns tile by tile."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tf:
            main = _main_series(tf)
            series = tf.series[main]
            ome, levels = bool(tf.is_ome), len(_pyramid(tf, main))
            # OpenSlide reads 16-bit samples against 65535 whatever their range (`sample_max`),
            # a 4th sample as alpha though the file says it is none (ExtraSamples 0), and grey
            # with unassociated alpha as if associated (libtiff does not premultiply it)
            keyframe = series.levels[0].keyframe
            own = (
                np.dtype(series.dtype) == np.uint16
                or (keyframe.samplesperpixel == 4 and _extra_sample(keyframe) not in _ALPHA)
                or _grey_alpha(keyframe)
            )
            layout: UnsupportedLayoutError | None = None
            try:
                _check_layout(series, orientation=generic)
            except UnsupportedLayoutError as exc:
                layout = exc
    except Exception:  # noqa: BLE001 - unparsable for tifffile: OpenSlide's view stands
        return False, 0, 0, False
    if layout is not None:
        raise layout
    return ome, levels, main, own


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


def tiff_truncation(path: Path) -> str | None:
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
