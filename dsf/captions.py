"""Legend strips under QC pictures: a title, colour keys that wrap, and a scale bar.

Text is plain ASCII (um, mm2): PIL's built-in font has no micro or superscript glyphs.

Shared by the tissue overlay and the map overlay, so every picture dsf writes says what its
colours mean and how large it is; the text scales with the picture to stay readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dsf.errors import ConfigError

#: Scale bar lengths to choose from (um): the longest that fits a sixth of the picture.
BAR_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000)
Key = tuple[tuple[int, int, int], str]


def _bar(width_px: int, mpp: float) -> tuple[int, str] | None:
    """(length in px, label) of the scale bar for a picture `width_px` wide at `mpp`."""
    fits = [um for um in BAR_UM if um / mpp <= width_px / 6]
    if not fits:
        return None
    um = fits[-1]
    return round(um / mpp), (f"{um // 1000} mm" if um >= 1000 else f"{um} um")


def _wrap(text: str, fits: Any) -> list[str]:
    """`text` in lines that `fits(line)` accepts, broken at spaces (a word too long for a line
    alone, such as a long slide id, broken where it must)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and fits(candidate):
            lines[-1] = candidate
            continue
        while not fits(word) and len(word) > 1:
            cut = next((i for i in range(len(word) - 1, 0, -1) if fits(word[:i])), 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def add_legend(
    picture: np.ndarray,
    keys: list[Key],
    *,
    title: str | None = None,
    mpp: float | None = None,
    outline_keys: frozenset[str] = frozenset(),
) -> np.ndarray:
    """`picture` (RGB uint8) above a white strip: `title`, then a square of each key's colour
    (hollow for the labels in `outline_keys`) with its label, wrapping onto more rows, then a
    scale bar when the picture's `mpp` is given."""
    h, w = picture.shape[:2]
    size = max(12, w // 60)
    font = ImageFont.load_default(size=size)
    pad = size // 2
    line = size + pad
    img = Image.fromarray(picture)
    measure = ImageDraw.Draw(img)
    bar = _bar(w, mpp) if mpp else None
    places, x, row = [], pad, 0
    for _, label in keys:
        width = size + pad + int(measure.textlength(label, font=font)) + 2 * pad
        if x > pad and x + width > w:
            x, row = pad, row + 1
        places.append((x, row))
        x += width
    key_rows = row + 1 if keys else 0
    # the title wraps to the picture's width (a narrow slide's had been cut off)
    titles = (
        _wrap(title, lambda t: measure.textlength(t, font=font) <= w - 2 * pad) if title else []
    )
    top = line * len(titles)
    bar_rows = 1 if bar else 0
    canvas = Image.new("RGB", (w, h + top + (key_rows + bar_rows) * line + pad), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(titles):
        draw.text((pad, h + pad + i * line), text, fill=(0, 0, 0), font=font)
    for (colour, label), (x, row) in zip(keys, places, strict=True):
        y = h + top + pad + row * line
        box = [x, y, x + size, y + size]
        if label in outline_keys:
            draw.rectangle(box, outline=colour, width=max(2, size // 5))
        else:
            draw.rectangle(box, fill=colour, outline=(0, 0, 0))
        draw.text((x + size + pad // 2, y), label, fill=(0, 0, 0), font=font)
    if bar:
        length, label = bar
        y = h + top + pad + key_rows * line
        draw.rectangle([pad, y + size // 3, pad + length, y + 2 * size // 3], fill=(0, 0, 0))
        draw.text((2 * pad + length, y), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


#: Picture formats by suffix (an overlay named `.png` had been JPEG data).
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def picture_format(path: Path, option: str) -> str:
    """The PIL format a picture named `path` (given as `option`) is saved in: JPEG for
    .jpg/.jpeg, PNG for .png; another suffix is a ConfigError naming the option."""
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"{option} {path}: name the picture .jpg (JPEG) or .png (PNG)")
    return fmt


def save_picture(
    picture: np.ndarray, tmp: Path, path: Path, quality: int, option: str = "--overlay"
) -> None:
    """Save an RGB picture to `tmp` (a work name of `path`) in the format `path`'s suffix
    names (`picture_format`), JPEG at `quality`."""
    fmt = picture_format(path, option)
    extra = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(picture).save(tmp, format=fmt, **extra)
