"""Shared fixtures: the real slides beside the repository and tiny synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("DSF_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
#: where the device-dependent tests run their models: the CPU here and in CI; `cuda` in the
#: device run of bench/gpu.sh, so the same assertions check the GPU paths (pinned copies, AMP).
DEVICE = os.environ.get("DSF_TEST_DEVICE", "cpu")


def pytest_configure(config: pytest.Config) -> None:
    """Fail at once, not by skipping, when the real scanner files are not where CI lays them."""
    if not (REAL / "CMU-1-Small-Region.svs").is_file():
        raise pytest.UsageError(
            f"real slides not found at {REAL}: the tests read ../shared/data/real beside the "
            "repository; set DSF_REAL_DATA to its location"
        )


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real scanner files (../shared/data/real); CI lays it beside the clone."""
    return REAL


@pytest.fixture
def exact_float32():  # noqa: ANN201 - a context fixture
    """float32 convolutions and matrix products without TF32 on a GPU (cuDNN uses TF32 by
    default there, about 1e-3 relative), for tests that compare two float32 computations to
    1e-4; nothing changes on the CPU."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


SYNTH_CLASSES = ["ignore", "TUM", "STR", "LYM"]


def rgb_slide(path: Path, rgb: object, mpp: float, tile: int = 256) -> Path:
    """A one-level tiled RGB TIFF slide whose resolution tags say `mpp` um/px (the generic
    TIFF reader's path)."""
    import tifffile

    tifffile.imwrite(
        path,
        rgb,
        photometric="rgb",
        tile=(tile, tile),
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )
    return path


def aperio_xml(layers: list[tuple[str, list[list[list[float]]]]]) -> str:
    """Aperio ImageScope annotation XML as ImageScope writes it: one layer per (name, rings),
    the first ring a freehand region, the others its negative regions."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<Annotations MicronsPerPixel="0.5">']
    for li, (name, rings) in enumerate(layers, 1):
        out.append(f'<Annotation Id="{li}" Name="{name}" LineColor="65280" Visible="1">')
        out.append('<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>')
        out.append('<Regions><RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/>')
        out.append("</RegionAttributeHeaders>")
        for ri, ring in enumerate(rings, 1):
            out.append(f'<Region Id="{ri}" Type="0" Text="" NegativeROA="{int(ri > 1)}">')
            out.append("<Attributes/><Vertices>")
            out += [f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y, *_ in ring]
            out.append("</Vertices></Region>")
        out.append("</Regions><Plots/></Annotation>")
    out.append("</Annotations>")
    return "\n".join(out)


def geojson_as_aperio(geojson: Path, xml: Path) -> Path:
    """The polygons of a GeoJSON FeatureCollection as Aperio XML, one layer per polygon named
    by its class (so each hole cuts only its own polygon, as in the GeoJSON)."""
    import json

    layers = []
    for feat in json.loads(geojson.read_text())["features"]:
        geom, name = feat["geometry"], feat["properties"]["classification"]["name"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        layers += [(name, rings) for rings in polys]
    xml.write_text(aperio_xml(layers))
    return xml


@pytest.fixture
def norm_bars(monkeypatch: pytest.MonkeyPatch) -> list[bool | None]:
    """The `disable` of every normalisation progress bar made while the test runs (the bar of
    `dsf.norm.store_stats`), recorded in order."""
    from dsf import norm

    bars: list[bool | None] = []
    real_tqdm = norm.tqdm

    def bar(*args: Any, disable: bool | None, **kwargs: Any) -> Any:
        bars.append(disable)
        return real_tqdm(*args, disable=disable, **kwargs)

    monkeypatch.setattr(norm, "tqdm", bar)
    return bars


def noise_store(path: Path, n: int = 12, side: int = 1024) -> Path:
    """A patch store of `n` noise tiles (incompressible, so a batch is megabytes), one chunk
    file per tile."""
    import numpy as np
    import zarr

    g = zarr.open_group(str(path), mode="w")
    tiles = g.create_array(
        "tiles", shape=(n, side, side, 3), chunks=(1, side, side, 3), dtype="uint8"
    )
    tiles[:] = np.random.default_rng(0).integers(0, 256, tiles.shape, dtype=np.uint8)
    # one slide per store, cut as a real one would be (block x scale = the tile's side)
    g.attrs.update(
        {"n_tiles": n, "slide_id": path.stem, "block": side // 4, "scale": 4, "target_mpp": 0.25}
    )
    return path


def _synthetic_store(
    folder: Path,
    name: str,
    seed: int,
    *,
    block: int,
    stride: int,
    scale: int = 4,
    labelled: bool = False,
) -> Any:
    """A patch store cut at 1 um/px from a 1024 x 1024 synthetic slide at 0.5 um/px; with
    `labelled` a `LabelledStore`: the store and its labels store."""
    from dsf.annotations import open_labels
    from dsf.config import defaults
    from dsf.patches import extract
    from dsf.slide import open_slide
    from dsf.synth import write_synthetic_slide
    from dsf.tile_labels import LabelledStore, build, labels_store_path
    from dsf.tissue import detect_tissue

    labels_tiff = folder / f"{name}.labels.tiff" if labelled else None
    write_synthetic_slide(
        folder / f"{name}.tiff",
        seed=seed,
        width=1024,
        height=1024,
        mpp=0.5,
        tile=256,
        quality=90,
        region_um=150,
        labels_tiff=labels_tiff,
    )
    slide = open_slide(folder / f"{name}.tiff", slide_id=name)
    mask, _ = detect_tissue(slide.thumbnail(8.0), 8.0, defaults("tissue"))
    classes = defaults("labels") | {"classes": SYNTH_CLASSES}
    st = defaults("patches") | {
        "target_mpp": 1.0,
        "block": block,
        "scale": scale,
        "stride": stride,
        "min_tissue": 0.3,
    }
    out = folder / f"{name}.zarr"
    extract(slide, mask, 8.0, out, st, progress=False)
    if labels_tiff is None:
        return out
    labels = open_labels(labels_tiff, name, slide.dimensions, slide.mpp, classes)
    lab = labels_store_path(out)
    build(out, labels, lab, classes, st["min_label_frac"], progress=False)
    return LabelledStore(name, out, lab)


@pytest.fixture(scope="session")
def make_store():  # noqa: ANN201 - returns the builder
    """Builder of small patch stores from synthetic slides (see `_synthetic_store`)."""
    return _synthetic_store
