"""SimSiam heads and loss, as Dense SimSiam Learning uses them (paper III-C and III-E, DESIGN 5).

Every (stage, group) pair of DSL owns one `Projector` g and one `Predictor` h. With z = g(q) and
p = h(z) for the features q of two views, the loss is the symmetric negative cosine of Eq. (2),
with a stop-gradient on the z side: each view's encoder learns only through its own p.

The heads take one view's rows, (R, d), or both views at once, (R, V, d) with view v in
[:, v]. The paired form computes exactly what V separate calls compute (batch-norm statistics
stay per view, as SimSiam's separate forwards give them) with one matmul and one batch-norm call
per layer instead of V: the 24 heads of a training step are many small kernels, and on a GPU
issuing them, not running them, is most of what they cost.

Their batch norms keep no running statistics: the heads are trained, never evaluated, and
dropped after pretraining (only the encoders go on to fine-tuning).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Predictor", "Projector", "negative_cosine", "paired_simsiam_loss", "simsiam_loss"]


def _norm(d: int, affine: bool = True) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(d, affine=affine, track_running_stats=False)


def _per_view_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """Batch norm of (R, V, d) with statistics per view and channel, in one call.

    The (R, V * d) view of x has one column per (view, channel), so the plain batch norm of its
    columns is the batch norm of each view alone. SyncBatchNorm (several GPUs) takes one view
    at a time: its statistics are gathered over the processes per call.
    """
    if type(norm) is not nn.BatchNorm1d:  # SyncBatchNorm, after convert_sync_batchnorm
        return torch.stack([norm(x[:, v]) for v in range(x.shape[1])], dim=1)
    r, v, d = x.shape
    weight = norm.weight.repeat(v) if norm.weight is not None else None
    bias = norm.bias.repeat(v) if norm.bias is not None else None
    y = F.batch_norm(x.reshape(r, v * d), None, None, weight, bias, training=True, eps=norm.eps)
    return y.view(r, v, d)


def _drop_running_stats(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Checkpoints written before the heads dropped their running statistics still load."""
    for i, layer in enumerate(module.children()):
        if isinstance(layer, _BatchNorm) and not layer.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                state.pop(f"{prefix}{i}.{name}", None)


class _Head(nn.Sequential):
    """An MLP head that runs one view (R, d) or several at once (R, V, d) (module docstring)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.register_load_state_dict_pre_hook(_drop_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        if x.dim() != 3:
            raise ValueError(f"expected (rows, d) or (rows, views, d), got {tuple(x.shape)}")
        for layer in self:
            if isinstance(layer, _BatchNorm):  # BatchNorm1d, or SyncBatchNorm under DDP
                x = _per_view_norm(layer, x)
            elif isinstance(layer, nn.ReLU):  # in place on a view would cost autograd copies
                x = F.relu(x)
            else:
                x = layer(x)
        return x


class Projector(_Head):
    """Three-layer MLP projector g, hidden and output width d (paper IV-B, model configurations).

    Linear(d,d, no bias)-BN-ReLU, twice, then Linear(d,d, no bias)-BN(affine=False), as in SimSiam;
    3 d^2 + 4 d parameters.
    """

    def __init__(self, d: int) -> None:
        super().__init__(
            nn.Linear(d, d, bias=False),
            _norm(d),
            nn.ReLU(inplace=True),
            nn.Linear(d, d, bias=False),
            _norm(d),
            nn.ReLU(inplace=True),
            nn.Linear(d, d, bias=False),
            _norm(d, affine=False),
        )


class Predictor(_Head):
    """Two-layer bottleneck MLP predictor h, d -> d/4 -> d (paper IV-B, model configurations).

    Linear(d, d/4, no bias)-BN-ReLU-Linear(d/4, d) with bias, as in SimSiam.
    """

    def __init__(self, d: int) -> None:
        hidden = max(1, d // 4)
        super().__init__(
            nn.Linear(d, hidden, bias=False),
            _norm(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, d),
        )


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """D(p, z) of Eq. (1): minus the cosine similarity of p and stopgrad(z), averaged over rows.

    Computed in float32 so that autocast (bf16/fp16) does not coarsen the loss.
    """
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric SimSiam loss of Eq. (2)-(6): 0.5 D(p1, z2) + 0.5 D(p2, z1), in [-1, 1]."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def paired_simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """`simsiam_loss` (Eq. 2) of two views held as (R, 2, d): each view's p against the
    other's z.

    Both views have R rows, so the mean over all 2R rows is the mean of the two D terms.
    """
    if p.dim() != 3 or p.shape[1] != 2 or z.shape != p.shape:
        raise ValueError(f"expected p and z of shape (rows, 2, d), got {p.shape} and {z.shape}")
    return negative_cosine(p, z.flip(1))
