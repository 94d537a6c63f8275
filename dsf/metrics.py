"""Segmentation losses and metrics (DESIGN sections 4-5: Dice loss; F1 and accuracy tables).

Label convention: 0 = unlabelled/ignore, 1..K the classes. Models output one channel per class
index, channel 0 included (HookNet's 6 outputs for BCSS's ignore + 5 classes); losses and
metrics use only labelled pixels and the foreground classes 1..K.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F  # noqa: N812 - torch convention
from torch import Tensor


def soft_dice_loss(logits: Tensor, labels: Tensor, eps: float = 1e-6) -> Tensor:
    """Multiclass soft Dice over the foreground classes (HookNet's loss, DESIGN section 5).

    `logits` (B, C, H, W) with channel c = class c, `labels` (B, H, W) with 0 ignored. Per class
    c in 1..C-1, Dice = 2 sum(p y) / (sum p + sum y) over the labelled pixels of the batch
    (softmax over all C channels); classes absent from the batch's labels do not enter the mean
    (segmentation_models_pytorch's DiceLoss averages over every class, an absent one adding 0
    loss, so its loss shrinks with the share of classes a batch lacks). Returns 1 - mean Dice,
    or 0 (with a graph) when nothing is labelled.
    """
    c = logits.shape[1]
    valid = (labels > 0).unsqueeze(1)
    probs = (logits.float().softmax(dim=1) * valid)[:, 1:]
    onehot = (F.one_hot(labels.long(), c).permute(0, 3, 1, 2) * valid)[:, 1:]
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    card = probs.sum(dims) + onehot.sum(dims)
    present = (onehot.sum(dims) > 0).float()
    n = present.sum()
    dice = (2 * inter + eps) / (card + eps)
    # the mean over present classes, written without a data-dependent branch or boolean index
    # (either would make the host wait for the GPU at every step)
    return (1.0 - (dice * present).sum() / n.clamp_min(1.0)) * (n > 0)


def confusion(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K + 1) counts over labelled pixels (labels > 0): rows = true class 1..K, columns =
    predicted class 1..K, and a last column for 'predicted background' (0, e.g. outside the
    tissue of a map), which counts as a miss of the true class."""
    m = labels > 0
    t = labels[m].astype(np.int64) - 1
    if t.size and int(t.max()) >= n_classes:
        raise ValueError(
            f"label value {int(t.max()) + 1} is beyond the {n_classes} foreground classes "
            "(labels must be class indices of labels.classes)"
        )
    p = pred[m].astype(np.int64) - 1
    p = np.where((p < 0) | (p >= n_classes), n_classes, p)
    cm = np.bincount(t * (n_classes + 1) + p, minlength=n_classes * (n_classes + 1))
    return cm.reshape(n_classes, n_classes + 1)


def scores(cm: np.ndarray) -> dict[str, object]:
    """Per-class F1 (= Dice), pixel accuracy, macro and micro F1 from a (K, K[+1]) confusion.

    A class absent from both truth and prediction has F1 NaN and is left out of the macro mean.
    Micro F1 pools every class's TP, FP and FN: it equals the accuracy unless labelled pixels
    are predicted background (the last column), which are misses of their class but no class's
    false positive, so the micro F1 is then the higher.
    """
    k = cm.shape[0]
    tp = np.diag(cm[:, :k]).astype(np.float64)
    fn = cm.sum(1) - tp
    fp = cm[:, :k].sum(0) - tp
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    total = cm.sum()
    acc = float(tp.sum() / total) if total else float("nan")
    macro = float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")
    pooled = float(denom.sum())
    micro = float(2 * tp.sum() / pooled) if pooled else float("nan")
    return {"f1": f1, "accuracy": acc, "macro_f1": macro, "micro_f1": micro}
