"""Stage-feature encoders from torchvision backbones (DESIGN section 5, paper section III-E).

An encoder is cut into a stem (everything up to output stride 2) and four stages (output strides
4, 8, 16, 32); the classifier (and EfficientNet's final 1x1 conv) is dropped. `forward` returns the
global-average-pooled output of each stage, which is what Dense SimSiam Learning compares;
`forward_maps` returns the un-pooled maps a U-Net decoder (HookNet) needs. The cut is found by a
dry forward that measures each block's output stride, and the stage widths are measured the same
way, so nothing about the architecture is a constant here.

Weights start random. A local torchvision state dict (e.g. `resnet18-f37072fd.pth`) can be loaded:
its keys are mapped onto this module's by tensor identity at build time, the keys of the dropped
head are ignored and any other mismatch is an error that names the keys. Nothing is downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import Tensor, nn

__all__ = ["BACKBONES", "StageEncoder", "build_encoder", "load_torchvision_weights"]

_PROBE_PX = 64  # dry-forward input size: divisible by the deepest stride (32)
_STAGE_STRIDES = (4, 8, 16, 32)
_BN_COUNTER = "num_batches_tracked"


def _resnet_blocks(model: nn.Module) -> list[str]:
    return ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def _regnet_blocks(model: nn.Module) -> list[str]:
    return ["stem"] + [f"trunk_output.{name}" for name, _ in model.trunk_output.named_children()]


def _efficientnet_blocks(model: nn.Module) -> list[str]:
    # The last entry of `features` is the 1x1 conv to 1280 channels that feeds the classifier.
    return [f"features.{i}" for i in range(len(model.features) - 1)]


# name -> (torchvision constructor, ordered body blocks up to stride 32, by their module paths)
BACKBONES: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module], list[str]]]] = {
    "resnet18": (tvm.resnet18, _resnet_blocks),
    "resnet34": (tvm.resnet34, _resnet_blocks),
    "regnety_800mf": (tvm.regnet_y_800mf, _regnet_blocks),
    "efficientnet_b0": (tvm.efficientnet_b0, _efficientnet_blocks),
}


class StageEncoder(nn.Module):
    """A backbone as `stem` + four `stages`; returns the four pooled stage features (the
    multi-stage features of Dense SimSiam learning, paper III-E).

    Attributes:
        name: backbone name (a key of `BACKBONES`).
        stem: modules up to output stride 2 (`stem_dim` channels).
        stages: four modules ending at output strides 4, 8, 16 and 32.
        dims: channels of the four stage outputs, measured by a dry forward.
        key_map: torchvision state-dict key -> key of this module (empty if not built from one).
        ignored_keys: torchvision keys of the dropped head, skipped when loading a weights file.
    """

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        key_map: dict[str, str] | None = None,
        ignored_keys: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        if len(stages) != 4:
            raise ValueError(f"{name}: expected 4 stages, got {len(stages)}")
        self.name = name
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.key_map = dict(key_map or {})
        self.ignored_keys = ignored_keys
        maps = _probe(self.stem, self.stages)
        self.stem_dim: int = maps[0].shape[1]
        dims = tuple(int(m.shape[1]) for m in maps[1:])
        self.dims: tuple[int, int, int, int] = dims  # type: ignore[assignment]

    def forward_maps(self, x: Tensor, include_stem: bool = False) -> list[Tensor]:
        """The four stage maps (strides 4 to 32); with `include_stem`, the stride-2 map first."""
        x = self.stem(x)
        maps = [x] if include_stem else []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> list[Tensor]:
        """Global-average-pooled stage outputs, four tensors of shape (B, dims[i])."""
        return [m.mean(dim=(2, 3)) for m in self.forward_maps(x)]


@torch.no_grad()
def _probe(stem: nn.Module, stages: Sequence[nn.Module]) -> list[Tensor]:
    """Outputs of the stem and each stage on one blank image, in eval mode (no BN update)."""
    modules = [stem, *stages]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        x = torch.zeros(1, 3, _PROBE_PX, _PROBE_PX)
        outs = []
        for m in modules:
            x = m(x)
            outs.append(x)
    finally:
        for m, flag in zip(modules, was_training, strict=True):
            m.train(flag)
    return outs


def _split_by_stride(model: nn.Module, paths: list[str]) -> list[list[str]]:
    """Group body blocks into [stem (stride <= 2), stages at strides 4-32] by a dry forward."""
    groups: list[list[str]] = [[] for _ in range(1 + len(_STAGE_STRIDES))]
    model.eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, _PROBE_PX, _PROBE_PX)
        for path in paths:
            x = model.get_submodule(path)(x)
            stride = _PROBE_PX // x.shape[-1]
            if stride <= 2:
                groups[0].append(path)
            elif stride in _STAGE_STRIDES:
                groups[1 + _STAGE_STRIDES.index(stride)].append(path)
            else:
                raise ValueError(f"block {path} has output stride {stride}; expected 2-32")
    model.train()
    if any(not g for g in groups):
        raise ValueError(f"cannot cut {type(model).__name__} into a stem and 4 stages: {groups}")
    return groups


def _sequential(model: nn.Module, paths: list[str]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((p.replace(".", "_"), model.get_submodule(p)) for p in paths))


def build_encoder(name: str = "resnet18", weights: str | Path | None = None) -> StageEncoder:
    """A randomly initialised `StageEncoder`, optionally loaded from a local torchvision file.

    Args:
        name: one of `BACKBONES` (resnet18, resnet34, regnety_800mf, efficientnet_b0).
        weights: path of a torchvision state dict for the same architecture, or None.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    ctor, blocks = BACKBONES[name]
    model = ctor(weights=None)
    groups = _split_by_stride(model, blocks(model))
    stem = _sequential(model, groups[0])
    stages = [_sequential(model, g) for g in groups[1:]]
    holder = nn.Module()
    holder.stem, holder.stages = stem, nn.ModuleList(stages)
    ours = {id(t): k for k, t in holder.state_dict(keep_vars=True).items()}
    key_map: dict[str, str] = {}
    ignored: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in ours:
            key_map[key] = ours[id(tensor)]
        else:
            ignored.add(key)
    encoder = StageEncoder(name, stem, stages, key_map, frozenset(ignored))
    if weights is not None:
        load_torchvision_weights(encoder, weights)
    return encoder


def _names(keys: Sequence[str] | set[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_torchvision_weights(encoder: StageEncoder, path: str | Path) -> None:
    """Load a local torchvision state dict into `encoder`, ignoring only the dropped head's keys.

    Raises:
        ValueError: the file is not a state dict, or has missing, unexpected or mis-shaped keys
            (e.g. it belongs to another architecture); the message names them.
    """
    from dsf import checkpoints

    path = Path(path)
    state = checkpoints.load(path, "cpu")  # weights only; unreadable files name themselves
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a torchvision state dict (a mapping of names to tensors)")
    unexpected = {k for k in state if k not in encoder.key_map and k not in encoder.ignored_keys}
    # Files saved before BatchNorm counted its batches lack these counters; they do not matter.
    missing = {k for k in set(encoder.key_map) - set(state) if not k.endswith(_BN_COUNTER)}
    if unexpected or missing:
        raise ValueError(
            f"{path} does not fit backbone {encoder.name!r}: "
            f"missing keys [{_names(missing)}]; unexpected keys [{_names(unexpected)}]"
        )
    own = encoder.state_dict()
    renamed = dict(own) | {encoder.key_map[k]: v for k, v in state.items() if k in encoder.key_map}
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(own[encoder.key_map[k]].shape)}"
        for k, v in state.items()
        if k in encoder.key_map and v.shape != own[encoder.key_map[k]].shape
    ]
    if wrong:
        raise ValueError(f"{path} does not fit backbone {encoder.name!r}: shapes {_names(wrong)}")
    encoder.load_state_dict(renamed, strict=True)
