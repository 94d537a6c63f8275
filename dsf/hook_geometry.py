"""Where HookNet's hook sits, from the patch geometry alone (DESIGN section 5): no torch, so the
workflow checks `patches.block` and `patches.scale` when it starts without loading a model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dsf.errors import ConfigError


@dataclass(frozen=True)
class HookGeometry:
    """Where the hook sits (DESIGN 5).

    depth: 1-based context decoder block whose output is hooked.
    stride: context input pixels per cell of that output (= target bottleneck stride / scale).
    crop: (rows, cols) slices of that output covering the target's field of view.
    cells: side of the crop in cells (= side of the target bottleneck).
    """

    depth: int
    stride: int
    crop: tuple[slice, slice]
    cells: int

    @property
    def box(self) -> tuple[int, int]:
        """The crop in context-input pixels, [start, stop) on both axes."""
        rows = self.crop[0]
        return rows.start * self.stride, rows.stop * self.stride


def hook_geometry(scale: int, input_size: int, strides: Sequence[int]) -> HookGeometry:
    """Hook depth and crop from the geometry (DESIGN 5).

    The target bottleneck's cell is `strides[-1]` target px = strides[-1] / scale context px;
    decoder block i outputs stride strides[-1] / 2**i, so the hook depth is log2(scale). The
    target's field of view is the centre input_size / scale context px, which must be whole cells.

    Args:
        scale: context pixel size / target pixel size (tile size / input_size).
        input_size: side of both inputs in px.
        strides: output strides of the encoder maps, stem first (e.g. 2, 4, 8, 16, 32).

    Raises:
        ValueError: no decoder depth has the target bottleneck's pixel size, or the crop is not
            whole cells; the message names the setting.
    """
    strides = tuple(int(s) for s in strides)
    if any(b != 2 * a for a, b in zip(strides, strides[1:], strict=False)):
        raise ValueError(f"encoder strides {strides} do not halve resolution at every map")
    bottleneck = strides[-1]
    decoder_strides = [bottleneck // 2**i for i in range(1, len(strides) + 1)]
    depth = round(math.log2(scale)) if scale > 0 else 0
    if scale < 2 or 2**depth != scale or not 1 <= depth <= len(decoder_strides):
        raise ValueError(
            f"scale {scale}: no context decoder depth has the target bottleneck's pixel size "
            f"({bottleneck}/{scale} context px; decoder strides {decoder_strides}); "
            "use a power of 2 between 2 and "
            f"{2 ** len(decoder_strides)}"
        )
    stride = decoder_strides[depth - 1]
    fov = input_size / scale
    start = (input_size - fov) / 2
    if input_size % bottleneck or fov % stride or start % stride:
        raise ValueError(
            f"input_size {input_size} at scale {scale}: the target's field of view "
            f"(context px [{start}:{start + fov}]) is not whole cells of {stride} px of the "
            f"context decoder block {depth}, or not whole cells of the {bottleneck} px bottleneck"
        )
    first, cells = int(start) // stride, int(fov) // stride
    crop = slice(first, first + cells)
    return HookGeometry(depth=depth, stride=stride, crop=(crop, crop), cells=cells)


#: Output strides of every supported encoder's maps, stem first (all reduce 32x).
ENCODER_STRIDES = (2, 4, 8, 16, 32)


def check_unet(block: int) -> None:
    """Refuse a block the U-Net baseline (finetune init unet) cannot segment: its decoder joins
    each encoder stage, and the encoder halves the block five times, so the block must be a
    multiple of the last stride; a ConfigError naming `patches.block` and blocks that fit."""
    stride = ENCODER_STRIDES[-1]
    if block % stride:
        first = max(1, block // stride)
        fits = ", ".join(str(stride * k) for k in range(first, block // stride + 4))
        raise ConfigError(
            f"patches.block {block} does not fit the U-Net baseline (finetune init unet): its "
            f"encoder halves the block five times, so it must be a multiple of {stride}: use "
            f"patches.block {fits}, ... (or leave unet out of finetune.inits)"
        )


def check_hook(block: int, scale: int) -> None:
    """Refuse a patch geometry HookNet cannot hook (`hook_geometry` with the encoders' strides),
    as a ConfigError naming `patches.block` and `patches.scale` and blocks that would fit."""
    try:
        hook_geometry(scale, block, ENCODER_STRIDES)
    except ValueError as exc:
        fits = []
        for b in range(16, 1025, 16):
            try:
                hook_geometry(scale, b, ENCODER_STRIDES)
            except ValueError:
                continue
            fits.append(b)
        hint = f"patches.block {', '.join(map(str, fits[:4]))}, ..." if fits else "another scale"
        raise ConfigError(
            f"patches.block {block} at patches.scale {scale} does not fit HookNet ({exc}): use "
            f"{hint} (or finetune.inits [unet] only)"
        ) from exc
