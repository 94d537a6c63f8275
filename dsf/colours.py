"""One colour per class index, shared by the evaluation figure and the inference overlays.

Index 0 (background / unlabelled / not predicted) is black and drawn transparent by callers;
classes 1.. take the Okabe-Ito colour-blind-safe palette, then Paul Tol's 'muted' set, then
evenly spaced hues for any further classes.
"""

from __future__ import annotations

import colorsys

import numpy as np

# Okabe & Ito (2008) without black, then Tol's muted scheme: distinct under the common forms of
# colour blindness. Order chosen so BCSS's TUM, STR, LYM, NEC, OTR get vermillion, sky blue,
# bluish green, yellow, reddish purple.
CLASS_COLOURS: list[tuple[int, int, int]] = [
    (0, 0, 0),  # 0: background / ignore
    (213, 94, 0),  # vermillion
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (204, 121, 167),  # reddish purple
    (0, 114, 178),  # blue
    (230, 159, 0),  # orange
    (136, 34, 85),  # wine
    (68, 170, 153),  # teal
    (153, 153, 51),  # olive
    (136, 204, 238),  # cyan
    (221, 204, 119),  # sand
    (170, 68, 153),  # purple
]


def class_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours for class indices 0..n-1; index 0 is (0, 0, 0)."""
    if n < 0:
        raise ValueError(f"class_colours: n must be >= 0, got {n}")
    out = np.zeros((n, 3), dtype=np.uint8)
    fixed = min(n, len(CLASS_COLOURS))
    out[:fixed] = np.asarray(CLASS_COLOURS[:fixed], dtype=np.uint8)
    extra = n - fixed
    for i in range(extra):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.9)
        out[fixed + i] = (round(r * 255), round(g * 255), round(b * 255))
    return out


def tint(thumbnail: np.ndarray, classes: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 3) float32: the class colours of `classes` (H, W; 0 untouched) blended at
    `alpha` over the thumbnail made grey where a class is drawn. Over the stain's own pink
    and purple a blend shifts the hue (sky blue turned lavender), so the tint would not match
    its legend swatch; over grey it keeps the class's hue and the tissue's texture."""
    n = int(classes.max()) + 1 if classes.size else 1
    colours = class_colours(max(n, 1)).astype(np.float32)
    out = thumbnail.astype(np.float32)
    fg = classes > 0
    grey = out[fg] @ np.asarray(_LUMA, np.float32)
    out[fg] = grey[:, None] * (1 - alpha) + colours[classes[fg]] * alpha
    return out


#: ITU-R 601 luma weights (the grey under a class tint).
_LUMA = (0.299, 0.587, 0.114)
