"""The synthetic tissue of `dsf synth`: H&E-like pixels and exact class labels as pure
functions of a seed and level-0 coordinates, so any region renders on its own and agrees with the
whole slide.

Content: tissue blobs (thresholded low-frequency value noise, kept off the border) on white glass;
inside tissue a Voronoi partition into regions of about `region_um`, each of one class (1 TUM,
2 STR, 3 LYM). Stroma is pink with wavy fibres and sparse elongated nuclei; TUM and LYM share one
local texture (light-purple cytoplasm, dense round nuclei) and differ only by architecture: TUM
regions carry a dark rim along their boundary. A 64 um field of view inside a region cannot tell
them apart, a 256 um one usually can. Colours follow Beer-Lambert mixing of a haematoxylin and an
eosin concentration, looked up in a small table with dithering as the pixel noise
(`dsf.synth_colour`); every random quantity is hashed from the seed and a cell's coordinates
(`dsf.synth_noise`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsf.synth_colour import BG_STAIN, dither_values, noise_texture, shade
from dsf.synth_noise import (
    S_CLASS,
    S_LATTICE,
    S_NUC,
    S_SEED,
    S_SNUC,
    Table,
    add_octave,
    axis_cells,
    cell_table,
    hash_keys,
    smoothstep,
    spread,
    uniform,
)

CLASS_NAMES = {1: "TUM", 2: "STR", 3: "LYM"}
TUM, STR, LYM = 1, 2, 3

# -- procedural constants (appearance, not settings) -------------------------------------------
# stain concentrations: epithelium (TUM and LYM alike), TUM rim, stroma
_H_EPI, _E_EPI, _H_NUC = 0.15, 0.9, 1.0
_H_RIM, _E_RIM = 0.55, 0.3
_H_STROMA, _E_STROMA, _E_FIBRE = 0.04, 0.55, 0.6
_NUC_CELL_UM = 10.0  # epithelial nucleus grid spacing
_NUC_R_UM = (2.6, 4.2)  # epithelial nucleus radius range
_NUC_PRESENT = 0.9  # fraction of cells holding an epithelial nucleus
_SNUC_CELL_UM = 20.0  # stroma nucleus grid spacing
_SNUC_AXES_UM = (6.0, 1.6)  # stroma nucleus largest half-length and half-width
_SNUC_PRESENT = 0.45
_FIBRE_UM = 7.0  # fibre spacing across the fibres
_WAVE_UM = 60.0  # wavelength of the fibres' waviness along them
_WAVE_AMP = 0.9  # waviness amplitude (fibre periods)
_FIBRE_MEAN = 1.0 / 3.0  # mean of the fibre profile (4 t^2 for t uniform in 0..0.5)
_JITTER = 0.3  # seeds lie within 0.5 +- J of their cell: the 3 x 3 search is then exact
_CLASS_RANDOM = 0.35  # fraction of regions whose class is drawn instead of patterned
_TISSUE_OCTAVES = (1.0, 0.5, 0.25, 0.125)
_TISSUE_GAIN = 1.0  # amplitude of the noise against the bump
_TISSUE_BUMP = 0.9  # height of the bump that keeps tissue off the border
_TISSUE_MARGIN = 0.12  # width of the bump's falloff, fraction of the slide size
_TISSUE_THRESHOLD = 0.75
_CHUNK = (128, 512)  # rows, cols rendered at a time (cache-sized temporaries)
_MAX_BLOCK_LOG2 = 3  # Voronoi blocks of at most 8 x 8 px
_MAX_CANDIDATES = 64  # seeds searched per chunk before falling back to per-point search
_FEW_CANDIDATES = 16  # up to this many, single pixels are searched among them too
_RIM_SLACK_UM = 0.05  # float32 rounding allowance when skipping deep bisectors


# -- slide-wide parameters ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Slide:
    """What every pixel depends on besides its coordinates (lengths in um)."""

    seed: int
    mpp: float
    region_um: float
    width_um: float
    height_um: float

    @property
    def blob_um(self) -> float:
        """Wavelength of the coarsest tissue-noise octave: several regions, under the slide."""
        return min(8.0 * self.region_um, 0.45 * min(self.width_um, self.height_um))

    @property
    def rim_um(self) -> float:
        return self.region_um / 12.0

    def field_slope(self) -> tuple[float, float]:
        """Upper bounds of |dF/dx| and |dF/dy| of the tissue field F (per um)."""
        noise = sum(
            3.0 * amp * _TISSUE_GAIN / sum(_TISSUE_OCTAVES) / (self.blob_um / 2.0**o)
            for o, amp in enumerate(_TISSUE_OCTAVES)
        )
        ramp = _TISSUE_BUMP * 1.5 / _TISSUE_MARGIN
        return noise + ramp / self.width_um, noise + ramp / self.height_um


# -- tissue --------------------------------------------------------------------------------------
def _lattice_values(amp: float) -> Callable[..., dict[str, np.ndarray]]:
    def fill(h: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> dict[str, np.ndarray]:
        return {"v": ((uniform(h) * 2.0 - 1.0) * amp).astype(np.float32)}

    return fill


def _lattices(sl: _Slide, box: tuple[float, ...]) -> list[Table]:
    """Value-noise lattices of the tissue field, one per octave (amplitude folded in)."""
    norm = _TISSUE_GAIN / sum(_TISSUE_OCTAVES)
    return [
        cell_table(
            sl.seed, S_LATTICE + 100 * o, sl.blob_um / 2.0**o, box, 2,
            _lattice_values(amp * norm),
        )
        for o, amp in enumerate(_TISSUE_OCTAVES)
    ]  # fmt: skip


def _falloff(u: np.ndarray) -> np.ndarray:
    """1 inside, falling smoothly to 0 within the margin at both ends of [0, 1]."""
    return smoothstep(u / _TISSUE_MARGIN) * smoothstep((1.0 - u) / _TISSUE_MARGIN)


def _tissue_field(ctx: _Context, xu: np.ndarray, yu: np.ndarray) -> np.ndarray:
    """The tissue field (float32, rows yu x cols xu): a bump off the border plus value noise."""
    sl = ctx.slide
    gx = (_falloff(xu / sl.width_um) * _TISSUE_BUMP).astype(np.float32)
    gy = _falloff(yu / sl.height_um).astype(np.float32)
    field = np.multiply.outer(gy, gx)
    for lattice in ctx.lattices:
        add_octave(lattice, xu, yu, field)
    return field


@dataclass(frozen=True)
class _CoarseField:
    """The tissue field on a coarse grid over a render call, to skip uniform chunks."""

    x0: float
    y0: float
    step: float  # um
    values: np.ndarray


def _coarse_field(ctx: _Context, box: tuple[float, ...], step: float) -> _CoarseField:
    nx = math.ceil((box[1] - box[0]) / step) + 2
    ny = math.ceil((box[3] - box[2]) / step) + 2
    xs = box[0] + step * np.arange(nx)
    ys = box[2] + step * np.arange(ny)
    return _CoarseField(box[0], box[2], step, _tissue_field(ctx, xs, ys))


def _tissue(
    ctx: _Context, xu: np.ndarray, yu: np.ndarray, fp_um: float
) -> tuple[np.ndarray | float, np.ndarray | bool]:
    """Tissue coverage (0..1, anti-aliased over fp_um) and the tissue mask at the points.

    A chunk whose coarse field samples clear the threshold by more than the field can change
    between them is uniform: both then come back as scalars, equal to the per-pixel values, so
    the result never depends on how the slide is cut into chunks.
    """
    sl, coarse = ctx.slide, ctx.coarse
    slope = np.float32(sl.blob_um / max(fp_um, sl.mpp))  # about one sample across the edge
    i0 = max(math.floor((yu[0] - coarse.y0) / coarse.step), 0)
    i1 = math.ceil((yu[-1] - coarse.y0) / coarse.step) + 1
    j0 = max(math.floor((xu[0] - coarse.x0) / coarse.step), 0)
    j1 = math.ceil((xu[-1] - coarse.x0) / coarse.step) + 1
    near = coarse.values[i0:i1, j0:j1]
    slope_x, slope_y = sl.field_slope()
    bound = (slope_x + slope_y) * coarse.step / 2.0 + 0.5 / float(slope) + 1e-4
    if near.min() - bound >= _TISSUE_THRESHOLD:
        return 1.0, True
    if near.max() + bound <= _TISSUE_THRESHOLD:
        return 0.0, False
    field = _tissue_field(ctx, xu, yu)
    cover = (field - np.float32(_TISSUE_THRESHOLD)) * slope + np.float32(0.5)
    return np.clip(cover, 0.0, 1.0, out=cover), field > np.float32(_TISSUE_THRESHOLD)


# -- Voronoi regions -----------------------------------------------------------------------------
# rows of the per-region attribute table
_REGION_ATTRS = (
    "hk",
    "h0",
    "hrim",
    "hs0",
    "e0",
    "erim",
    "efib",
    "es0",
    "cos",
    "sin",
    "wx",
    "wy",
    "fx",
    "fy",
)


def _region_values(sl: _Slide) -> Callable[..., dict[str, np.ndarray]]:
    """Seed position, class, stain strengths (TUM and LYM drawn alike) and fibre geometry."""
    offset = int(hash_keys(sl.seed, S_CLASS)[0] % np.uint64(3))

    def fill(h: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> dict[str, np.ndarray]:
        g = sl.region_um
        # a Latin pattern keeps neighbours apart and every class nearby; some drawn at random
        cls = (cx + 2 * cy + offset) % 3
        drawn = uniform(h, 3) < _CLASS_RANDOM
        cls = np.where(drawn, (uniform(h, 4) * 3).astype(np.int64), cls) + 1
        hk = 0.9 + 0.2 * uniform(h, 6)
        ek = 0.9 + 0.2 * uniform(h, 7)
        theta = uniform(h, 5) * np.pi
        cos, sin = np.cos(theta), np.sin(theta)
        rows = [
            _H_NUC * hk, _H_EPI * hk, _H_RIM * hk, _H_STROMA * hk,
            _E_EPI * ek, _E_RIM * ek, _E_FIBRE * ek, _E_STROMA * ek,
            cos, sin, cos / _WAVE_UM, sin / _WAVE_UM, -sin / _FIBRE_UM, cos / _FIBRE_UM,
        ]  # fmt: skip
        return {
            "sx": ((cx + 0.5 + _JITTER * (2.0 * uniform(h, 1) - 1.0)) * g).ravel(),
            "sy": ((cy + 0.5 + _JITTER * (2.0 * uniform(h, 2) - 1.0)) * g).ravel(),
            "cls": cls.ravel().astype(np.uint8),
            "attrs": np.stack([r.ravel() for r in rows]).astype(np.float32),
            "nx": np.array(cx.shape[1]),
        }

    return fill


def _nearest(ctx: _Context, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Voronoi region (int32 index into the region table) of points (um).

    Seeds lie in the middle of their grid cell (_JITTER), so the 3 x 3 cells around a point hold
    its nearest seed.
    """
    reg = ctx.regions
    g, nx = reg.cell, int(reg.values["nx"])
    cx = np.floor(px / g).astype(np.int64) - reg.x0
    cy = np.floor(py / g).astype(np.int64) - reg.y0
    offsets = np.array([oy * nx + ox for oy in (-1, 0, 1) for ox in (-1, 0, 1)])
    cand = (cy * nx + cx)[None, :] + offsets[:, None]  # (9, n)
    d2 = (px - reg.values["sx"][cand]) ** 2 + (py - reg.values["sy"][cand]) ** 2
    return np.take_along_axis(cand, d2.argmin(axis=0)[None], axis=0)[0].astype(np.int32)


@dataclass(frozen=True)
class _Candidates:
    """The seeds that can be nearest to a chunk's samples, with their separable distances:
    squared x distance per (seed, column) and y distance per (seed, row)."""

    seeds: np.ndarray
    dx2: np.ndarray
    dy2: np.ndarray


def _candidates(ctx: _Context, xu: np.ndarray, yu: np.ndarray) -> _Candidates | None:
    """Seeds of the 3 x 3 cells around every grid cell the chunk touches (None when too many
    for the separable search to pay off). Squared distances are computed as in `_nearest`, so
    both find the same nearest seed."""
    reg = ctx.regions
    g, nx = reg.cell, int(reg.values["nx"])
    cols = np.arange(math.floor(xu[0] / g) - 1, math.floor(xu[-1] / g) + 2) - reg.x0
    rows = np.arange(math.floor(yu[0] / g) - 1, math.floor(yu[-1] / g) + 2) - reg.y0
    if cols.size * rows.size > _MAX_CANDIDATES:
        return None
    seeds = (rows[:, None] * nx + cols[None, :]).ravel()
    dx2 = (xu[None, :] - reg.values["sx"][seeds][:, None]) ** 2
    dy2 = (yu[None, :] - reg.values["sy"][seeds][:, None]) ** 2
    return _Candidates(seeds, dx2, dy2)


def _nearest_grid(cand: _Candidates, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Nearest region (int32) at the grid of sample rows x cols of the chunk."""
    d2 = cand.dy2[:, rows, None] + cand.dx2[:, None, cols]
    return cand.seeds[d2.argmin(axis=0)].astype(np.int32)


def _nearest_at(cand: _Candidates, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Nearest region (int32) at the samples (ii, jj) of the chunk."""
    d2 = cand.dy2[:, ii] + cand.dx2[:, jj]
    return cand.seeds[d2.argmin(axis=0)].astype(np.int32)


def _neighbour_planes(values: dict[str, np.ndarray]) -> np.ndarray:
    """Per region, its bisectors with the seeds of the 8 neighbouring grid cells as planes:
    distance from p to bisector k = c_k - nx_k * px - ny_k * py (positive inside the region).
    Shape (3, 8, regions), float64; regions on the table's edge get no neighbours (inf)."""
    sx, sy, nx = values["sx"], values["sy"], int(values["nx"])
    n = sx.size
    planes = np.full((3, 8, n), np.inf)
    planes[1:] = 0.0
    own = np.arange(n)
    col, row = own % nx, own // nx
    inner = (col > 0) & (col < nx - 1) & (row > 0) & (row < n // nx - 1)
    ring = [(oy, ox) for oy in (-1, 0, 1) for ox in (-1, 0, 1) if oy or ox]
    for k, (oy, ox) in enumerate(ring):
        i = own[inner]
        j = i + oy * nx + ox
        dx, dy = sx[j] - sx[i], sy[j] - sy[i]
        sep = np.hypot(dx, dy)
        planes[0, k, i] = (sx[j] ** 2 + sy[j] ** 2 - sx[i] ** 2 - sy[i] ** 2) / (2.0 * sep)
        planes[1, k, i] = dx / sep
        planes[2, k, i] = dy / sep
    return planes


def _rim(
    ctx: _Context,
    region: np.ndarray,
    present: np.ndarray,
    xu: np.ndarray,
    yu: np.ndarray,
    fp_um: float,
) -> np.ndarray | None:
    """Coverage (float32) of the dark rim along the inside of TUM region boundaries, None when
    the chunk has none.

    The rim depth of a pixel is its smallest distance to the bisectors with its region's eight
    neighbours: affine in x and y, so a bisector that stays deeper than the rim at the chunk's
    corners stays so inside, and is skipped (its pixels' coverage would be 0 either way).
    """
    cls, planes = ctx.regions.values["cls"], ctx.regions.values["planes"]
    rim_um = ctx.slide.rim_um
    corner_x, corner_y = xu[[0, -1, 0, -1]], yu[[0, 0, -1, -1]]
    x, y = xu.astype(np.float32), yu.astype(np.float32)
    rims = None
    for r in present[cls[present] == TUM]:
        c, nx, ny = planes[:, :, r]
        at_corners = c[:, None] - nx[:, None] * corner_x - ny[:, None] * corner_y
        near = np.flatnonzero(at_corners.min(axis=1) < rim_um + fp_um + _RIM_SLACK_UM)
        if not near.size:
            continue
        mine = region == r
        rows = np.flatnonzero(mine.any(axis=1))
        cols = np.flatnonzero(mine.any(axis=0))
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        depth = None
        for k in near:
            across = np.float32(c[k]) - np.float32(nx[k]) * x[box[1]]
            d = across[None, :] - (np.float32(ny[k]) * y[box[0]])[:, None]
            depth = d if depth is None else np.minimum(depth, d, out=depth)
        cover = (np.float32(rim_um) - depth) * np.float32(1.0 / fp_um) + np.float32(0.5)
        np.clip(cover, 0.0, 1.0, out=cover)
        if rims is None:
            rims = np.zeros(region.shape, np.float32)
        rims[box] = np.where(mine[box], cover, rims[box])
    return rims


def _block_size(sl: _Slide, spacing_um: float) -> int:
    """Voronoi block edge (px, a power of two): small against a region."""
    edge = sl.region_um / (8.0 * spacing_um)
    return 1 << int(np.clip(math.floor(math.log2(max(edge, 1.0))), 1, _MAX_BLOCK_LOG2))


@dataclass
class _RegionMap:
    region: np.ndarray  # int32 region index per pixel
    rim: np.ndarray | None  # float32 TUM rim coverage, None when the chunk has none
    present: np.ndarray  # region indices in the chunk


def _block_pixels(mask: np.ndarray, b: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the pixels of the flagged blocks."""
    bi, bj = np.nonzero(mask)
    ii, jj = np.broadcast_arrays(
        bi[:, None, None] * b + np.arange(b)[None, :, None],
        bj[:, None, None] * b + np.arange(b)[None, None, :],
    )
    keep = (ii < h) & (jj < w)
    return ii[keep], jj[keep]


def _region_map(
    ctx: _Context, xu: np.ndarray, yu: np.ndarray, fp_um: float, rim: bool
) -> _RegionMap:
    """Region index per pixel, the TUM rim coverage and the regions present.

    Voronoi regions are convex, so a block whose corner samples share a region is uniform; only
    the other blocks are solved pixel by pixel, with the same result.
    """
    h, w = yu.size, xu.size
    b = _block_size(ctx.slide, (xu[1] - xu[0]) if w > 1 else ctx.slide.region_um)
    nby, nbx = -(-h // b), -(-w // b)
    rc = np.minimum(np.arange(nby + 1) * b, h - 1)
    cc = np.minimum(np.arange(nbx + 1) * b, w - 1)
    cand = _candidates(ctx, xu, yu)
    if cand is not None:
        idx = _nearest_grid(cand, rc, cc)
    else:
        px, py = np.meshgrid(xu[cc], yu[rc])
        idx = _nearest(ctx, px.ravel(), py.ravel()).reshape(nby + 1, nbx + 1)
    block = idx[:-1, :-1]
    mixed = (block != idx[1:, :-1]) | (block != idx[:-1, 1:]) | (block != idx[1:, 1:])
    region = np.repeat(np.repeat(block, b, axis=0)[:h], b, axis=1)[:, :w]
    ii, jj = _block_pixels(mixed, b, h, w)
    solved = np.empty(0, np.int32)
    if ii.size:
        few = cand is not None and cand.seeds.size <= _FEW_CANDIDATES
        solved = _nearest_at(cand, ii, jj) if few else _nearest(ctx, xu[jj], yu[ii])
        region[ii, jj] = solved
    present = np.flatnonzero(np.bincount(np.r_[block[~mixed], solved]))
    rims = _rim(ctx, region, present, xu, yu, fp_um) if rim else None
    return _RegionMap(region, rims, present)


# -- texture -------------------------------------------------------------------------------------
def _fade(fp_um: float, size_um: float) -> float:
    """How far a feature of `size_um` is averaged out at a sample footprint of fp_um (0..1)."""
    return float(np.clip((fp_um / size_um - 0.25) / 0.75, 0.0, 1.0))


def _faded(cov: np.ndarray, fade: float, mean: float) -> np.ndarray:
    if fade <= 0.0:
        return cov
    return cov * np.float32(1.0 - fade) + np.float32(fade * mean)


def _nucleus_values(h: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> dict[str, np.ndarray]:
    """Round epithelial nuclei: centre offset and radius, each fully inside its cell."""
    half = _NUC_CELL_UM / 2.0
    lo, hi = _NUC_R_UM
    r = lo + (hi - lo) * uniform(h, 1)
    r = np.where(uniform(h, 2) < _NUC_PRESENT, r, -10.0)
    room = np.maximum(half - np.abs(r) - 0.2, 0.0)
    return {
        "ox": ((2.0 * uniform(h, 3) - 1.0) * room).astype(np.float32),
        "oy": ((2.0 * uniform(h, 4) - 1.0) * room).astype(np.float32),
        "r": r.astype(np.float32),
        "dark": (0.75 + 0.5 * uniform(h, 5)).astype(np.float32),
    }


def _stroma_nucleus_values(h: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> dict[str, np.ndarray]:
    """Sparse elongated stroma nuclei: centre offset and inverse half-length, inside the cell."""
    half = _SNUC_CELL_UM / 2.0
    a = _SNUC_AXES_UM[0] * (0.6 + 0.4 * uniform(h, 1))
    room = half - a - 0.2
    return {
        "ox": ((2.0 * uniform(h, 3) - 1.0) * room).astype(np.float32),
        "oy": ((2.0 * uniform(h, 4) - 1.0) * room).astype(np.float32),
        "inv_a": np.where(uniform(h, 2) < _SNUC_PRESENT, 1.0 / a, 1e3).astype(np.float32),
    }


def _epithelial_nuclei(ctx: _Context, xu: np.ndarray, yu: np.ndarray, fp_um: float) -> Any:
    """Coverage (0..1, float32) of dense round nuclei, at most one per cell and inside it."""
    lo, hi = _NUC_R_UM
    fade = _fade(fp_um, 2.0 * hi)
    mean = _NUC_PRESENT * np.pi * (lo * lo + lo * hi + hi * hi) / 3.0 / _NUC_CELL_UM**2
    if fade >= 1.0:
        return np.float32(mean)
    t = ctx.nuclei
    ax, ay = axis_cells(xu, t, t.x0), axis_cells(yu, t, t.y0)
    dx = ax.local[None, :] - spread(t, "ox", ax, ay)
    dy = ay.local[:, None] - spread(t, "oy", ax, ay)
    dx *= dx
    dy *= dy
    dx += dy
    d = np.sqrt(dx, out=dx)
    cov = spread(t, "r", ax, ay) - d
    cov *= np.float32(1.0 / fp_um)
    cov += np.float32(0.5)
    np.clip(cov, 0.0, 1.0, out=cov)
    cov *= spread(t, "dark", ax, ay)
    return _faded(cov, fade, mean)


def _stroma_nuclei(
    ctx: _Context, xu: np.ndarray, yu: np.ndarray, fp_um: float, cos: Any, sin: Any
) -> Any:
    """Coverage of sparse elongated nuclei along the fibres (cos, sin), inside their cell."""
    along, across = _SNUC_AXES_UM
    fade = _fade(fp_um, 2.0 * across)
    mean = _SNUC_PRESENT * np.pi * 0.8 * along * across / _SNUC_CELL_UM**2
    if fade >= 1.0:
        return np.float32(mean)
    t = ctx.stroma_nuclei
    ax, ay = axis_cells(xu, t, t.x0), axis_cells(yu, t, t.y0)
    dx = ax.local[None, :] - spread(t, "ox", ax, ay)
    dy = ay.local[:, None] - spread(t, "oy", ax, ay)
    u = (dx * cos + dy * sin) * spread(t, "inv_a", ax, ay)
    v = (dy * cos - dx * sin) * np.float32(1.0 / across)
    u *= u
    v *= v
    u += v
    e = np.sqrt(u, out=u)
    cov = (np.float32(1.0) - e) * np.float32(across / fp_um) + np.float32(0.5)
    return _faded(np.clip(cov, 0.0, 1.0, out=cov), fade, mean)


def _planar(xu: np.ndarray, yu: np.ndarray, cx: Any, cy: Any) -> np.ndarray:
    """x * cx + y * cy on the grid, with per-pixel or scalar coefficients (same rounding)."""
    x, y = xu.astype(np.float32), yu.astype(np.float32)
    if np.ndim(cx) == 0:
        return np.add.outer(y * cy, x * cx)
    return x[None, :] * cx + y[:, None] * cy


def _fibres(xu: np.ndarray, yu: np.ndarray, fp_um: float, attr: Callable[[str], Any]) -> Any:
    """Wavy fibre streaks (0..1) along each stroma region's direction."""
    fade = _fade(fp_um, _FIBRE_UM)
    if fade >= 1.0:
        return np.float32(_FIBRE_MEAN)
    wave = _planar(xu, yu, attr("wx"), attr("wy"))
    wave -= np.floor(wave)
    wave -= np.float32(0.5)
    w = np.abs(wave, out=wave)  # 0..0.5, smoothed to a sine-like bend
    w = w * w * (np.float32(3.0 * 4.0 * _WAVE_AMP) - np.float32(4.0 * 4.0 * _WAVE_AMP) * w)
    t = _planar(xu, yu, attr("fx"), attr("fy"))
    t += w
    t -= np.floor(t)
    t -= np.float32(0.5)
    f = np.abs(t, out=t)
    f *= f
    f *= np.float32(4.0)
    return _faded(f, fade, _FIBRE_MEAN)


def _attr_getter(ctx: _Context, rm: _RegionMap, kind: np.ndarray) -> Callable[[str], Any]:
    """Region attributes for the pixels of one kind: a scalar when one such region is present
    (the values at other pixels do not matter), else gathered per pixel."""
    values = ctx.regions.values["attrs"]
    regions = rm.present[kind]

    def attr(name: str) -> Any:
        row = values[_REGION_ATTRS.index(name)]
        if regions.size == 1:
            return row[regions[0]]
        return np.take(row, rm.region)

    return attr


def _stains(ctx: _Context, rm: _RegionMap, xu: np.ndarray, yu: np.ndarray, fp_um: float) -> Any:
    """Haematoxylin and eosin concentrations of tissue (before the tissue cover).

    TUM/LYM and STR textures are only computed where the chunk holds such regions; a pixel's
    value never depends on which other regions share its chunk.
    """
    cls = ctx.regions.values["cls"]
    stroma_present = cls[rm.present] == STR
    hema = eosin = None
    if not stroma_present.all():
        attr = _attr_getter(ctx, rm, ~stroma_present)
        hema = _epithelial_nuclei(ctx, xu, yu, fp_um) * attr("hk") + attr("h0")
        eosin = attr("e0")
        if rm.rim is not None:
            hema = hema + rm.rim * attr("hrim")
            eosin = eosin + rm.rim * attr("erim")
    if stroma_present.any():
        attr = _attr_getter(ctx, rm, stroma_present)
        nuc = _stroma_nuclei(ctx, xu, yu, fp_um, attr("cos"), attr("sin"))
        hema_s = nuc * attr("hk") + attr("hs0")
        eosin_s = _fibres(xu, yu, fp_um, attr) * attr("efib") + attr("es0")
        if hema is None:
            return hema_s, eosin_s
        stroma = np.take(cls, rm.region) == STR
        hema = np.where(stroma, hema_s, hema)
        eosin = np.where(stroma, eosin_s, eosin)
    return hema, eosin


# -- rendering -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Context:
    """Everything a render call derives from the seed once: hashed tables over its extent."""

    slide: _Slide
    lattices: list[Table]
    regions: Table
    nuclei: Table
    stroma_nuclei: Table
    noise: np.ndarray
    coarse: _CoarseField | None = None


def _context(sl: _Slide, box: tuple[float, ...], spacing_um: float) -> _Context:
    """Tables for samples spaced spacing_um inside box (x0, x1, y0, y1 um)."""
    step = 16.0 * max(spacing_um, sl.mpp)
    pad = 3.0 * step
    box = (box[0] - pad, box[1] + pad, box[2] - pad, box[3] + pad)
    ctx = _Context(
        sl,
        _lattices(sl, box),
        _with_planes(cell_table(sl.seed, S_SEED, sl.region_um, box, 3, _region_values(sl))),
        cell_table(sl.seed, S_NUC, _NUC_CELL_UM, box, 1, _nucleus_values),
        cell_table(sl.seed, S_SNUC, _SNUC_CELL_UM, box, 1, _stroma_nucleus_values),
        noise_texture(sl.seed, _CHUNK),
    )
    inner = (box[0] + pad, box[1] - pad, box[2] + pad, box[3] - pad)
    return dataclasses.replace(ctx, coarse=_coarse_field(ctx, inner, step))


def _with_planes(table: Table) -> Table:
    table.values["planes"] = _neighbour_planes(table.values)
    return table


def _labels(ctx: _Context, rm: _RegionMap, inside: np.ndarray | bool) -> np.ndarray:
    cls = ctx.regions.values["cls"]
    if inside is True and rm.present.size == 1:
        return np.full(rm.region.shape, cls[rm.present[0]], np.uint8)
    return np.where(inside, np.take(cls, rm.region), np.uint8(0))


def _label_chunk(ctx: _Context, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Class labels at points xs x ys (level-0 px): the class inside tissue, 0 outside."""
    mpp = ctx.slide.mpp
    xu, yu = xs * mpp, ys * mpp
    _, inside = _tissue(ctx, xu, yu, mpp)
    if inside is False:
        return np.zeros((ys.size, xs.size), np.uint8)
    return _labels(ctx, _region_map(ctx, xu, yu, mpp, rim=False), inside)


def _rgb_chunk(
    ctx: _Context, xs: np.ndarray, ys: np.ndarray, fp_px: float, out: np.ndarray
) -> np.ndarray:
    """Write RGB at points xs x ys (level-0 px, sample footprint fp_px) into `out`; return the
    labels there."""
    mpp = ctx.slide.mpp
    fp_um = fp_px * mpp
    xu, yu = xs * mpp, ys * mpp
    dither = dither_values(ctx.noise, xs, ys)
    cover, inside = _tissue(ctx, xu, yu, fp_um)
    if inside is False:
        glass = np.float32(BG_STAIN)
        shade(glass, glass, dither, out)
        return np.zeros((ys.size, xs.size), np.uint8)
    rm = _region_map(ctx, xu, yu, fp_um, rim=True)
    hema, eosin = _stains(ctx, rm, xu, yu, fp_um)
    if inside is not True:
        hema = hema * cover
        eosin = eosin * cover
    shade(hema + np.float32(BG_STAIN), eosin + np.float32(BG_STAIN), dither, out)
    return _labels(ctx, rm, inside)


def _chunks(height: int, width: int) -> Iterator[tuple[slice, slice]]:
    ch, cw = _CHUNK
    for r in range(0, height, ch):
        for c in range(0, width, cw):
            yield slice(r, min(r + ch, height)), slice(c, min(c + cw, width))


def _axis(start: float, n: int, downsample: float, sub: float = 0.5) -> np.ndarray:
    """Level-0 coordinates of the samples along one axis."""
    return start + (np.arange(n, dtype=np.float64) + sub) * downsample


def _supersampling(downsample: float) -> int:
    """Samples per axis of one output pixel: 1 at full resolution, else 2 (with the texture
    filtered to the samples' footprint this is within about 1 grey level of an area average)."""
    return 1 if downsample <= 1.0 else 2


def _render_context(
    seed: int,
    x0: float,
    y0: float,
    width: int,
    height: int,
    mpp: float,
    downsample: float,
    region_um: float | None,
    slide_width: int,
    slide_height: int,
) -> _Context:
    """The tables of one render call (region_um defaults to the schema's synth.region_um)."""
    if region_um is None:
        from dsf.config import defaults

        region_um = float(defaults("synth")["region_um"])
    sl = _Slide(int(seed), float(mpp), float(region_um), slide_width * mpp, slide_height * mpp)
    box = (x0 * mpp, (x0 + width * downsample) * mpp, y0 * mpp, (y0 + height * downsample) * mpp)
    return _context(sl, box, downsample * mpp)


def _averaged_chunk(
    ctx: _Context, xstart: float, ystart: float, w: int, h: int, downsample: float
) -> np.ndarray:
    """RGB of a chunk of reduced pixels: the mean of sub x sub sample grids."""
    sub = _supersampling(downsample)
    acc = np.zeros((h, w, 3), np.float32)
    part = np.empty((h, w, 3), np.uint8)
    for oy in (np.arange(sub) + 0.5) / sub:
        for ox in (np.arange(sub) + 0.5) / sub:
            xs = _axis(xstart, w, downsample, ox)
            ys = _axis(ystart, h, downsample, oy)
            _rgb_chunk(ctx, xs, ys, downsample / sub, part)
            acc += part
    return np.round(acc * np.float32(1.0 / (sub * sub))).astype(np.uint8)


def render_region(
    seed: int,
    x0: float,
    y0: float,
    width: int,
    height: int,
    mpp: float,
    downsample: float = 1.0,
    region_um: float | None = None,
    *,
    slide_width: int,
    slide_height: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Render RGB (uint8, (h, w, 3)) and labels (uint8, (h, w)) of a region of a synthetic slide.

    Output pixel (i, j) samples the level-0 point (x0 + (j + 0.5) * ds, y0 + (i + 0.5) * ds) of a
    slide of slide_width x slide_height level-0 px at `mpp` um/px. A pure function of the seed
    and the coordinates: pieces rendered apart agree exactly with the whole. At downsample > 1 a
    pixel averages 2 x 2 samples whose fine texture is filtered to their footprint, like a
    downsampled scan; labels are taken at pixel centres. `region_um` defaults to the schema's
    synth.region_um.
    """
    ctx = _render_context(seed, x0, y0, width, height, mpp, downsample, region_um, slide_width,
                          slide_height)  # fmt: skip
    rgb = np.empty((height, width, 3), np.uint8)
    labels = np.empty((height, width), np.uint8)
    for rows, cols in _chunks(height, width):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        ystart, xstart = y0 + rows.start * downsample, x0 + cols.start * downsample
        xs, ys = _axis(xstart, w, downsample), _axis(ystart, h, downsample)
        if _supersampling(downsample) == 1:
            labels[rows, cols] = _rgb_chunk(ctx, xs, ys, downsample, rgb[rows, cols])
        else:
            labels[rows, cols] = _label_chunk(ctx, xs, ys)
            rgb[rows, cols] = _averaged_chunk(ctx, xstart, ystart, w, h, downsample)
    return rgb, labels


def render_labels(
    seed: int,
    x0: float,
    y0: float,
    width: int,
    height: int,
    mpp: float,
    downsample: float = 1.0,
    region_um: float | None = None,
    *,
    slide_width: int,
    slide_height: int,
) -> np.ndarray:
    """The labels of `render_region` alone (uint8 (h, w), at pixel centres), several times
    cheaper: for label masks and ground truth at any downsample."""
    ctx = _render_context(seed, x0, y0, width, height, mpp, downsample, region_um, slide_width,
                          slide_height)  # fmt: skip
    labels = np.empty((height, width), np.uint8)
    for rows, cols in _chunks(height, width):
        xs = _axis(x0 + cols.start * downsample, cols.stop - cols.start, downsample)
        ys = _axis(y0 + rows.start * downsample, rows.stop - rows.start, downsample)
        labels[rows, cols] = _label_chunk(ctx, xs, ys)
    return labels


def _region_raster(
    seed: int,
    x0: float,
    y0: float,
    width: int,
    height: int,
    mpp: float,
    region_um: float,
    *,
    slide_width: int,
    slide_height: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi region ids (int32, only comparable within one call) and TUM rim coverage at
    level 0, for tests and debugging."""
    sl = _Slide(int(seed), float(mpp), float(region_um), slide_width * mpp, slide_height * mpp)
    ctx = _context(sl, (x0 * mpp, (x0 + width) * mpp, y0 * mpp, (y0 + height) * mpp), mpp)
    region = np.empty((height, width), np.int32)
    rim = np.zeros((height, width), np.float32)
    for rows, cols in _chunks(height, width):
        xs = _axis(x0 + cols.start, cols.stop - cols.start, 1.0)
        ys = _axis(y0 + rows.start, rows.stop - rows.start, 1.0)
        rm = _region_map(ctx, xs * mpp, ys * mpp, mpp, rim=True)
        region[rows, cols] = rm.region
        if rm.rim is not None:
            rim[rows, cols] = rm.rim
    return region, rim
