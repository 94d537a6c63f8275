"""HookNet and the single-branch U-Net baseline for fine-tuning (DESIGN section 5; paper IV-B).

HookNet as the published DSF-WSI code builds it: two U-Nets of the same encoder type, in the
style of segmentation_models_pytorch's `Unet` (encoder depth 5 = the stride-2 stem plus four
stages; decoder channels (256, 128, 64, 32, 16); each decoder block is a nearest 2x upsample, the
concatenated encoder skip of the same resolution (none for the last block) and two
Conv3x3-BN-ReLU; a Conv3x3 segmentation head at the input resolution).

The context branch sees the tile resized to `input_size` (`scale` times coarser), the target
branch the centre `input_size` crop at full resolution. The hook: the context decoder's output
whose pixel has the physical size of the target bottleneck's pixel is cropped to the window that
covers the target's field of view and concatenated to the target bottleneck before the target
decoder. Both the depth and the window are computed from the geometry (`hook_geometry`): with
scale 4 and 256 px inputs the target bottleneck is 8x8 cells of 32 target px = 8 context px, so the
hook is the second decoder block's output (stride 8, 32x32) cropped to its centre 8x8 = context
pixels [96:160], and the target decoder starts from 512 + 128 channels (ResNet-18).

ResNet-18 HookNet at 256 px with 6 classes (BCSS: ignore + 5 classes, DESIGN section 5) has
28,952,780 parameters: two encoders 2 x 11,176,512, target decoder 3,446,464, context decoder
3,151,552, two heads 2 x (16 * 6 * 9 + 6) = 1,740.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from dsf.hook_geometry import HookGeometry, hook_geometry
from dsf.models.encoders import StageEncoder, build_encoder

__all__ = [
    "DECODER_CHANNELS",
    "DecoderBlock",
    "HookGeometry",
    "HookNet",
    "UNet",
    "UNetDecoder",
    "encoder_strides",
    "hook_geometry",
]

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class ConvBNReLU(nn.Sequential):
    """Conv3x3 (no bias) - BatchNorm - ReLU, as smp's `Conv2dReLU` with batch norm."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Nearest 2x upsample, concatenate the skip (if any), two Conv3x3-BN-ReLU (DESIGN 5)."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.conv2 = ConvBNReLU(out_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """x upsampled 2x, joined with `skip`, through the two convolutions."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """smp-style U-Net decoder over [stem, stage1..stage4] maps (strides 2, 4, 8, 16, 32): each
    HookNet branch's decoder (paper III-F, IV-B; DESIGN 5).

    Block i (1-based) upsamples by 2 and takes the encoder map of matching resolution as skip
    (stage3, stage2, stage1, stem, then none), so its output stride is bottleneck stride / 2**i.
    `bottleneck_extra` channels (HookNet's hook) are concatenated to the bottleneck by the caller.

    Args:
        encoder_channels: channels of the stem and the four stage maps, shallow to deep.
        decoder_channels: output channels of the blocks, deep to shallow (one per encoder map).
        bottleneck_extra: channels added to the bottleneck before the first block.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int] = DECODER_CHANNELS,
        bottleneck_extra: int = 0,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(
                f"decoder_channels {tuple(decoder_channels)} needs one entry per encoder map "
                f"(depth {len(encoder_channels)})"
            )
        enc = list(encoder_channels)[::-1]  # deep to shallow
        in_chs = [enc[0] + bottleneck_extra, *decoder_channels[:-1]]
        skip_chs = [*enc[1:], 0]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o)
            for i, s, o in zip(in_chs, skip_chs, decoder_channels, strict=True)
        )
        self.out_channels = tuple(int(c) for c in decoder_channels)
        _init_decoder(self)

    def forward(
        self, maps: Sequence[Tensor], hook: Tensor | None = None, blocks: int | None = None
    ) -> list[Tensor]:
        """Outputs of every block (of the first `blocks`), deep to shallow; `hook` is
        concatenated to the bottleneck."""
        x = maps[-1] if hook is None else torch.cat([maps[-1], hook], dim=1)
        skips: list[Tensor | None] = [*list(maps[:-1])[::-1], None]
        n = len(self.blocks) if blocks is None else blocks
        outs = []
        for block, skip in zip(self.blocks[:n], skips[:n], strict=True):
            x = block(x, skip)
            outs.append(x)
        return outs


def _init_decoder(module: nn.Module) -> None:
    """smp's `initialize_decoder`: Kaiming-uniform convs, zero biases, unit BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Float32Head(nn.Conv2d):
    """A segmentation head whose logits are float32 also under autocast: bf16 logits (8 bits
    of mantissa, steps of 1/32 near 4) tie between close classes, and argmax then always
    picks the lower class index, a bias towards the first classes in maps and scores. The
    head's cost is a few channels at full resolution; its weights are a Conv2d's."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _head(in_ch: int, n_classes: int) -> nn.Conv2d:
    """smp's `SegmentationHead`: Conv3x3 to the classes (Xavier-uniform, zero bias)."""
    head = Float32Head(in_ch, n_classes, 3, padding=1)
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def encoder_strides(encoder: StageEncoder, input_size: int) -> tuple[int, ...]:
    """Output strides of the stem and the four stages, measured by a dry forward in eval mode."""
    was_training = encoder.training
    encoder.eval()
    try:
        maps = encoder.forward_maps(torch.zeros(1, 3, input_size, input_size), include_stem=True)
    finally:
        encoder.train(was_training)
    strides = []
    for m in maps:
        if input_size % m.shape[-1]:
            raise ValueError(
                f"input_size {input_size} is not a multiple of encoder {encoder.name!r}'s map "
                f"size {m.shape[-1]}; use a multiple of 32"
            )
        strides.append(input_size // m.shape[-1])
    return tuple(strides)


def _key_problems(
    own: Mapping[str, Tensor], given: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """Missing, unexpected and mis-shaped keys of `given` against `own`."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(
        f"{k} {tuple(getattr(given[k], 'shape', ()))} != {tuple(own[k].shape)}"
        for k in set(own) & set(given)
        if not isinstance(given[k], Tensor) or given[k].shape != own[k].shape
    )
    return missing, unexpected, wrong


def _names(keys: Sequence[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class HookNet(nn.Module):
    """HookNet, two U-Nets joined by the hook (DESIGN section 5; van Rijthoven et al. 2021).

    Args:
        n_classes: output classes including the ignore class 0 (6 for BCSS, DESIGN 5).
        backbone: encoder name of both branches (see `dsf.models.encoders.BACKBONES`).
        scale: context pixel size / target pixel size (4: a 1024 px tile resized to 256).
        input_size: side of both inputs in px.
        decoder_channels: block widths of both decoders, deep to shallow.
        weights: optional local torchvision weights file for both encoders (ImageNet baseline).

    Attributes:
        hook_depth: 1-based context decoder block whose output is hooked.
        hook_crop: (rows, cols) slices of that output that cover the target's field of view.
        hook_stride: context input px per cell of that output; `geometry.box` is the crop in px.
    """

    def __init__(
        self,
        n_classes: int,
        backbone: str = "resnet18",
        scale: int = 4,
        input_size: int = 256,
        decoder_channels: Sequence[int] = DECODER_CHANNELS,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = n_classes
        self.backbone = backbone
        self.scale = scale
        self.input_size = input_size
        self.context_encoder = build_encoder(backbone, weights)
        self.target_encoder = build_encoder(backbone, weights)
        self.strides = encoder_strides(self.target_encoder, input_size)
        self.geometry = hook_geometry(scale, input_size, self.strides)
        self.hook_depth = self.geometry.depth
        self.hook_crop = self.geometry.crop
        self.hook_stride = self.geometry.stride
        enc_channels = (self.context_encoder.stem_dim, *self.context_encoder.dims)
        self.hook_channels = int(decoder_channels[self.hook_depth - 1])
        self.context_decoder = UNetDecoder(enc_channels, decoder_channels)
        self.target_decoder = UNetDecoder(enc_channels, decoder_channels, self.hook_channels)
        self.context_head = _head(decoder_channels[-1], n_classes)
        self.target_head = _head(decoder_channels[-1], n_classes)

    def _check(self, x: Tensor, name: str) -> None:
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"{name} must be (B, C, {self.input_size}, {self.input_size}) (the hook crop "
                f"is computed for input_size {self.input_size}), got {tuple(x.shape)}"
            )

    def forward(
        self, context: Tensor, target: Tensor, context_logits: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """(target logits, context logits), each (B, n_classes, input_size, input_size).

        Prediction needs the target's logits only: with `context_logits` False the context
        decoder stops at the hook (its blocks past the hook and the context head, a third of
        the model's work at the highest resolutions, are skipped) and the context logits are
        None; the target logits are the same either way.
        """
        self._check(context, "context")
        self._check(target, "target")
        c_maps = self.context_encoder.forward_maps(context, include_stem=True)
        c_outs = self.context_decoder(c_maps, blocks=None if context_logits else self.hook_depth)
        rows, cols = self.hook_crop
        hook = c_outs[self.hook_depth - 1][:, :, rows, cols]
        t_maps = self.target_encoder.forward_maps(target, include_stem=True)
        t_outs = self.target_decoder(t_maps, hook=hook)
        c_logits = self.context_head(c_outs[-1]) if context_logits else None
        return self.target_head(t_outs[-1]), c_logits

    def load_encoders(
        self, state: Mapping[str, Any] | str | Path, strict: bool = True
    ) -> dict[str, list[str]]:
        """Load both encoders from `DSFModel.encoder_state()` (or the `encoders.pt` holding it).

        With `strict`, any missing or unexpected key is an error; without it they are loaded
        around and returned ({"context.missing": [...], ...}), never silently dropped. A backbone
        name mismatch or a mis-shaped tensor is always an error.

        Raises:
            ValueError: backbone mismatch, or missing/unexpected/mis-shaped keys; names them.
        """
        if isinstance(state, str | Path):
            from dsf.checkpoints import load  # weights_only; a bad file is a ConfigError

            state = load(Path(state))
        if not isinstance(state, Mapping) or not {"context", "target"} <= set(state):
            keys = sorted(map(str, state))[:8] if isinstance(state, Mapping) else type(state)
            raise ValueError(
                f"encoder state needs 'context' and 'target' state dicts (got {keys}): it is "
                "not the encoders.pt of `dsf pretrain`"
            )
        problems: list[str] = []
        report: dict[str, list[str]] = {}
        for branch, encoder in (
            ("context", self.context_encoder),
            ("target", self.target_encoder),
        ):
            missing, unexpected, wrong = _key_problems(encoder.state_dict(), state[branch])
            report[f"{branch}.missing"], report[f"{branch}.unexpected"] = missing, unexpected
            if wrong:
                problems.append(f"{branch}: mis-shaped [{_names(wrong)}]")
            if strict and missing:
                problems.append(f"{branch}: missing keys [{_names(missing)}]")
            if strict and unexpected:
                problems.append(f"{branch}: unexpected keys [{_names(unexpected)}]")
        given = state.get("backbone")
        if given is not None and given != self.backbone:
            problems.insert(0, f"backbone {given!r} != this HookNet's {self.backbone!r}")
        dims = state.get("dims")
        if dims is not None and tuple(dims) != tuple(self.context_encoder.dims):
            problems.append(f"dims {tuple(dims)} != {self.context_encoder.dims}")
        if problems:
            raise ValueError("encoder state does not fit: " + "; ".join(problems))
        for branch, encoder in (
            ("context", self.context_encoder),
            ("target", self.target_encoder),
        ):
            own = encoder.state_dict()
            merged = dict(own) | {k: v for k, v in state[branch].items() if k in own}
            encoder.load_state_dict(merged, strict=True)
        return report


class UNet(nn.Module):
    """Single-branch U-Net on target patches only (the baseline of DESIGN 5 / issue 4).

    Same encoder and the same `UNetDecoder` as one HookNet branch, without the hook.
    """

    def __init__(
        self,
        n_classes: int,
        backbone: str = "resnet18",
        decoder_channels: Sequence[int] = DECODER_CHANNELS,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.backbone = backbone
        self.encoder = build_encoder(backbone, weights)
        self.decoder = UNetDecoder((self.encoder.stem_dim, *self.encoder.dims), decoder_channels)
        self.head = _head(decoder_channels[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, n_classes, H, W); H and W multiples of 32."""
        return self.head(self.decoder(self.encoder.forward_maps(x, include_stem=True))[-1])
