"""Stitched whole-slide inference: full-slide class maps from fine-tuned HookNets.

Windows: every target block of `block` px at the target mpp, with its concentric context
(`scale` x the field of view, reduced by `scale` exactly as `dsf patches` made the training
contexts), on a grid of step `stride` = block x (1 - overlap). Each window owns the central
`stride` x `stride` cell ("core") of its block; the cores tile the slide. A window runs when its
block touches tissue (the tissue mask of `dsf tissue`); neighbouring windows are blended with a
smooth (Hann) weight window, so no seams show, and the class is the argmax of the blended
foreground probabilities (0 = background: outside the tissue or never predicted).

Streaming, so memory is flat in slide size: the slide is cut into column bands of
`band_windows` cores; each band is read top to bottom in row chunks of `stride` px (each chunk
read once, and only the columns its windows' contexts cover, by prefetching reader threads,
overlapped with the model), each chunk goes to the model's device once, the windows of a window
row are cut there in one gather and blended in a few ops per row (whatever its number of
windows), and a core row is written out as soon as no later window touches it. Band edges
recompute the one or two windows whose blocks reach into the neighbour band, instead of holding
a full-width accumulator. The map's pyramid is built as its rows are written (each level a
subsampling of level 0; the large levels spooled to disk as compressed TIFF tiles, compressed
while the model works), then written as a tiled, pyramidal, palette TIFF that OpenSlide and
QuPath open at the slide's scale (resolution tags in px/cm).

The parts: `dsf.windows` (the grid and the bands), `dsf.chunk_reader` (reading),
`dsf.stitch` (cutting, running and blending the windows), `dsf.map_writer` (the map, the
probabilities and the overlay); this module runs them for one slide.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import numpy as np

from dsf import __version__
from dsf.atomic import atomic_path, check_outputs, remove, remove_scratch
from dsf.captions import picture_format, save_picture
from dsf.chunk_reader import ChunkReader
from dsf.class_tiff import write_tiff
from dsf.config import add_section_arguments, section_from_args
from dsf.errors import ConfigError, SlideError, TissueError
from dsf.map_writer import MapWriter, WriterThread, render_overlay, write_ome_attrs
from dsf.predict import Predictor, load_predictor
from dsf.runner import run, setup_logging
from dsf.slide import TWENTY_X_MPP, Slide, add_tolerance_argument, open_slide
from dsf.stitch import Stitcher
from dsf.tilespool import TileSpool
from dsf.windows import make_grid, out_factor, plan_bands, tissue_windows

log = logging.getLogger(__name__)

#: out_of_fold: the model of the fold that held the slide out; ensemble: every fold's averaged;
#: fold: one fold's (infer.unlabelled_fold); given: models named by apply.models (a prediction
#: run with models trained before)
ROUTINGS = ("out_of_fold", "ensemble", "fold", "given")


def _check_models(preds: list[Predictor], mpp_tolerance: float) -> None:
    """Refuse models that cannot be averaged. Target mpp within `mpp_tolerance` (relative,
    patches.mpp_tolerance) are one geometry: models fine-tuned before they recorded the
    requested mpp hold their first store's actual one (0.2527 for 0.25), which differs between
    folds, as the stores of one run differ within that tolerance."""
    ref = preds[0]
    for p in preds[1:]:
        for key in ("classes", "scale", "block", "target_mpp", "init"):
            a, b = getattr(p, key), getattr(ref, key)
            if a != b and not (key == "target_mpp" and math.isclose(a, b, rel_tol=mpp_tolerance)):
                raise ConfigError(
                    f"models to ensemble differ in {key} ({getattr(ref, key)} vs "
                    f"{getattr(p, key)}); they must come from one fine-tuning configuration"
                )
    fractions = sorted({float(p.meta.get("fraction", 1.0)) for p in preds})
    if len(fractions) > 1:  # e.g. the models of results/finetune/<init>, not of one frac<f>
        raise ConfigError(
            f"the {len(preds)} models to ensemble were fine-tuned on different label fractions "
            f"{fractions}: averaged, the map would be labelled with one of them; give one "
            "fraction's models (results/finetune/<init>/frac<f>)"
        )


def infer_slide(
    slide: Slide,
    mask: np.ndarray,
    mask_mpp: float,
    preds: list[Predictor],
    settings: dict[str, Any],
    out_map: Path,
    out_overlay: Path,
    out_meta: Path,
    out_probs: Path | None = None,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict the whole slide and write the map, overlay, metadata (and probabilities)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    _check_models(preds, slide.mpp_tolerance)
    # earlier outputs go first: a run that fails midway must not leave a new map beside an
    # old JSON or overlay that `open_map` would take as one
    # (probabilities of an earlier run with infer.probabilities on, too, when none are asked)
    probs = out_probs if out_probs is not None else out_map.with_suffix(".probs.zarr")
    for old in (out_map, out_overlay, out_meta, probs):
        remove(old)
    p = preds[0]
    # the slide is read at what its level delivers for the model's mpp, as its tiles were cut
    # (`dsf.patches`): within patches.mpp_tolerance the level as it is (0.2527 for 0.25), so
    # the grid, the reads and the map's mpp are all in those pixels and a map pixel covers
    # the slide region it claims (a grid at the nominal mpp drifted across each band)
    t = slide.effective_mpp(p.target_mpp)
    f = out_factor(settings["out_mpp"], t, slide.mpp_tolerance)
    if slide.upsamples(t):  # as dsf.patches warns for training tiles
        example = ", e.g. the 5x/20x geometry for 20x scans" if slide.mpp <= TWENTY_X_MPP else ""
        log.warning(
            "%s: the models' %.4g um/px is finer than the slide's %.4g um/px: the slide is "
            "upsampled for them, and the map shows what they make of blurred tissue (map such "
            "slides with models trained at their resolution%s)",
            slide.slide_id,
            t,
            slide.mpp,
            example,
        )
    width, height = slide.size_at(t)
    grid = make_grid(
        width, height, p.block, p.scale, settings["overlap"], f, settings["band_windows"]
    )
    run_grid = tissue_windows(grid, mask, mask_mpp, t)
    if not run_grid.any():  # an empty map would look like a slide mapped as all background
        raise TissueError(
            slide.slide_id,
            "its tissue mask has no tissue, so there is nothing to map: write the mask again "
            "with `dsf tissue` (which refuses a slide without tissue) or give this slide's own "
            "mask",
        )
    bands = plan_bands(grid, run_grid)
    n_fg = len(p.classes) - 1
    log.info(
        "%s: %dx%d px at %.4g um/px, %d windows of %d px over tissue (stride %d, %d bands)",
        slide.slide_id,
        width,
        height,
        t,
        int(run_grid.sum()),
        grid.block,
        grid.stride,
        len(bands),
    )
    phases: dict[str, float] = {}  # seconds per phase: where a run's time went
    clock = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 3)
        clock[0] = now

    work = out_map.with_name(f".{out_map.name}.work")
    remove_scratch(work)
    out_mpp = t * f
    tissue = mask if settings["mask_output"] else None
    # the overlay's thumbnail is read beside the prediction, not after it
    thumb_mpp = max(out_mpp, max(slide.dimensions) * slide.mpp / settings["overlay_px"])
    thumbs = ThreadPoolExecutor(1, thread_name_prefix="dsf-thumb")
    thumb = thumbs.submit(slide.thumbnail, thumb_mpp)
    # the probabilities take their final name last, once the map, overlay and JSON are
    # written: a failure on the way leaves none of them looking complete
    stack = ExitStack()
    probs_tmp = stack.enter_context(atomic_path(out_probs)) if out_probs is not None else None
    try:
        with stack:
            try:
                writer = MapWriter(
                    work,
                    grid,
                    n_fg,
                    tissue,
                    out_mpp / mask_mpp,
                    probs_tmp,
                    settings["tile"],
                    settings["threads"],
                )
                bar = tqdm(
                    total=int(run_grid.sum()), unit="win", disable=not progress, desc=slide.slide_id
                )
                sink = WriterThread(writer, slide.slide_id, out_map)
                try:
                    stitcher = Stitcher(grid, run_grid, preds, sink, settings["batch_size"], bar)
                    pin = p.device.type == "cuda"
                    reader = ChunkReader(slide, grid, t, settings["threads"], pin=pin)
                    with closing(reader.stream(bands)) as chunks:
                        stitcher.run(bands, chunks)
                    if bool(stitcher.nonfinite):  # a NaN takes no class: not a map
                        amp = {str(pr.amp).removeprefix("torch.") for pr in preds if pr.amp}
                        raise SlideError(
                            slide.slide_id,
                            "the models gave NaN or infinite probabilities for some windows: "
                            "their weights hold NaN"
                            + (f", or {'/'.join(sorted(amp))} autocast overflowed" if amp else "")
                            + ". Check the models (`dsf evaluate tiles`)"
                            + (", or set infer.amp to false (--no-amp)" if amp else ""),
                        )
                    sink.join()
                finally:  # the writer stops before its work directory is removed
                    sink.join(raise_error=False)
                    writer.close()
                n_windows = stitcher.windows
                bar.close()
                if probs_tmp is not None:
                    write_ome_attrs(probs_tmp, p.classes[1:], out_mpp)
                levels = writer.levels
                lap("predict")
                with atomic_path(out_map) as tmp:
                    write_tiff(
                        tmp,
                        levels,
                        out_mpp,
                        len(p.classes),
                        settings["tile"],
                        settings["threads"],
                        classes=list(p.classes),
                    )
                lap("tiff")
                finer = int(math.floor(math.log2(thumb_mpp / out_mpp)))
                level = min(len(levels) - 1, max(0, finer))
                small = levels[level]
                small = small.asarray() if isinstance(small, TileSpool) else small
                overlay = render_overlay(
                    thumb.result(),
                    small,
                    p.classes,
                    title=f"{slide.slide_id}: predicted classes",
                    mpp=thumb_mpp,
                    counts=writer.counts,
                )
                with atomic_path(out_overlay) as tmp:
                    save_picture(overlay, tmp, out_overlay, 90, "--out-overlay")
                lap("overlay")
            finally:
                thumbs.shutdown(wait=True, cancel_futures=True)
                remove_scratch(work)
            ow, oh = grid.out_size
            meta = {
                "slide": slide.slide_id,
                "init": p.init,
                "fraction": p.meta.get("fraction"),
                "mpp": out_mpp,
                "width": ow,
                "height": oh,
                "classes": p.classes,
                "windows": n_windows,
                "stride": grid.stride,
                "block": grid.block,
                "scale": grid.scale,
                "target_mpp": t,
                "slide_mpp": slide.mpp,  # level 0's: coarser than target_mpp means upsampled
                # map pixels (at "mpp") per class index (0: background), for the areas (dsf.areas)
                "class_pixels": [int(n) for n in writer.counts],
                "seconds": round(time.perf_counter() - t0, 3),
                "phase_seconds": phases,
                "settings": settings,
                "dsf_version": __version__,
                **(extra_meta or {}),
            }
            with atomic_path(out_meta) as tmp:
                tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    except BaseException:
        # what this run renamed into place so far goes too: no map without its JSON
        for done in (out_map, out_overlay, out_meta):
            remove(done)
        raise
    log.info(
        "%s: %d windows run (%d over tissue, %d again at band edges) in %.1f s -> %s",
        slide.slide_id,
        n_windows,
        int(run_grid.sum()),
        n_windows - int(run_grid.sum()),
        meta["seconds"],
        out_map,
    )
    return meta


def default_routing(preds: list[Predictor], slide_id: str) -> str:
    """The routing a map made by hand records when `--routing` is not given, read from its
    models: several are an ensemble; one is its fold's model, out of fold unless the slide is
    among its fit or selection slides."""
    from dsf.model_sets import trained_on

    if len(preds) > 1:
        return "ensemble"
    return "fold" if slide_id in trained_on(preds[0].meta) else "out_of_fold"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsf infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--slide", required=True, type=Path, help="slide file")
    p.add_argument("--slide-id", help="slide id (default: file stem)")
    p.add_argument("--sheet-mpp", type=float, help="mpp from the sheet (overrides the file)")
    add_tolerance_argument(p)
    p.add_argument("--tissue-mask", required=True, type=Path, help="tissue mask of dsf tissue")
    p.add_argument("--models", nargs="+", required=True, type=Path, help="model.pt (averaged)")
    p.add_argument(
        "--routing",
        choices=ROUTINGS,
        help="how the models were chosen, recorded in the map's JSON for `dsf evaluate slide`: "
        "out_of_fold (an annotated slide, by the model of the fold that held it out), ensemble "
        "(every fold's model averaged), fold (one fold's model), given (models trained "
        "elsewhere: a prediction run, or maps made by hand from new models). Default: from "
        "the models, ensemble for several, fold for one that trained on the slide, else "
        "out_of_fold",
    )
    p.add_argument("--out-map", required=True, type=Path, help="class map (.tiff)")
    p.add_argument("--out-overlay", required=True, type=Path, help="overlay (.jpg)")
    p.add_argument("--out-meta", required=True, type=Path, help="metadata (.json)")
    p.add_argument("--out-probs", type=Path, help="probabilities (OME-Zarr, .zarr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_section_arguments(
        p, "infer", skip=("inits", "fraction", "unlabelled_fold", "probabilities", "gpus")
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsf infer`: one slide -> class map, overlay, metadata."""
    args = _parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        from dsf.devices import use_device
        from dsf.tissue import check_mask_fits, read_mask

        outputs = [args.out_map, args.out_overlay, args.out_meta, args.out_probs]
        picture_format(args.out_overlay, "--out-overlay")
        check_outputs(outputs, [args.slide, args.tissue_mask, *args.models])
        st = section_from_args(args, "infer")
        device = use_device(st["device"], "infer.device")
        preds = [load_predictor(m, device, st["amp"]) for m in args.models]
        slide = open_slide(
            args.slide, args.sheet_mpp, args.slide_id, mpp_tolerance=args.mpp_tolerance
        )
        mask, mask_mpp = read_mask(args.tissue_mask, slide.slide_id)
        check_mask_fits(mask, mask_mpp, slide, args.tissue_mask)
        infer_slide(
            slide,
            mask,
            mask_mpp,
            preds,
            st,
            args.out_map,
            args.out_overlay,
            args.out_meta,
            args.out_probs,
            extra_meta={
                "models": [str(m) for m in args.models],
                "folds": [int(pr.meta.get("fold", -1)) for pr in preds],
                "routing": args.routing or default_routing(preds, slide.slide_id),
            },
            progress=not args.no_progress,
        )

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
