"""QuaDMix quality sampling: per-document scores stored with the data and the sampling function over them."""

from tikmix_loader.quality.config import QualityConfig
from tikmix_loader.quality.sampler import (
    QualityParams,
    QualitySampler,
    criteria_from,
    tail_scores,
    weighted_percentiles,
)
from tikmix_loader.quality.scores import list_criteria, read_scores, scores_dir, write_scores

__all__ = [
    "QualityConfig",
    "QualityParams",
    "QualitySampler",
    "criteria_from",
    "list_criteria",
    "read_scores",
    "scores_dir",
    "tail_scores",
    "weighted_percentiles",
    "write_scores",
]
