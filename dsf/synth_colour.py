"""Colour of the synthetic tissue (`dsf.synth_tissue`): Beer-Lambert mixing of a haematoxylin
and an eosin concentration on glass, looked up in a small table, with hashed dither as the pixel
noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dsf.synth_noise import S_NOISE, hash_keys, uniform

_BACKGROUND = (240.0, 238.0, 242.0)  # incident light: RGB of empty glass
_STAIN_H = (1.06, 1.10, 0.31)  # optical density per unit haematoxylin (purple-blue)
_STAIN_E = (0.045, 0.46, 0.24)  # optical density per unit eosin (pink)
_LUT_LEVELS = 128  # quantisation levels per stain in the colour table
_LUT_MAX_OD = 2.5  # stain concentration of the last level
BG_STAIN = 0.012  # faint stain on the glass so the background carries noise too
_NOISE_TILE = 256  # px; the dither tables repeat with this period


def noise_texture(seed: int, chunk: tuple[int, int]) -> np.ndarray:
    """Two tables of dither values in [0, 1) (float32) of period _NOISE_TILE, tiled far enough
    that any `chunk` (rows, cols) of consecutive pixels is a view of them."""
    i = np.arange(_NOISE_TILE)
    h = hash_keys(seed, S_NOISE, i[None, :], i[:, None])
    table = np.stack([uniform(h, 1), uniform(h, 2)]).astype(np.float32)
    reps = (1, 1 + math.ceil(chunk[0] / _NOISE_TILE), 1 + math.ceil(chunk[1] / _NOISE_TILE))
    return np.tile(table, reps)


def dither_values(noise: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Dither values (2, h, w) at the samples' level-0 px (a view when the step is 1 px)."""
    n = _NOISE_TILE
    kx = np.floor(xs).astype(np.int64) % n
    ky = np.floor(ys).astype(np.int64) % n
    unit = all(a.size < 2 or a[1] - a[0] == 1.0 for a in (xs, ys))
    if unit and ys.size <= noise.shape[1] - n and xs.size <= noise.shape[2] - n:
        return noise[:, ky[0] : ky[0] + ys.size, kx[0] : kx[0] + xs.size]
    return noise[:, ky[:, None], kx[None, :]]


def _colour_table() -> np.ndarray:
    """RGB (as 3-byte records) per quantised (haematoxylin, eosin) pair: Beer-Lambert on glass."""
    conc = np.arange(_LUT_LEVELS) * (_LUT_MAX_OD / (_LUT_LEVELS - 1))
    od = conc[:, None, None] * np.array(_STAIN_H) + conc[None, :, None] * np.array(_STAIN_E)
    rgb = np.round(np.array(_BACKGROUND) * np.exp(-od)).astype(np.uint8)
    return rgb.reshape(-1, 3).view("V3").ravel()


_LUT = _colour_table()


def shade(hema: Any, eosin: Any, dither: np.ndarray, out: np.ndarray) -> None:
    """Write RGB (uint8) of stain concentrations into `out`, dithered (the pixel noise)."""
    scale = np.float32((_LUT_LEVELS - 1) / _LUT_MAX_OD)
    top = _LUT_LEVELS - 1
    qh = np.minimum((hema * scale + dither[0]).astype(np.int32), top)
    qe = np.minimum((eosin * scale + dither[1]).astype(np.int32), top)
    qh *= _LUT_LEVELS
    qh += qe
    np.take(_LUT, qh, out=out.view("V3")[..., 0])
