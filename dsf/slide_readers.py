"""The readers behind a `dsf.slide.Slide`: OpenSlide, tifffile and PIL, which one opens a file,
and the resolution a file states (DESIGN section 4).

- OpenSlide for vendor formats (Aperio, Hamamatsu, MIRAX, Philips, DICOM, tiled generic TIFF);
- tifffile (`dsf.tiff_backend`) for OME-TIFF, the TIFFs OpenSlide refuses (stripped, unusual
  compression) and the pyramids only it sees (SubIFDs in a plain TIFF);
- PIL for plain images (PNG/JPEG regions of interest), which carry their mpp in the sheet.

A file is routed by what it holds, not its suffix. Its stated resolution is kept only when it
is a scan's (not a default DPI, square pixels: `dsf.slide_backend.file_resolution`); layouts
that are not a brightfield RGB scan (fluorescence, palette, CMYK) are refused by name.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsf.errors import REMOVE_SLIDE, SlideError
from dsf.slide_backend import (
    Backend,
    LevelInfo,
    UnsupportedLayoutError,
    composite,
    file_resolution,
)
from dsf.tiff_backend import TiffBackend, is_tiff, tiff_layout, tiff_truncation

log = logging.getLogger(__name__)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


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
            return composite(np.asarray(region), self.background)
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
        self._data = composite(data, self.background) if data.shape[2] == 4 else data
        h, w = self._data.shape[:2]
        self.levels = [LevelInfo(w, h, 1.0)]
        self.properties = {"dsf.backend": "image"}
        self.file_mpp, self.mpp_note = image_mpp(dpi)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._data[y : y + h, x : x + w]


#: Leading bytes of the plain image formats PIL reads here.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def is_plain_image(path: Path) -> bool:
    """A PNG/JPEG/... by its content, whatever its suffix (a PNG saved as `.tif`); a file
    without a known signature counts by its suffix, so PIL reports what is wrong with it."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return True
    return path.suffix.lower() in _IMAGE_SUFFIXES and not is_tiff(path)


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
        slide_id,
        f"{path} is not a slide dsf can read: {exc}; {REMOVE_SLIDE}",
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
    data = path.parent / path.stem
    if path.suffix.lower() == ".mrxs" and not (data / "Slidedat.ini").is_file():
        raise SlideError(
            slide_id,
            f"{path} is a MIRAX index whose data folder {data} (with Slidedat.ini) is "
            f"{'incomplete' if data.is_dir() else 'missing'}: copy the .mrxs file together with "
            "its folder of the same name",
        )
    errors: list[str] = []
    try:
        backend = _first_backend(path, slide_id, check, errors)
    except UnsupportedLayoutError as exc:
        raise layout_refusal(slide_id, path, exc) from exc
    if backend is not None:
        return backend
    if not errors:
        from dsf.scan import CONVERT_TO, UNREAD_FORMATS

        if kind := UNREAD_FORMATS.get(path.suffix.lower()):
            raise SlideError(
                slide_id,
                f"{path} is a slide in {kind} format, which dsf does not read: convert it to "
                f"{CONVERT_TO}, or {REMOVE_SLIDE}",
            )
        raise SlideError(
            slide_id,
            f"{path} is not a slide format dsf can read (OpenSlide formats, TIFF/OME-TIFF, "
            f"PNG/JPEG); convert it or {REMOVE_SLIDE}",
        )
    raise SlideError(
        slide_id,
        f"cannot read {path}: {'; '.join(errors)}. The file is corrupt, truncated or in an "
        f"unsupported encoding: re-export it (e.g. as tiled JPEG TIFF) or {REMOVE_SLIDE}",
    )


def _first_backend(path: Path, slide_id: str, check: bool, errors: list[str]) -> Backend | None:
    """The first backend that opens the file: PIL for plain images (by content), OpenSlide for
    its formats, tifffile for the TIFFs whose pyramid OpenSlide does not see (OME-TIFF, a
    generic TIFF with its levels in SubIFDs) and those OpenSlide refuses."""
    if is_plain_image(path):
        backend = _try(_ImageBackend, path, check, errors, "PIL")
    else:
        import openslide

        tiff = is_tiff(path)
        problem = tiff_truncation(path) if tiff and check else None
        if problem:
            raise SlideError(
                slide_id,
                f"{path} is truncated: its {problem}, past the end of the file "
                f"({path.stat().st_size} bytes). Copy or export it again in full, or "
                f"{REMOVE_SLIDE}",
            )
        vendor = openslide.OpenSlide.detect_format(str(path))
        # what tifffile sees, only where OpenSlide would otherwise read the file
        generic = vendor == "generic-tiff"
        layout = tiff_layout(path, generic) if tiff and vendor is not None else (False, 0, 0, False)
        ome, tiff_levels, main, own = layout
        backend = None
        # OpenSlide's generic TIFF reader takes the first image for the slide, and reads some
        # layouts wrong that tifffile reads right (`own`: 16-bit samples, a 4th that is no alpha)
        if vendor is not None and not ome and not (generic and (main or own)):
            backend = _try(_OpenSlideBackend, path, check, errors, f"OpenSlide ({vendor})")
        if backend is not None and generic and tiff_levels > len(backend.levels):
            backend.close()
            backend = None
        if backend is None and tiff:
            backend = _try(TiffBackend, path, check, errors, "tifffile")
    return backend


def backend_name(backend: Backend) -> str:
    """`openslide`, `tiff` or `image`: the backend's class name, as reports show it."""
    return type(backend).__name__.strip("_").replace("Backend", "").lower()
