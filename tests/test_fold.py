"""Batch-norm folding for prediction (`dsf.models.fold`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsf.models.fold import fold_batchnorm
from dsf.models.hooknet import HookNet

from conftest import DEVICE


def _randomise_norms(model: nn.Module) -> None:
    """Running statistics and affine parameters far from the identity, so folding shows."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen))


@pytest.mark.parametrize("backbone", ["resnet18", "regnety_800mf", "efficientnet_b0"])
def test_folded_hooknet_predicts_the_same(backbone: str, exact_float32: None) -> None:
    torch.manual_seed(0)
    model = HookNet(3, backbone=backbone, input_size=64).eval()
    _randomise_norms(model)
    model = model.to(DEVICE, memory_format=torch.channels_last)  # as dsf.predict runs it
    x, y = (torch.rand(2, 3, 64, 64, device=DEVICE) for _ in "xy")
    with torch.no_grad():
        ref = model(x, y)[0]
        n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        folded = fold_batchnorm(model)
        left = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        out = model(x, y)[0]
    assert folded > 0 and folded + left == n_norms
    if backbone == "resnet18":  # every norm of a ResNet HookNet follows a convolution
        assert (folded, left) == (60, 0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_folding_refuses_a_training_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm2d)
