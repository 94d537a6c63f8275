"""Tissue masks on a low-magnification thumbnail (DESIGN sections 3, 4 and 7).

`dsf tissue` reads the whole slide at the thumbnail resolution `tissue.mpp`, finds tissue with
the paper's RGB rule (tissue where R, G, B <= 235, 210, 235) or CLAM-style Otsu on HSV saturation,
cleans the mask up with sizes given in square microns, and optionally rejects pen ink. It writes:

- `{slide}.tiff`: the mask, uint8 0/255, deflate, with resolution tags stating its mpp;
- `{slide}.jpg`: an overlay (tissue outline in green, background dimmed, ink in orange)
  above a caption: slide, tissue share and area, method, colour keys and a scale bar;
- `{slide}.json`: statistics, thresholds and settings, so a run can be audited.

A slide without tissue is an error naming the slide (`TissueError`), never an empty mask.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsf import __version__
from dsf.atomic import atomic_path, check_outputs, remove
from dsf.captions import add_legend, picture_format, save_picture
from dsf.config import add_section_arguments, section_from_args
from dsf.errors import ConfigError, SlideError, TissueError
from dsf.runner import run, setup_logging
from dsf.slide import Slide, add_tolerance_argument, open_slide

log = logging.getLogger(__name__)

#: Gaussian smoothing (sigma, px) of saturation before Otsu, against stain and JPEG noise
#: (CLAM uses a 7 px median; a Gaussian is ten times faster on large thumbnails).
SMOOTH_SIGMA_PX = 1.0
#: Pen ink rules in HSV (hue in degrees, saturation and value in 0..1), tuned on histolab's pen
#: tiles. Strong ink seeds an ink region; weaker, ink-coloured pixels connected to a seed (the
#: blurred fringe of a stroke, its dark core) join it. H&E eosin (hue ~300-350, saturation below
#: 0.6) and haematoxylin (hue ~260-330) do not seed, so stained tissue stays tissue.
COOL_INK_HUE = (70.0, 250.0)  # green, teal and blue ink
COOL_INK_SAT = (0.2, 0.1)  # (seed, fringe) minimum saturation
RED_INK_HUE = ((345.0, 20.0), (340.0, 20.0))  # (seed, fringe), wrapping through 0
RED_INK_SAT = (0.6, 0.2)
RED_INK_MIN_VALUE = 0.45  # seed only: darker saturated red is the eosin-rich rim of a section
DARK_INK_HUE = (315.0, 20.0)  # dark red/maroon/black ink core: fringe only
DARK_INK_MAX_VALUE = 0.5
DARK_INK_MIN_SAT = 0.3
#: Pixels whose brightest channel is at or below this are no tissue for either method: black
#: scanner borders, no-data fill and marker cores (no stain is this dark on a low-magnification
#: thumbnail, and dark specks inside tissue come back as filled holes).
NO_DATA_MAX = 40
#: Beside no-data, a pixel less saturated than this (HSV) is a black and glass mix, not tissue.
NO_DATA_EDGE_SATURATION = 0.1
#: Otsu's split is within tissue, not tissue against glass, when more than this share of the
#: pixels it calls background are tissue by the paper's RGB rule (a slide with no glass in
#: view): the RGB rule is used instead.
OTSU_TISSUE_BACKGROUND = 0.5
#: The overlay is rendered at least this many pixels on its long side (finer read, if possible).
OVERLAY_MIN_SIDE = 1024
OVERLAY_OUTLINE = (0, 255, 0)
OVERLAY_INK = (255, 150, 0)  # orange: unlike H&E, green ink and the outline
OVERLAY_DIM = 0.55  # background kept at this brightness, blended toward a blue-grey
OVERLAY_TINT = (40, 50, 90)
OVERLAY_QUALITY = 90


# -- detection ------------------------------------------------------------------------------
def rgb_rule(rgb: np.ndarray, rgb_max: list[int]) -> np.ndarray:
    """The paper's rule: tissue where every channel is at or below its bound."""
    return np.all(rgb[..., :3] <= np.asarray(rgb_max, dtype=rgb.dtype), axis=-1)


def has_data(rgb: np.ndarray) -> np.ndarray:
    """Where a scan has data: black no-data fill (every channel at most NO_DATA_MAX) passes
    the RGB rule's upper bounds but is never tissue."""
    return rgb[..., :3].max(axis=-1) > NO_DATA_MAX


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees, 0..360), saturation and value (0..1) of RGB uint8, as float32.

    Same values as `skimage.color.rgb2hsv` (hue x 360), about five times faster.
    """
    x = rgb[..., :3].astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    val = x.max(axis=-1)
    delta = val - x.min(axis=-1)
    sat = np.divide(delta, val, out=np.zeros_like(val), where=val > 0)
    d = np.where(delta > 0, delta, 1.0)
    hue = np.where(val == r, (g - b) / d, np.where(val == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    hue = np.where(delta > 0, (hue * 60.0) % 360.0, 0.0).astype(np.float32)
    return hue, sat, val


def _otsu_rule(sat: np.ndarray, min_saturation: float) -> tuple[np.ndarray, dict[str, float]]:
    """CLAM-style: Otsu threshold of smoothed HSV saturation, floored at `min_saturation`.

    The floor keeps a blank slide from being split along its noise.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu

    smooth = gaussian_filter(sat, SMOOTH_SIGMA_PX)
    lo, hi = float(smooth.min()), float(smooth.max())
    otsu = float(threshold_otsu(smooth)) if hi - lo > 1e-6 else hi
    used = max(otsu, float(min_saturation))
    return smooth > used, {"otsu_saturation": otsu, "saturation_threshold": used}


def _hue_in(hue: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """hue in [lo, hi) degrees, wrapping through 0 when lo > hi."""
    return (hue >= lo) & (hue < hi) if lo <= hi else (hue >= lo) | (hue < hi)


def _ink_levels(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seed, fringe) pixels of green, blue and red/dark ink by the HSV rules above."""
    cool = _hue_in(hue, *COOL_INK_HUE)
    red_seed = _hue_in(hue, *RED_INK_HUE[0]) & (sat >= RED_INK_SAT[0]) & (val >= RED_INK_MIN_VALUE)
    seed = (cool & (sat >= COOL_INK_SAT[0])) | red_seed
    red = _hue_in(hue, *RED_INK_HUE[1]) & (sat >= RED_INK_SAT[1])
    dark = _hue_in(hue, *DARK_INK_HUE) & (val < DARK_INK_MAX_VALUE) & (sat >= DARK_INK_MIN_SAT)
    fringe = (cool & (sat >= COOL_INK_SAT[1])) | red | dark
    return seed, fringe | seed


def pen_mask(
    rgb: np.ndarray,
    min_seed_px: float = 0,
    hsv_planes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Pixels of green, blue or red/dark marker ink.

    Seeds are strongly coloured ink pixels (seed blobs under `min_seed_px` pixels are ignored:
    a few saturated pixels in stained tissue are not a marker line); every ink-coloured pixel
    connected to a seed is ink too. `hsv_planes` (from `hsv(rgb)`) saves recomputing them.
    """
    from skimage.measure import label

    seed, fringe = _ink_levels(*(hsv_planes or hsv(rgb)))
    seed = _drop_small(seed, min_seed_px, holes=False)
    if not seed.any():
        return seed
    regions = label(fringe, connectivity=2)
    hit = np.unique(regions[seed])
    return np.isin(regions, hit[hit > 0])


def _area_px(area_um2: float, mpp: float) -> float:
    return float(area_um2) / (mpp * mpp)


def _drop_small(mask: np.ndarray, min_px: float, *, holes: bool) -> np.ndarray:
    """Remove objects (or fill holes) whose area is below `min_px` pixels.

    scikit-image 0.26 replaced `min_size`/`area_threshold` ("< n") by `max_size` ("<= n");
    use whichever the installed version has, so no deprecation warning is raised.
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    n = math.ceil(min_px)  # an area a is removed iff a < min_px iff a <= n - 1
    if n <= 1:
        return mask
    fn = remove_small_holes if holes else remove_small_objects
    # Tissue is 8-connected, so background (holes) is 4-connected.
    connectivity = 1 if holes else 2
    if holes:  # background open to the picture's edge is no hole: a ring of it joins them
        mask = np.pad(mask, 1)
    params = inspect.signature(fn).parameters
    if "max_size" in params:
        out = fn(mask, max_size=n - 1, connectivity=connectivity)
    else:
        old = "area_threshold" if holes else "min_size"
        out = fn(mask, **{old: n}, connectivity=connectivity)
    return out[1:-1, 1:-1] if holes else out


def _no_data_edge(rgb: np.ndarray, lit: np.ndarray) -> np.ndarray:
    """Grey pixels next to black no-data: a thumbnail pixel on the edge of no-data and glass
    averages black and white to a grey that the RGB rule takes for tissue (a line along a
    whole scan border, joined to the tissue). Stain mixed with black keeps its saturation; a
    black and white mix has none."""
    if lit.all():
        return np.zeros(lit.shape, bool)
    from scipy.ndimage import binary_dilation

    edge = binary_dilation(~lit, np.ones((3, 3), bool)) & lit
    out = np.zeros(lit.shape, bool)
    out[edge] = hsv(rgb[edge])[1] < NO_DATA_EDGE_SATURATION
    return out


def _rgb_tissue(rgb: np.ndarray, rgb_max: list[int], lit: np.ndarray) -> np.ndarray:
    """The paper's RGB rule on the pixels with scan data (`lit`), less the grey edge of black
    no-data (`_no_data_edge`): method rgb, and Otsu's fallback to it."""
    return rgb_rule(rgb, rgb_max) & lit & ~_no_data_edge(rgb, lit)


def _detect(
    rgb: np.ndarray, mpp: float, settings: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Mask, rejected ink and statistics (see `detect_tissue`)."""
    method = settings["method"]
    thresholds: dict[str, Any]
    planes = hsv(rgb) if method == "otsu" or settings["pen_marks"] else None
    lit = has_data(rgb)
    if method == "rgb":
        raw = _rgb_tissue(rgb, settings["rgb_max"], lit)
        thresholds = {"rgb_max": list(settings["rgb_max"])}
    elif method == "otsu":
        raw, thresholds = _otsu_rule(planes[1], settings["min_saturation"])
        raw &= lit
        by_rgb = rgb_rule(rgb, settings["rgb_max"]) & lit
        background = ~raw & lit
        share = float(by_rgb[background].mean()) if background.any() else 0.0
        thresholds["background_tissue_by_rgb"] = share
        if share > OTSU_TISSUE_BACKGROUND:
            log.info(
                "Otsu split the tissue itself (%.0f%% of what it left out is tissue by the RGB "
                "rule: no glass in view): using the RGB rule",
                100 * share,
            )
            raw = _rgb_tissue(rgb, settings["rgb_max"], lit)  # as method rgb: no scan border
            thresholds |= {"fallback": "rgb", "rgb_max": list(settings["rgb_max"])}
    else:
        raise ValueError(f"unknown tissue method {method!r} (rgb or otsu)")
    thresholds["no_data_max"] = NO_DATA_MAX
    min_obj = _area_px(settings["min_object_um2"], mpp)
    max_hole = _area_px(settings["max_hole_um2"], mpp)
    ink = np.zeros(raw.shape, bool)
    if settings["pen_marks"]:
        # Ink blobs smaller than a tissue object are noise in stained tissue, not a marker line.
        ink = pen_mask(rgb, min_obj, planes)
    mask = _drop_small(raw & ~ink, min_obj, holes=False)
    mask = _drop_small(mask, max_hole, holes=True) & ~ink
    mask = _drop_small(mask, min_obj, holes=False)
    return mask, ink & raw, _stats(mask, ink & raw, mpp, method, thresholds)


def _stats(
    mask: np.ndarray, ink: np.ndarray, mpp: float, method: str, thresholds: dict[str, Any]
) -> dict[str, Any]:
    from skimage.measure import label

    n_px = int(mask.sum())
    return {
        "method": method,
        "thresholds": thresholds,
        "mask_mpp": float(mpp),
        "mask_shape": [int(mask.shape[0]), int(mask.shape[1])],
        "tissue_fraction": n_px / mask.size if mask.size else 0.0,
        "tissue_area_mm2": n_px * mpp * mpp / 1e6,
        "n_components": int(label(mask, connectivity=2).max()) if n_px else 0,
        "pen_fraction": float(ink.mean()) if ink.size else 0.0,
    }


def detect_tissue(
    rgb: np.ndarray, mpp: float, settings: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Boolean tissue mask of an RGB thumbnail at `mpp` um/px, and its statistics.

    `settings` is the validated `tissue` config section. Statistics: method, thresholds used,
    mask mpp and shape, tissue fraction and area (mm^2), components, fraction of pixels that
    were tissue by colour but rejected as pen ink.
    """
    mask, _, stats = _detect(np.asarray(rgb), mpp, settings)
    return mask, stats


# -- mask file --------------------------------------------------------------------------------
def write_mask(path: str | Path, mask: np.ndarray, mpp: float) -> None:
    """Write a mask as uint8 0/255 TIFF, deflate, with resolution tags in px/cm = 1e4 / mpp,
    in 256 px tiles (OpenSlide opens tiled TIFFs only: the mask can be viewed like the maps)."""
    import tifffile

    px_per_cm = 1e4 / float(mpp)
    tifffile.imwrite(
        Path(path),
        np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8),
        photometric="minisblack",
        tile=(256, 256),
        compression="zlib",
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
        metadata=None,
        software=f"dsf {__version__}",
    )


def read_mask(path: str | Path, slide_id: str | None = None) -> tuple[np.ndarray, float]:
    """Read a mask written by `write_mask`: (bool array, mpp in um/px); errors name the slide
    `slide_id` (default: the mask's file name)."""
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            data = page.asarray()
            tags = page.tags
            unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 1
            num, den = tags["XResolution"].value if "XResolution" in tags else (0, 1)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise SlideError(
            slide_id or path.stem, f"cannot read tissue mask {path}: {exc}; rerun dsf tissue"
        ) from exc
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if um_per_unit is None or num == 0 or den == 0:
        raise SlideError(
            slide_id or path.stem,
            f"tissue mask {path} states no resolution; regenerate it with dsf tissue",
        )
    return data > 0, um_per_unit * den / num


def check_mask_fits(mask: np.ndarray, mask_mpp: float, slide: Slide, path: str | Path) -> None:
    """A SlideError unless the tissue mask covers the slide: its size at its mpp must be the
    slide's at that mpp (within a pixel and 0.1%: 1% had let a mask of 1% another mpp shift
    tiles' tissue by a 1024 px tile across a 100k px slide), else it is another slide's mask
    (a by-hand run), or the slide's resolution changed since the mask was made."""
    ew, eh = slide.size_at(mask_mpp)
    h, w = mask.shape[:2]
    if abs(w - ew) <= 1 + 0.001 * ew and abs(h - eh) <= 1 + 0.001 * eh:
        return
    mm = mask_mpp / 1000
    raise SlideError(
        slide.slide_id,
        f"tissue mask {path} covers {w * mm:.2f} x {h * mm:.2f} mm ({w}x{h} px at "
        f"{mask_mpp:.4g} um/px), but the slide covers {ew * mm:.2f} x {eh * mm:.2f} mm: it is "
        "another slide's mask, or the slide's mpp changed since; make it with `dsf tissue` "
        "for this slide",
    )


# -- overlay ----------------------------------------------------------------------------------
def render_overlay(rgb: np.ndarray, mask: np.ndarray, ink: np.ndarray | None = None) -> np.ndarray:
    """The thumbnail with background dimmed, ink tinted and a 3 px green tissue outline.

    `mask` and `ink` are resized (nearest) to the image if their shapes differ.
    """
    from skimage.morphology import dilation
    from skimage.segmentation import find_boundaries

    shape = rgb.shape[:2]
    mask = _fit(mask, shape)
    out = rgb[..., :3].astype(np.float32)
    tint = np.asarray(OVERLAY_TINT, np.float32)
    out[~mask] = out[~mask] * OVERLAY_DIM + tint * (1.0 - OVERLAY_DIM)
    if ink is not None and ink.any():
        ink = _fit(ink, shape)
        out[ink] = out[ink] * 0.4 + np.asarray(OVERLAY_INK, np.float32) * 0.6
    # padded: tissue running off the image is outlined along the image's edge too
    inner = find_boundaries(np.pad(mask, 1), mode="inner")[1:-1, 1:-1]
    edge = dilation(inner, np.ones((3, 3), bool))
    out[edge] = OVERLAY_OUTLINE
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _dimmed(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """What `render_overlay` makes of a background pixel of `colour`."""
    return tuple(  # type: ignore[return-value]
        round(c * OVERLAY_DIM + t * (1.0 - OVERLAY_DIM))
        for c, t in zip(colour, OVERLAY_TINT, strict=True)
    )


def _pieces(n: int) -> str:
    """'1 piece', '3 pieces'."""
    return f"{n} piece" if n == 1 else f"{n} pieces"


def caption_overlay(
    overlay: np.ndarray, slide_id: str, stats: dict[str, Any], settings: dict[str, Any], mpp: float
) -> np.ndarray:
    """The overlay above a strip saying whose it is, what was found and how (tissue share,
    area, pieces, method), what its colours mean, and its scale."""
    method = stats["method"]
    if stats["thresholds"].get("fallback"):
        method += f" (no glass in view: {stats['thresholds']['fallback']})"
    title = (
        f"{slide_id}: tissue {100 * stats['tissue_fraction']:.1f}% "
        f"({stats['tissue_area_mm2']:.2f} mm2, {_pieces(stats['n_components'])}), method {method}"
    )
    keys: list[tuple[tuple[int, int, int], str]] = [
        (OVERLAY_OUTLINE, "tissue outline"),
        (_dimmed((255, 255, 255)), "not tissue (dimmed)"),
    ]
    if settings["pen_marks"]:
        keys.append((OVERLAY_INK, f"pen ink ({100 * stats['pen_fraction']:.1f}%)"))
    return add_legend(
        overlay, keys, title=title, mpp=mpp, outline_keys=frozenset(["tissue outline"])
    )


def _fit(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask resized (nearest) to `shape` (h, w)."""
    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 0


def _overlay_image(slide: Slide, thumb: np.ndarray, mask_mpp: float) -> tuple[np.ndarray, float]:
    """The image under the overlay: the thumbnail, or a finer read when it is small."""
    long_side = max(thumb.shape[:2])
    if long_side >= OVERLAY_MIN_SIDE:
        return thumb, mask_mpp
    mpp = max(slide.mpp, mask_mpp * long_side / OVERLAY_MIN_SIDE)
    if mpp >= mask_mpp * 0.99:
        return thumb, mask_mpp
    return slide.thumbnail(mpp), mpp


# -- the stage --------------------------------------------------------------------------------
#: Largest tissue thumbnail: 200 Mpx (600 MB of RGB), 20x a 25 mm section at the default 8 um/px.
MAX_THUMB_PX = 200_000_000


def _no_tissue(slide: Slide, settings: dict[str, Any], stats: dict[str, Any]) -> TissueError:
    """The error for a slide without tissue, saying which settings to look at."""
    method = settings["method"]
    if method == "rgb":
        knob = f"raise tissue.rgb_max (now {settings['rgb_max']}) for pale stains"
    else:
        knob = (
            f"lower tissue.min_saturation (now {settings['min_saturation']}; Otsu gave "
            f"{stats['thresholds']['otsu_saturation']:.3f})"
        )
    other = "otsu" if method == "rgb" else "rgb"
    ink = stats.get("pen_fraction", 0.0)
    pen = (
        f"; {100 * ink:.1f}% of the slide was taken for pen ink: if that was tissue, set "
        "tissue.pen_marks false (a slide holding only ink is rightly empty)"
        if settings["pen_marks"] and ink > 0
        else ""
    )
    return TissueError(
        slide.slide_id,
        f"no tissue found in {slide.path} (method {method!r} on a {stats['mask_mpp']} um/px "
        f"thumbnail). Check that the slide holds tissue and its mpp ({slide.mpp} um/px) is "
        f"right; otherwise try tissue.method {other}, {knob}, or lower "
        f"tissue.min_object_um2 (now {settings['min_object_um2']}){pen}. A slide without "
        "tissue (a blank scan, a label image) has no place in the run: move it out of the "
        "slide folder, or drop its row from the sheet",
    )


def tissue_for_slide(
    slide: Slide, settings: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Mask, overlay image and full statistics of a slide; `TissueError` if it has no tissue."""
    mpp = float(settings["mpp"])
    w, h = slide.size_at(mpp)
    if w * h > MAX_THUMB_PX:
        raise ConfigError(
            f"tissue.mpp {mpp:g} would read slide {slide.slide_id!r} as a {w}x{h} px image "
            f"({w * h / 1e6:.0f} Mpx; its own resolution is {slide.mpp:.4g} um/px): tissue is "
            "found on a low-magnification thumbnail, so give tissue.mpp a few um/px (the "
            "default 8)"
        )
    thumb = slide.thumbnail(mpp)
    mask, ink, stats = _detect(thumb, mpp, settings)
    if not mask.any():
        raise _no_tissue(slide, settings, stats)
    base, overlay_mpp = _overlay_image(slide, thumb, mpp)
    overlay = render_overlay(base, mask, ink if settings["pen_marks"] else None)
    overlay = caption_overlay(overlay, slide.slide_id, stats, settings, overlay_mpp)
    path = Path(slide.path)
    info = {
        "slide_id": slide.slide_id,
        "source": str(path.resolve()),
        "file_size": path.stat().st_size,
        "slide_mpp": slide.mpp,
        "slide_dimensions": list(slide.dimensions),
        "backend": slide.backend_name,
        "dsf_version": __version__,
        "settings": settings,
        **stats,
        "overlay_mpp": overlay_mpp,
    }
    return mask, overlay, info


@contextmanager
def _all_or_none(paths: list[Path]) -> Iterator[list[Path]]:
    """Partial paths for several outputs; on any failure none of the outputs is left."""
    try:
        with ExitStack() as stack:
            yield [stack.enter_context(atomic_path(p)) for p in paths]
    except BaseException:
        for path in paths:
            remove(path)
        raise


def write_outputs(
    mask: np.ndarray,
    overlay: np.ndarray,
    stats: dict[str, Any],
    *,
    mask_path: Path,
    overlay_path: Path,
    stats_path: Path,
) -> None:
    """Write mask TIFF, overlay JPEG and stats JSON, all or none."""
    with _all_or_none([mask_path, overlay_path, stats_path]) as (m, o, s):
        write_mask(m, mask, stats["mask_mpp"])
        save_picture(overlay, o, overlay_path, OVERLAY_QUALITY)
        s.write_text(json.dumps(stats, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsf tissue",
        description="Tissue mask, overlay and statistics of one slide (DESIGN section 4).",
    )
    parser.add_argument("--slide", required=True, type=Path, help="slide file")
    parser.add_argument("--slide-id", help="slide id for messages (default: file stem)")
    parser.add_argument(
        "--sheet-mpp", type=float, help="level-0 um/px from the sheet (overrides the file's)"
    )
    add_tolerance_argument(parser)
    parser.add_argument("--mask", required=True, type=Path, help="output mask TIFF")
    parser.add_argument("--overlay", required=True, type=Path, help="output overlay JPEG")
    parser.add_argument("--stats", required=True, type=Path, help="output statistics JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_section_arguments(parser, "tissue")
    return parser


def _stage(args: argparse.Namespace) -> None:
    outputs = [args.mask, args.overlay, args.stats]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ConfigError("--mask, --overlay and --stats must be three different files")
    picture_format(args.overlay, "--overlay")
    check_outputs(outputs, [args.slide])
    for path in outputs:
        remove(path)  # a failed rerun must not leave the previous outputs looking current
    settings = section_from_args(args, "tissue")
    with open_slide(
        args.slide, args.sheet_mpp, args.slide_id, mpp_tolerance=args.mpp_tolerance
    ) as slide:
        mask, overlay, stats = tissue_for_slide(slide, settings)
    write_outputs(
        mask, overlay, stats, mask_path=args.mask, overlay_path=args.overlay, stats_path=args.stats
    )
    log.info(
        "%s: tissue %.1f%% (%.2f mm^2, %s) at %.3g um/px, method %s -> %s",
        stats["slide_id"],
        100 * stats["tissue_fraction"],
        stats["tissue_area_mm2"],
        _pieces(stats["n_components"]),
        stats["mask_mpp"],
        stats["method"],
        args.mask,
    )


def main(argv: list[str] | None = None) -> int:
    """`dsf tissue --slide S --mask M.tiff --overlay O.jpg --stats S.json [tissue options]`."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    return run(lambda: _stage(args))


if __name__ == "__main__":
    sys.exit(main())
