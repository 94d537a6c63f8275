"""Models: stage encoders, SimSiam heads and the DSF-WSI pretraining model (DESIGN section 5)."""

from dsf.models.dsf import METHODS, DSFModel, draw_perms, keep_count
from dsf.models.encoders import BACKBONES, StageEncoder, build_encoder
from dsf.models.heads import Predictor, Projector, negative_cosine, simsiam_loss

__all__ = [
    "BACKBONES",
    "METHODS",
    "DSFModel",
    "Predictor",
    "Projector",
    "StageEncoder",
    "build_encoder",
    "draw_perms",
    "keep_count",
    "negative_cosine",
    "simsiam_loss",
]
