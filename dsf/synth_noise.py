"""Counter-based randomness for the synthetic tissue (`dsf.synth_tissue`): values hashed from a
seed and integer keys (splitmix64), per-cell tables on square grids, and value noise, so any
sample is a pure function of the seed and its coordinates and regions rendered apart agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
# hash streams: one per kind of random quantity
S_LATTICE, S_SEED, S_CLASS, S_NUC, S_SNUC, S_NOISE = range(1, 7)


# -- hashing -------------------------------------------------------------------------------------
def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array."""
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def hash_keys(seed: int, *keys: Any) -> np.ndarray:
    """uint64 hash of a seed and integer keys (arrays broadcast together), no global state."""
    with np.errstate(over="ignore"):
        h = _mix(np.atleast_1d(np.asarray(seed % 2**64, dtype=_U64)) + _GOLDEN)
        for key in keys:
            k = np.atleast_1d(np.asarray(key, dtype=np.int64)).view(_U64)
            h = _mix((h + _GOLDEN) ^ k)
    return h


def uniform(h: np.ndarray, salt: int = 0) -> np.ndarray:
    """float64 in [0, 1) from a hash (salt picks independent draws from the same hash)."""
    if salt:
        with np.errstate(over="ignore"):
            h = _mix(h ^ _U64(salt * 0x2545F4914F6CDD1D % 2**64))
    return (h >> _U64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class Table:
    """Per-cell values on a square grid of `cell` um, for the cells from (x0, y0) on."""

    cell: float
    x0: int
    y0: int
    values: dict[str, np.ndarray]  # name -> float32 (rows, cols)


def _cell_range(lo: float, hi: float, cell: float, margin: int) -> np.ndarray:
    return np.arange(math.floor(lo / cell) - margin, math.floor(hi / cell) + margin + 1)


def cell_table(
    seed: int, stream: int, cell: float, box: tuple[float, ...], margin: int, fill: Any
) -> Table:
    """Hash the cells covering box (x0, x1, y0, y1 um) and derive their values with `fill`."""
    gx = _cell_range(box[0], box[1], cell, margin)
    gy = _cell_range(box[2], box[3], cell, margin)
    cx, cy = np.meshgrid(gx, gy)
    values = fill(hash_keys(seed, stream, cx, cy), cx, cy)
    return Table(cell, int(gx[0]), int(gy[0]), values)


@dataclass(frozen=True)
class Axis:
    """Samples of one axis against a Table: cell index into the table, offset from the centre."""

    index: np.ndarray
    local: np.ndarray  # float32 um


def axis_cells(coords: np.ndarray, table: Table, origin: int) -> Axis:
    k = np.floor(coords / table.cell).astype(np.int64)
    local = (coords - (k + 0.5) * table.cell).astype(np.float32)
    return Axis(k - origin, local)


def spread(table: Table, name: str, ax: Axis, ay: Axis) -> np.ndarray:
    """Per-pixel values of a per-cell table."""
    return table.values[name][ay.index][:, ax.index]


# -- value noise ---------------------------------------------------------------------------------
def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def add_octave(lattice: Table, xu: np.ndarray, yu: np.ndarray, out: np.ndarray) -> None:
    """Add one octave of value noise at points xu x yu (um) to `out` (float32, in place).

    Separable: each lattice row is interpolated along x once (small), then rows are blended.
    """
    ux, uy = xu / lattice.cell, yu / lattice.cell
    kx, ky = np.floor(ux), np.floor(uy)
    wx = smoothstep(ux - kx).astype(np.float32)
    wy = smoothstep(uy - ky).astype(np.float32)
    cx = kx.astype(np.int64) - lattice.x0
    cy = ky.astype(np.int64) - lattice.y0
    values = lattice.values["v"]
    top, bottom = int(cy[0]), int(cy[-1]) + 2
    left, right = values[top:bottom, cx], values[top:bottom, cx + 1]
    rows = left + wx * (right - left)  # (lattice rows, w)
    band = cy - top
    starts = np.flatnonzero(np.r_[True, band[1:] != band[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], band.size], strict=True):
        b = band[lo]
        out[lo:hi] += rows[b]
        out[lo:hi] += np.multiply.outer(wy[lo:hi], rows[b + 1] - rows[b])
