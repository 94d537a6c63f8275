"""Dice loss and F1/accuracy against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsf.metrics import confusion, scores, soft_dice_loss


def test_dice_loss_by_hand() -> None:
    # 1 image, channels ignore + 2 classes, 2 x 2 px; labels: class 1, class 2, class 2, ignore
    labels = torch.tensor([[[1, 2], [2, 0]]])
    p1 = torch.tensor([[0.8, 0.3], [0.4, 0.9]])  # probability of class 1 per pixel
    p0 = torch.full_like(p1, 1e-12)  # (almost) nothing on the ignore channel
    logits = torch.stack([torch.log(p0), torch.log(p1), torch.log(1 - p1)]).unsqueeze(0)
    # labelled pixels only: class 1: inter 0.8, sum p 0.8+0.3+0.4 = 1.5, sum y 1
    d1 = 2 * 0.8 / (1.5 + 1)
    # class 2: p2 = 0.2, 0.7, 0.6; inter 0.7 + 0.6; sum p 1.5; sum y 2
    d2 = 2 * 1.3 / (1.5 + 2)
    got = soft_dice_loss(logits, labels)
    assert got.item() == pytest.approx(1 - (d1 + d2) / 2, abs=1e-5)


def test_dice_loss_softmax_spans_the_ignore_channel() -> None:
    """The probabilities are a softmax over all C channels, ignore channel included, then
    channel 0 dropped (the docstring's definition): mass the model puts on channel 0 is mass
    taken from the classes. The test above pins channel 0 near zero, where a softmax over the
    foreground channels alone gives the same loss; here channel 0 holds 0.3 or 0.1."""
    # 1 image, channels ignore + 2 classes, 1 x 3 px; labels: class 1, class 2, unlabelled
    labels = torch.tensor([[[1, 2, 0]]])
    p = torch.tensor(
        [
            [0.3, 0.3, 0.1],  # ignore channel
            [0.6, 0.2, 0.1],  # class 1
            [0.1, 0.5, 0.8],  # class 2
        ]
    )
    logits = torch.log(p).unsqueeze(1).unsqueeze(0)  # (1, 3, 1, 3): softmax gives back p
    # labelled pixels only (the third is left out whatever it holds):
    # class 1: inter 0.6, sum p 0.6 + 0.2 = 0.8, sum y 1 -> Dice 1.2 / 1.8 = 2/3
    # class 2: inter 0.5, sum p 0.1 + 0.5 = 0.6, sum y 1 -> Dice 1.0 / 1.6 = 5/8
    want = 1 - (2 / 3 + 5 / 8) / 2
    assert soft_dice_loss(logits, labels).item() == pytest.approx(want, abs=1e-5)
    # a softmax over channels 1..2 alone would give 1 - (0.8 + 10/13) / 2, another loss
    assert abs(want - (1 - (0.8 + 10 / 13) / 2)) > 0.05


def test_dice_loss_skips_absent_classes_and_is_zero_when_perfect() -> None:
    labels = torch.tensor([[[1, 1], [1, 0]]])  # class 2 and 3 absent
    logits = torch.full((1, 4, 2, 2), -20.0)
    logits[:, 1] = 20.0
    assert soft_dice_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-5)
    # mass on an absent class counts against the present one only: class 1 Dice
    # 2 * 1.8 / (1.8 + 3) = 0.75; class 2 (absent, 0.4 per pixel) does not enter the mean
    p = torch.tensor([1e-12, 0.6, 0.4]).view(1, 3, 1, 1).expand(1, 3, 1, 3)
    three = torch.tensor([[[1, 1, 1]]])
    assert soft_dice_loss(torch.log(p), three).item() == pytest.approx(0.25, abs=1e-5)
    logits.requires_grad_(True)
    loss = soft_dice_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    loss.backward()  # nothing labelled: zero, with a graph
    assert loss.item() == 0.0 and logits.grad is not None


def test_f1_accuracy_by_hand_with_an_absent_class() -> None:
    truth = np.array([1, 1, 1, 2, 2, 0, 0])
    pred = np.array([1, 1, 2, 2, 0, 3, 1])  # one pixel predicted background (0)
    cm = confusion(pred, truth, 3)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    s = scores(cm)
    # class 1: tp 2 fp 0 fn 1 -> 4/5; class 2: tp 1 fp 1 fn 1 -> 2/4; class 3 absent -> NaN
    assert s["f1"][0] == pytest.approx(0.8) and s["f1"][1] == pytest.approx(0.5)
    assert math.isnan(s["f1"][2])
    assert s["macro_f1"] == pytest.approx(0.65)
    assert s["accuracy"] == pytest.approx(3 / 5)
    # pooled: tp 3, fp 1 (the 2 predicted for a 1), fn 2 (that pixel and the background one)
    assert s["micro_f1"] == pytest.approx(6 / 9)
    # without a background prediction, micro F1 is the accuracy
    no_bg = scores(np.array([[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]]))
    assert no_bg["micro_f1"] == pytest.approx(no_bg["accuracy"]) == pytest.approx(4 / 5)


def test_a_label_beyond_the_classes_is_named() -> None:
    with pytest.raises(ValueError, match="label value 4 is beyond the 3 foreground classes"):
        confusion(np.array([1, 2]), np.array([1, 4]), 3)
