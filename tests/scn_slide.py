"""Write small Leica SCN slides for the reader tests (tifffile).

An SCN slide is a tiled BigTIFF whose first directory's ImageDescription is an XML document in
the `http://www.leica-microsystems.com/scn/2010/10/01` namespace. Its `<collection>` (the whole
glass slide; sizes in nm) holds `<image>` elements, each placed by a `<view>` (size and offset in
nm) and listing its resolutions as `<pixels><dimension sizeX sizeY r ifd/>` entries pointing at
TIFF directories. The image whose view covers the whole collection at (0, 0) is the macro;
OpenSlide reads it as the `macro` associated image. The others (brightfield only) are the main
images, composited into one pyramid the size of the collection: OpenSlide's level-0 dimensions
are the collection size (the `plane` here), not the main image's, each main image sits at its
view offset, pixels outside every main image read as transparent (alpha 0), and
`openslide.bounds-*` give the main images' bounding box, which is the rectangle QuPath crops to.
um/px comes from the level-0 directory's XResolution / YResolution in pixels per cm.

Pixels here are uncompressed RGB in 256-pixel tiles, so reads can be compared exactly. Coarser
levels are block means, `downsample` (4, as Leica's scanners write them) times smaller each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

XMLNS = "http://www.leica-microsystems.com/scn/2010/10/01"
TILE = 256
#: The macro image is this many times coarser than level 0.
MACRO_DOWNSAMPLE = 16


def _shrink(rgb: np.ndarray, d: int) -> np.ndarray:
    """`rgb` reduced `d` times by block means (edges that do not fill a block are dropped)."""
    h, w = rgb.shape[0] // d, rgb.shape[1] // d
    blocks = rgb[: h * d, : w * d].reshape(h, d, w, d, 3).mean((1, 3))
    return np.rint(blocks).astype(np.uint8)


def _image(name: str, view: tuple[int, int, int, int], dims: list[tuple[int, int, int]]) -> str:
    """One `<image>`: its view (width, height, x, y in nm) and dimensions (width, height, ifd)."""
    w, h, x, y = view
    pixels = "".join(
        f'<dimension sizeX="{dw}" sizeY="{dh}" r="{r}" ifd="{ifd}"/>'
        for r, (dw, dh, ifd) in enumerate(dims)
    )
    return (
        f'<image name="{name}"><creationDate>2024-01-01T00:00:00Z</creationDate>'
        '<device model="Leica SCN400;Leica SCN" version="1.5.1.10864"/>'
        f'<pixels sizeX="{dims[0][0]}" sizeY="{dims[0][1]}">{pixels}</pixels>'
        f'<view sizeX="{w}" sizeY="{h}" offsetX="{x}" offsetY="{y}" spacingZ="0"/>'
        "<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings>"
        "<illuminationSettings><numericalAperture>0.4</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource></illuminationSettings>"
        "</scanSettings></image>"
    )


def write_scn(
    path: Path,
    rgb: np.ndarray,
    mpp: float,
    offset: tuple[int, int],
    plane: tuple[int, int],
    levels: int = 1,
    *,
    downsample: int = 4,
) -> None:
    """Write a Leica SCN slide whose main (brightfield) image `rgb` (H, W, 3 uint8) lies at
    `offset` (x, y, level-0 px) in a collection of `plane` (W, H level-0 px), at `mpp` um/px.

    OpenSlide then reports `dimensions == plane` and bounds `offset` + (W, H). The main image
    has `levels` resolutions, each `downsample` times coarser than the one before; use sizes and
    offsets divisible by downsample ** (levels - 1) for a pyramid without rounding. Positions
    are stored at round(mpp * 1000) nm per pixel."""
    h, w = rgb.shape[:2]
    (x, y), (pw, ph) = offset, plane
    if x < 0 or y < 0 or x + w > pw or y + h > ph or (x, y, w, h) == (0, 0, pw, ph):
        raise ValueError("the main image must lie inside the plane and be smaller than it")
    nm = max(1, round(mpp * 1000))  # nm per level-0 pixel
    pyramid = [_shrink(rgb, downsample**i) if i else rgb for i in range(levels)]
    m = MACRO_DOWNSAMPLE  # a white slide with a nearest-neighbour thumbnail of the tissue
    macro = np.full((max(1, ph // m), max(1, pw // m), 3), 255, np.uint8)
    my, mx = y // m, x // m
    thumb = rgb[::m, ::m][: macro.shape[0] - my, : macro.shape[1] - mx]
    macro[my : my + thumb.shape[0], mx : mx + thumb.shape[1]] = thumb
    # directory 0 is the macro (it carries the XML), then the main image's levels
    main_dims = [(p.shape[1], p.shape[0], 1 + i) for i, p in enumerate(pyramid)]
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{XMLNS}">'
        f'<collection name="test" uuid="00000000-0000-0000-0000-000000000000" '
        f'sizeX="{pw * nm}" sizeY="{ph * nm}"><barcode>dGVzdA==</barcode>'
        + _image("macro", (pw * nm, ph * nm, 0, 0), [(macro.shape[1], macro.shape[0], 0)])
        + _image("main", (w * nm, h * nm, x * nm, y * nm), main_dims)
        + "</collection></scn>"
    )
    res = 1e4 / mpp  # pixels per cm
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(macro, photometric="rgb", tile=(TILE, TILE), description=xml, metadata=None)
        for i, p in enumerate(pyramid):
            r = res / downsample**i
            tif.write(
                p,
                photometric="rgb",
                tile=(TILE, TILE),
                compression=None,
                metadata=None,
                resolution=(r, r),
                resolutionunit="CENTIMETER",
            )
