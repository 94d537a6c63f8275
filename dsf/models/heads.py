"""SimSiam heads and loss, as Dense SimSiam Learning uses them (paper III-C and III-E, DESIGN 5).

Every (stage, group) pair of DSL owns one `Projector` g and one `Predictor` h. With z = g(q) and
p = h(z) for the features q of two views, the loss is the symmetric negative cosine of Eq. (2),
with a stop-gradient on the z side: each view's encoder learns only through its own p.
"""

from __future__ import annotations

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

__all__ = ["Predictor", "Projector", "negative_cosine", "simsiam_loss"]


class Projector(nn.Sequential):
    """Three-layer MLP projector g, hidden and output width d (paper IV-B, model configurations).

    Linear(d,d, no bias)-BN-ReLU, twice, then Linear(d,d, no bias)-BN(affine=False), as in SimSiam;
    3 d^2 + 4 d parameters.
    """

    def __init__(self, d: int) -> None:
        super().__init__(
            nn.Linear(d, d, bias=False),
            nn.BatchNorm1d(d),
            nn.ReLU(inplace=True),
            nn.Linear(d, d, bias=False),
            nn.BatchNorm1d(d),
            nn.ReLU(inplace=True),
            nn.Linear(d, d, bias=False),
            nn.BatchNorm1d(d, affine=False),
        )


class Predictor(nn.Sequential):
    """Two-layer bottleneck MLP predictor h, d -> d/4 -> d (paper IV-B, model configurations).

    Linear(d, d/4, no bias)-BN-ReLU-Linear(d/4, d) with bias, as in SimSiam.
    """

    def __init__(self, d: int) -> None:
        hidden = max(1, d // 4)
        super().__init__(
            nn.Linear(d, hidden, bias=False),
            nn.BatchNorm1d(hidden),
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
