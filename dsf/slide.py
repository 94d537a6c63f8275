"""Spacing-first slide access (DESIGN section 4): a `Slide` over one of the readers of
`dsf.slide_readers` (OpenSlide, tifffile, PIL).

Every read is asked in microns per pixel (mpp) and is a bounded region: the reader picks the
pyramid level at or finer than the request, reads just the level pixels the region needs, and
resamples them over the region's float box, so a read covers exactly what it asks (PIL's box
filter when reducing, which weighs a source pixel by where its centre falls, not by its exact
overlap; bilinear when enlarging). A level within the tolerance is read as it is only when
asked at its own mpp (`Slide.effective_mpp`).

The mpp comes from the sheet (`mpp`, which wins) or the file (OpenSlide's `openslide.mpp-x`,
which covers Aperio `MPP` and TIFF resolution tags; OME `PhysicalSizeX`; TIFF resolution tags
with their unit). Handles are opened lazily and per process, so a `Slide` can be handed to
DataLoader workers or other processes after a fork.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsf.errors import REMOVE_SLIDE, SlideError, some
from dsf.slide_backend import (
    MAX_PLAUSIBLE_MPP,
    NOT_SQUARE,
    Backend,
    LevelInfo,
    UnsupportedLayoutError,
)
from dsf.slide_readers import (
    backend_name,
    check_image_mode,
    image_mpp,
    is_plain_image,
    layout_refusal,
    open_backend,
)

log = logging.getLogger(__name__)

#: Refuse single reads above this many level pixels: callers must tile bigger work.
MAX_READ_PIXELS = 256 * 1024 * 1024
#: A read at a coarse mpp whose level pixels pass this many (a slide without the pyramid
#: level it needs: 64x as many pixels at 8x) is made in pieces of at most this many, each
#: resampled alone, so its memory stays bounded whatever the slide's levels.
READ_PIECE_PIXELS = 64 * 1024 * 1024
#: A read is at a level's own scale when the ratio is within this of 1 (float rounding of
#: mpp * downsample / mpp; over 100,000 px it drifts a tenth of a pixel).
LEVEL_MATCH = 1e-6


def _edge_margin(src: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """`src` (level pixels from (x0, y0) of a level `w` x `h`) with the column and row just
    past each of the level's edges set to the edge's own pixels, as a resize of the whole
    level clamps: upsampled, the slide's outermost pixels keep their colour (blended with
    the background beyond, they had come out lighter)."""
    out = src
    for axis, lo, size in ((1, x0, w), (0, y0, h)):
        n = out.shape[axis]
        for past, edge in ((-1, 0), (size, size - 1)):
            if 0 <= past - lo < n and 0 <= edge - lo < n:
                if out is src:
                    out = src.copy()
                index = [slice(None)] * 2
                index[axis] = past - lo
                source = list(index)
                source[axis] = edge - lo
                out[tuple(index)] = out[tuple(source)]
    return out


@dataclass
class Slide:
    """A slide opened lazily per process; all geometry in level-0 pixels, resolution in um/px."""

    path: Path
    slide_id: str
    mpp: float
    levels: list[LevelInfo]
    backend_name: str
    properties: dict[str, str] = field(default_factory=dict)
    #: levels within this relative distance of a requested resolution are read without
    #: resampling (patches.mpp_tolerance; open_slide fills it)
    mpp_tolerance: float = 0.0
    _backend: Backend | None = field(default=None, repr=False)
    _pid: int = field(default=-1, repr=False)
    #: handles a failed read set aside, closed by `close` (see `_retire`)
    _retired: list[Backend] = field(default_factory=list, repr=False)

    # -- process-safe handle ----------------------------------------------------------------
    def _handle(self) -> Backend:
        if self._backend is None or self._pid != os.getpid():
            self._backend = open_backend(self.path, self.slide_id, check=False)
            self._pid = os.getpid()
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_backend"], state["_pid"], state["_retired"] = None, -1, []
        return state

    def _retire(self, backend: Backend) -> None:
        """Set aside a handle a read failed on, so the next read opens a fresh one (OpenSlide
        keeps an error once met), without closing it: other reader threads may be inside it,
        and closing an OpenSlide handle under them aborts the process (a C assertion, no
        message). `close` closes it once the readers are done."""
        if self._backend is backend:
            self._backend = None
            self._retired.append(backend)

    def close(self) -> None:
        """Close the file handles of this process (reopened on the next read); only when no
        other thread reads this slide."""
        if self._pid == os.getpid():
            for backend in [*self._retired, *([self._backend] if self._backend else [])]:
                backend.close()
        self._backend = None
        self._retired = []

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- geometry ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size (width, height) in pixels."""
        return self.levels[0].width, self.levels[0].height

    @property
    def background(self) -> tuple[int, int, int]:
        """Colour of areas without scan data (white unless the file says otherwise)."""
        return self._handle().background

    def size_at(self, mpp: float) -> tuple[int, int]:
        """Whole-slide size (width, height) at `mpp`, rounded to whole pixels."""
        f = mpp / self.mpp
        w, h = self.dimensions
        return max(1, int(round(w / f))), max(1, int(round(h / f)))

    def best_level(self, mpp: float) -> int:
        """The coarsest level at or finer than `mpp` (within the tolerance)."""
        f = mpp / self.mpp
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= f * (1 + self.mpp_tolerance):
                best = i if lv.downsample >= self.levels[best].downsample else best
        return best

    def effective_mpp(self, mpp: float) -> float:
        """The resolution to read at for `mpp` without resampling where a level is close.

        A level within the tolerance has its own mpp returned (e.g. 0.2527 for a 0.25
        request): reading at it (`read`) gives that level's pixels as they are (through
        OpenSlide, where the level's downsample is not whole, as Aperio's are not, resampled by
        up to half a level-0 pixel: OpenSlide places reads in level-0 pixels), and the caller
        works at that mpp (patches, maps). Otherwise the request itself.
        """
        lv = self.levels[self.best_level(mpp)]
        level_mpp = self.mpp * lv.downsample
        return level_mpp if abs(mpp / level_mpp - 1.0) <= self.mpp_tolerance else mpp

    def upsamples(self, mpp: float) -> bool:
        """Whether reading at `mpp` (an `effective_mpp`) enlarges the slide's finest pixels:
        a request finer than level 0 beyond the tolerance."""
        return mpp / self.mpp < 1 - self.mpp_tolerance

    @property
    def bounds(self) -> tuple[int, int, int, int] | None:
        """The slide's scanned region (x, y, width, height, level-0 px): OpenSlide's
        `openslide.bounds-*` (MIRAX and Leica slides); None where the file states none.

        dsf reads and maps the whole plane, but QuPath shows a slide cropped to these bounds,
        so QuPath's GeoJSON coordinates count from their corner (`dsf.annotations`,
        `dsf.polygons`)."""
        return bounds_of(self.properties)

    @property
    def objective_power(self) -> float | None:
        """Objective power stated by the file, if any (informational: dsf works in mpp)."""
        value = self.properties.get("openslide.objective-power")
        try:
            return float(value) if value else None
        except ValueError:
            return None

    # -- pixels -----------------------------------------------------------------------------
    def read(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the region with level-0 top-left (x, y) at `mpp`.

        The region covers exactly width * mpp by height * mpp microns: a level within the
        tolerance of `mpp` but not at it (0.2527 for 0.25) is resampled, since read as it is its
        pixels would cover more or less than asked and drift from the positions the caller
        computes. To read such a level as it is, ask for its own mpp (`effective_mpp`).
        Outside the slide reads as the slide background (never wraps).
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"empty read {width}x{height}")
        f = mpp / self.mpp
        level = self.best_level(mpp)
        lv = self.levels[level]
        r = f / lv.downsample
        if abs(r - 1.0) <= LEVEL_MATCH:
            r = 1.0
        lx, ly = x / lv.downsample, y / lv.downsample
        if r == 1.0 and lx == int(lx) and ly == int(ly):
            return self._read_padded(level, int(lx), int(ly), width, height)
        if r < 1.0:
            log.debug("%s: upsampling x%.2f from level %d", self.slide_id, 1 / r, level)
        # upsampling (bilinear) reads a level pixel more on every side, so a pixel at the
        # read's edge blends its true neighbour, as one read of the whole would (streamed
        # bands and strips had seams where the filter clamped at the read's edge)
        m = 1 if r < 1.0 else 0
        ix0, iy0 = math.floor(lx) - m, math.floor(ly) - m
        ix1, iy1 = math.ceil(lx + width * r) + m, math.ceil(ly + height * r) + m
        if r > 1.0 and (ix1 - ix0) * (iy1 - iy0) > READ_PIECE_PIXELS and width * height > 1:
            return self._read_in_pieces(x, y, width, height, mpp, r)
        src = self._read_padded(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        if m:
            src = _edge_margin(src, ix0, iy0, lv.width, lv.height)
        box = (lx - ix0, ly - iy0, lx - ix0 + width * r, ly - iy0 + height * r)
        resample = Image.Resampling.BOX if r > 1.0 else Image.Resampling.BILINEAR
        out = Image.fromarray(src).resize((width, height), resample=resample, box=box)
        return np.asarray(out)

    def _read_in_pieces(
        self, x: float, y: float, width: int, height: int, mpp: float, r: float
    ) -> np.ndarray:
        """`read` of a region whose level pixels pass READ_PIECE_PIXELS, as pieces of whole
        output pixels (bands of rows, or blocks for a very wide region), each within it."""
        f = mpp / self.mpp  # level-0 px per output px
        side = max(1, int(math.sqrt(READ_PIECE_PIXELS) / r) - 1)  # output px of a square piece
        cols = width if (width * r + 2) * (r + 2) <= READ_PIECE_PIXELS else side
        rows = max(1, int(READ_PIECE_PIXELS / ((cols * r + 2) * r)) - 2)
        out = np.empty((height, width, 3), np.uint8)
        for oy in range(0, height, rows):
            for ox in range(0, width, cols):
                h, w = min(rows, height - oy), min(cols, width - ox)
                out[oy : oy + h, ox : ox + w] = self.read(x + ox * f, y + oy * f, w, h, mpp)
        return out

    def _read_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read level pixels [x, x+w) x [y, y+h), padding outside the level with background."""
        if w * h > MAX_READ_PIXELS:
            raise ValueError(f"read of {w}x{h} level pixels exceeds the bound; tile the work")
        lv = self.levels[level]
        backend = self._handle()
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + w, lv.width), min(y + h, lv.height)
        try:
            if (cx0, cy0, cx1, cy1) == (x, y, x + w, y + h):
                return backend.read_level(level, x, y, w, h)
            out = np.empty((h, w, 3), np.uint8)
            out[:] = np.asarray(backend.background, np.uint8)
            if cx1 > cx0 and cy1 > cy0:
                part = backend.read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
                out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = part
            return out
        except SlideError:
            raise
        except Exception as exc:
            self._retire(backend)
            raise SlideError(
                self.slide_id,
                f"cannot decode pixels of {self.path} (in the region read: level {level}, "
                f"x {x}, y {y}, {w} x {h} px): "
                f"{type(exc).__name__}: {exc}; the file is corrupt or truncated: re-export it "
                f"or {REMOVE_SLIDE}",
            ) from exc

    def thumbnail(self, mpp: float, chunk: int = 2048) -> np.ndarray:
        """The whole slide at `mpp` (RGB uint8), read in bounded chunks of the chosen level."""
        out_w, out_h = self.size_at(mpp)
        f = mpp / self.mpp  # level-0 px per output px: chunk origins stay on one sampling grid
        level = self.best_level(mpp)
        lv = self.levels[level]
        step = max(16, int(chunk * lv.downsample / f))  # output px per chunk
        rows = cols = step
        if self._handle().full_width(level):
            # stripped: bands of whole rows, each strip decoded once (squares had decoded it
            # once per square across: 5.8 s for a 32k-wide thumbnail, 1.2 s in bands), within
            # READ_PIECE_PIXELS so that `read` does not cut them into squares again
            r = f / lv.downsample  # level px per output px
            cols = out_w
            rows = max(1, int((READ_PIECE_PIXELS // 2 / (out_w * r + 2) - 2) / r))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, rows):
            for ox in range(0, out_w, cols):
                w, h = min(cols, out_w - ox), min(rows, out_h - oy)
                out[oy : oy + h, ox : ox + w] = self.read(ox * f, oy * f, w, h, mpp)
        return out


#: Suffixes of the slide formats OpenSlide states bounds for (MIRAX, Leica).
BOUNDS_SUFFIXES = frozenset({".mrxs", ".scn"})
_BOUNDS_KEYS = tuple(f"openslide.bounds-{k}" for k in ("x", "y", "width", "height"))


def bounds_of(properties: dict[str, str]) -> tuple[int, int, int, int] | None:
    """(x, y, width, height) of a slide's `openslide.bounds-*` properties; None without them."""
    try:
        x, y, w, h = (int(properties[k]) for k in _BOUNDS_KEYS)
    except (KeyError, ValueError):  # OpenSlide states all four, as whole numbers, or none
        return None
    return (x, y, w, h) if w > 0 and h > 0 else None


def file_bounds(path: str | os.PathLike[str], slide_id: str) -> tuple[int, int, int, int] | None:
    """`bounds_of` a slide file, opened for its properties only."""
    backend = open_backend(Path(path), slide_id, check=False)
    try:
        return bounds_of(backend.properties)
    finally:
        backend.close()


@dataclass(frozen=True)
class SlideFacts:
    """What a slide file says of itself: its reader, level-0 size, pyramid levels and
    resolution in um/px (None: the file states none, the sheet must)."""

    reader: str
    width: int
    height: int
    levels: int
    mpp: float | None


def describe_slide(path: str | os.PathLike[str], slide_id: str | None = None) -> SlideFacts:
    """The facts of a slide file, for listing a folder; an unreadable file raises SlideError.

    A small region is decoded (as `open_slide` does), except in plain images, whose header is
    enough and whose pixels would otherwise be decoded whole.
    """
    path = Path(path)
    sid = slide_id or _default_id(path)
    if path.is_file() and path.stat().st_size and is_plain_image(path):
        try:
            with Image.open(path) as im:
                mpp, note = image_mpp(im.info.get("dpi"))
                size = im.size
                check_image_mode(im.mode)
        except UnsupportedLayoutError as exc:
            raise layout_refusal(sid, path, exc) from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SlideError(sid, f"cannot read {path}: {exc}") from exc
        if note:
            log.warning("%s: %s", sid, note)
        return SlideFacts("image", size[0], size[1], 1, mpp)
    backend = open_backend(path, sid, check=True)
    if backend.mpp_note:
        log.warning("%s: %s", sid, backend.mpp_note)
    try:
        props = backend.properties
        reader = backend_name(backend)
        if "openslide.vendor" in props:
            reader = f"{reader} ({props['openslide.vendor']})"
        lv0 = backend.levels[0]
        return SlideFacts(reader, lv0.width, lv0.height, len(backend.levels), backend.file_mpp)
    finally:
        backend.close()


def _default_id(path: Path) -> str:
    """A slide's id from its file name, as `dsf sheet` and a slides folder name it."""
    from dsf.scan import slide_id as id_from_name

    return id_from_name(path.name)


def tolerance(value: float | None = None) -> float:
    """`value`, or the schema's patches.mpp_tolerance."""
    if value is not None:
        return float(value)
    from dsf.config import defaults

    return float(defaults("patches")["mpp_tolerance"])


def add_tolerance_argument(parser: argparse.ArgumentParser) -> None:
    """`--mpp-tolerance` of a stage that reads a slide: patches.mpp_tolerance (the workflow
    passes it), so the stage reads the slide at the resolution its patches were cut at."""
    from dsf.config import add_setting_argument

    add_setting_argument(
        parser,
        "--mpp-tolerance",
        "patches.mpp_tolerance",
        "relative distance from the wanted um/px within which a slide level counts as at it "
        "(patches and maps then work in the level's own pixels; give the patches' value)",
    )


#: A sheet `mpp` further than this (relative) from the file's own is warned about, at the
#: start of a run and in the slide's jobs alike.
SHEET_MPP_WARN = 0.05
#: A scan this fine or finer (um/px) is 20x or finer (20x is about 0.5), which the paper's
#: 5x/20x geometry reads as it is: the upsampling warnings suggest it only for such slides
TWENTY_X_MPP = 0.6


def no_resolution(sid: str, path: Path, note: str | None) -> SlideError:
    """The error of a slide without a usable resolution (`note`: why the file's is not used),
    with the fix: the sheet's `mpp` column, except for pixels that are not square, which no
    single um/px reads right."""
    if note and NOT_SQUARE in note:
        return SlideError(sid, f"{path}: {note}")
    return SlideError(
        sid,
        (
            f"{path}: {note}; "
            if note
            else f"{path} states no resolution (no openslide.mpp-x, Aperio MPP, OME "
            "PhysicalSizeX or TIFF resolution tags); "
        )
        + "fill the `mpp` column (um/px) of the slide sheet (with `slides` a folder: write "
        "its sheet with `dsf sheet FOLDER --out slides.tsv`; a stage run by hand takes "
        "`--sheet-mpp`)",
    )


def open_slide(
    path: str | os.PathLike[str],
    mpp: float | None = None,
    slide_id: str | None = None,
    *,
    mpp_tolerance: float | None = None,
    check: bool = True,
) -> Slide:
    """Open a slide; `mpp` (from the sheet) overrides the file's resolution. `mpp_tolerance`
    defaults to patches.mpp_tolerance: every stage reads a slide as the patches were cut.

    With `check`, a small region is decoded so corrupt files fail here, with the slide's name,
    rather than deep inside a later stage.
    """
    path = Path(path)
    sid = slide_id or _default_id(path)
    if mpp is not None and not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise SlideError(sid, f"sheet mpp {mpp!r} is not a positive number; fix the `mpp` column")
    backend = open_backend(path, sid, check)
    file_mpp = backend.file_mpp
    if mpp is None and file_mpp is None:
        backend.close()
        raise no_resolution(sid, path, backend.mpp_note)
    if mpp is not None and backend.mpp_note:
        log.warning("%s: the sheet's mpp %.4g um/px is used (%s)", sid, mpp, backend.mpp_note)
    if mpp is not None and file_mpp is not None and abs(mpp / file_mpp - 1) > SHEET_MPP_WARN:
        log.warning("%s: sheet mpp %.4g overrides the file's %.4g um/px", sid, mpp, file_mpp)
    if mpp is not None and mpp > MAX_PLAUSIBLE_MPP:
        log.warning(
            "%s: sheet mpp %.4g um/px is coarser than any scan (a 1.25x scan is about 8): is "
            "that an objective power (20, 40) in the `mpp` column? 40x is about 0.25 um/px, "
            "20x about 0.5",
            sid,
            mpp,
        )
    slide = Slide(
        path=path,
        slide_id=sid,
        mpp=float(mpp if mpp is not None else file_mpp),  # type: ignore[arg-type]
        levels=list(backend.levels),
        backend_name=backend_name(backend),
        properties=dict(backend.properties),
        mpp_tolerance=tolerance(mpp_tolerance),
        _backend=backend,
        _pid=os.getpid(),
    )
    return slide


#: Seconds the start-up check of the slides' resolution may take (`check_resolutions`).
CHECK_BUDGET_S = 10.0


def check_resolutions(
    slides: dict[str, tuple[str, float | None]],
    budget_s: float = CHECK_BUDGET_S,
    cache: Path | None = None,
) -> dict[str, float]:
    """Open the sheet's slides (slide id -> (path, sheet mpp)) before any job runs: slides
    without a sheet `mpp` that state no resolution, or cannot be opened, stop the run at once
    naming every such slide, instead of failing one tissue job per slide (on a
    cluster each submitted and retried); a sheet `mpp` far from the file's own, or given for
    pixels that are not square, is warned about here, where it is seen (the jobs say it only
    in their logs). Headers and a few pixels of the coarsest level are read (a file whose
    pixels no reader decodes is named as such, not for its resolution); what `budget_s` leaves
    unchecked, and files not there yet (a workflow's own synthetic slides), are left to their
    jobs. `cache` (a JSON file) remembers the files found good, by path, size and modification
    time (and their resolution), so the next start opens only new or changed files. Returns
    the resolution (um/px) of each slide known now: the sheet's, or the file's for those
    checked (or remembered)."""
    import json
    import time

    from dsf.atomic import atomic_path

    known: dict[str, list[Any]] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            log.warning("%s is not valid JSON: every slide is checked again", cache)
    start = time.monotonic()
    problems: list[str] = []
    overridden: list[str] = []
    unchecked = 0
    good: dict[str, list[Any]] = {}
    mpps: dict[str, float] = {}
    for sid, (path, mpp) in slides.items():
        file = Path(path)
        if mpp is not None:
            mpps[sid] = float(mpp)
        if not file.exists():
            continue
        stat = file.stat()
        key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = known.get(key)
        # [size, mtime, the file's mpp or None, why not] (older caches: [size, mtime, mpp])
        if entry is not None and len(entry) == 4 and entry[:2] == stamp:
            facts = entry
        elif time.monotonic() - start > budget_s:
            unchecked += 1
            continue
        else:
            try:
                backend = open_backend(file, sid, True)
            except SlideError as exc:
                if mpp is None:  # with the sheet's mpp, a file that fails is its job's to name
                    problems.append(str(exc))
                continue
            facts = [*stamp, backend.file_mpp, backend.mpp_note]
            backend.close()
        good[key] = facts
        file_mpp, note = facts[2], facts[3]
        if mpp is None and file_mpp is None:
            problems.append(str(no_resolution(sid, file, note)))
        elif mpp is None:
            mpps[sid] = float(file_mpp)
        elif note and NOT_SQUARE in note:
            overridden.append(f"{sid} (the sheet's {mpp:.4g} um/px is read, but {note})")
        elif file_mpp is not None and abs(mpp / file_mpp - 1) > SHEET_MPP_WARN:
            overridden.append(f"{sid} (sheet {mpp:.4g}, file {file_mpp:.4g} um/px)")
    if unchecked:
        log.info("%d slides are checked by their own jobs (over %.0f s)", unchecked, budget_s)
    if cache is not None and good != known:
        try:
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps(good))
        except OSError as exc:  # a read-only working folder: the next start checks again
            log.warning(
                "cannot write %s (%s): slides are checked again at the next start", cache, exc
            )
    if overridden:
        log.warning(
            "%d slides have a sheet `mpp` that overrides what their files state: %s. The "
            "sheet's wins, so their tiles are cut at its scale; if the files are right, empty "
            "those cells of the `mpp` column (pixels that are not square need resampling)",
            len(overridden),
            some(overridden, 5),
        )
    if problems:
        from dsf.errors import found_at_start

        raise found_at_start(problems, "slides", "or the sheet's `path` and `mpp` columns")
    return mpps


def upsampling_note(
    mpps: dict[str, float], target_mpp: float, tolerance: float, models: bool = False
) -> str | None:
    """What to say, at the start of a run, of slides scanned coarser than `patches.target_mpp`
    (beyond `tolerance`): their tiles are upsampled, which adds no detail and multiplies the
    stores' size (a 20x cohort under a 40x setting); None when there are none. The stages
    would say it only in each slide's job log. With `models`, `target_mpp` is a prediction
    run's models' (apply.models): such slides are upsampled for them."""
    # as effective_mpp decides: within the tolerance of a level, read as it is
    coarse = {s: m for s, m in mpps.items() if target_mpp / m < 1.0 - tolerance}
    if not coarse:
        return None
    named = some([f"{s} ({m:.4g})" for s, m in coarse.items()], 5)
    finest = min(coarse.values())
    up = f"{max(coarse.values()) / target_mpp:.2g}x"
    if models:
        return (
            f"{len(coarse)} of {len(mpps)} slides are scanned coarser than the models' "
            f"{target_mpp:g} um/px (apply.models): {named} um/px. They are upsampled for the "
            f"models (up to {up}), and their maps show what the models make of blurred tissue; "
            f"map such slides with models trained at {finest:.4g} um/px or coarser "
            "(patches.target_mpp)"
        )
    return (
        f"{len(coarse)} of {len(mpps)} slides are scanned coarser than patches.target_mpp "
        f"{target_mpp:g} um/px: {named} um/px. Their tiles are upsampled (up to {up}), which "
        "adds no detail and makes their patch stores larger; for such a cohort set "
        f"patches.target_mpp to {finest:.4g} or coarser"
        + (" (the paper's 5x/20x pair: 0.5)" if finest <= TWENTY_X_MPP else "")
    )
