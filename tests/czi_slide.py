"""Write small Zeiss CZI slides for the reader tests.

A CZI file (ZISRAW) is a chain of segments, each a 16-byte name, its allocated and used sizes,
then its data: the file header (where the other segments are), one subblock per tile (its
directory entry: pixel type, compression and the dimensions X, Y, C, M and S, then its pixels),
the subblock directory, the metadata XML (image size, scenes, um/px in metres) and the
attachment directory. Axio Scan slides hold one pyramid per scene (a tissue section): a subblock
of a coarser level spans `size` full-resolution pixels in `stored size` pixels. Pixels here are
uncompressed BGR24, which OpenSlide reads as scanners' JPEG XR ones, so reads can be compared
exactly. Written from the ZISRAW segment layout, with no CZI library (those write the Z and T
dimensions, which brightfield slides lack and OpenSlide refuses).
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import numpy as np

#: Segments start on 32-byte boundaries, as Zeiss's own writers place them.
ALIGN = 32
BGR24, UNCOMPRESSED = 3, 0


def _segment(name: str, data: bytes, used: int | None = None) -> bytes:
    """One segment: its name, sizes and data, padded to `ALIGN` bytes."""
    pad = (-len(data)) % ALIGN
    size = len(data) + pad
    head = struct.pack("<16sqq", name.encode(), size, len(data) if used is None else used)
    return head + data + b"\0" * pad


def _entry(position: int, dims: list[tuple[str, int, int, int]]) -> bytes:
    """A DirectoryEntryDV: BGR24, uncompressed, at file `position`, with its dimensions
    (name, start, size, stored size)."""
    head = struct.pack("<2siqiibx4xi", b"DV", BGR24, position, 0, UNCOMPRESSED, 0, len(dims))
    return head + b"".join(struct.pack("<4siifi", d.encode(), a, n, 0.0, s) for d, a, n, s in dims)


def write_czi(
    path: Path,
    scenes: list[tuple[int, int, np.ndarray]],
    mpp: float,
    tile: int = 128,
    downsamples: tuple[int, ...] = (1, 4),
) -> None:
    """Write `scenes` (level-0 x, y of its top-left and its RGB image each) as one CZI slide
    of `mpp` um/px with a pyramid of `downsamples` per scene, in `tile`-pixel subblocks."""
    body = bytearray(_segment("ZISRAWFILE", b"\0" * 512))  # rewritten once positions are known
    entries: list[bytes] = []
    mosaic = 0
    for s, (x0, y0, rgb) in enumerate(scenes):
        h, w = rgb.shape[:2]
        for d in downsamples:
            small = rgb[: h // d * d, : w // d * d].reshape(h // d, d, w // d, d, 3).mean((1, 3))
            small = np.rint(small).astype(np.uint8)
            for ty in range(0, small.shape[0], tile):
                for tx in range(0, small.shape[1], tile):
                    px = small[ty : ty + tile, tx : tx + tile]
                    th, tw = px.shape[:2]
                    dims = [
                        ("X", x0 + tx * d, tw * d, tw),
                        ("Y", y0 + ty * d, th * d, th),
                        ("C", 0, 1, 1),
                        ("M", mosaic, 1, 1),
                        ("S", s, 1, 1),
                    ]
                    mosaic += 1
                    entry = _entry(len(body), dims)
                    pixels = np.ascontiguousarray(px[..., ::-1]).tobytes()
                    head = struct.pack("<iiq", 0, 0, len(pixels)) + entry
                    body += _segment("ZISRAWSUBBLOCK", head.ljust(256, b"\0") + pixels)
                    entries.append(entry)
    directory = len(body)
    listed = struct.pack("<i124x", len(entries)) + b"".join(entries)
    body += _segment("ZISRAWDIRECTORY", listed)
    right = max(x + rgb.shape[1] for x, _, rgb in scenes) - min(x for x, _, _ in scenes)
    bottom = max(y + rgb.shape[0] for _, y, rgb in scenes) - min(y for _, y, _ in scenes)
    metres = f"{mpp * 1e-6:.6E}"
    xml = (
        "<ImageDocument><Metadata><Information><Image>"
        f"<SizeX>{right}</SizeX><SizeY>{bottom}</SizeY><SizeS>{len(scenes)}</SizeS>"
        "<PixelType>Bgr24</PixelType></Image></Information><Scaling><Items>"
        f'<Distance Id="X"><Value>{metres}</Value></Distance>'
        f'<Distance Id="Y"><Value>{metres}</Value></Distance>'
        "</Items></Scaling></Metadata></ImageDocument>"
    ).encode()
    metadata = len(body)
    body += _segment("ZISRAWMETADATA", struct.pack("<ii248x", len(xml), 0) + xml)
    attachments = len(body)
    body += _segment("ZISRAWATTDIR", struct.pack("<i252x", 0))
    guid = uuid.uuid4().bytes
    header = struct.pack(
        "<iiii16s16siqqiq", 1, 0, 0, 0, guid, guid, 0, directory, metadata, 0, attachments
    )
    body[: 32 + 512] = _segment("ZISRAWFILE", header.ljust(512, b"\0"))
    path.write_bytes(bytes(body))
