"""What every slide reader gives `dsf.slide.Slide` (`Backend`: levels, reads, the stated
resolution) and the rules a file's stated resolution must pass to be used (DESIGN section 4).

The readers themselves are in `dsf.slide_readers` (OpenSlide, PIL, and which one opens a file)
and `dsf.tiff_backend` (tifffile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: A resolution coarser than this (um/px) is no scan: in a file it is a default DPI (72 dpi is
#: 353 um/px, 600 dpi 42) and is ignored; in the sheet it is warned about (an objective power?).
#: A 1.25x scan is about 8 um/px.
MAX_PLAUSIBLE_MPP = 16.0
#: Pixels whose x and y sizes differ by more than this (relative) are not square.
SQUARE_TOLERANCE = 0.02
#: The words of `file_resolution`'s reason for pixels that are not square.
NOT_SQUARE = "pixels that are not square"


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
            f"its {source} give {NOT_SQUARE} ({x:.4g} x {y:.4g} um), and dsf "
            "reads one resolution for both axes (resample it to square pixels, e.g. with "
            "`vips resize`)"
        )
    return x, None


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

    def full_width(self, level: int) -> bool:
        """Whether `level` is stored in compressed chunks that span its width (strips): a
        read of part of a row decodes the whole row, so a whole read goes row band by row
        band, not in squares (which decode each strip once per square across)."""
        return False

    def close(self) -> None:
        """Release file handles."""


def composite(
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
