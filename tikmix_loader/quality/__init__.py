"""QuaDMix quality sampling: per-document scores stored with the data and the sampling function over them."""

from tikmix_loader.quality.sampler import QualityParams, QualitySampler, criteria_from, weighted_percentiles
from tikmix_loader.quality.scores import list_criteria, read_scores, scores_dir, write_scores

__all__ = [
    "QualityParams",
    "QualitySampler",
    "criteria_from",
    "list_criteria",
    "read_scores",
    "scores_dir",
    "weighted_percentiles",
    "write_scores",
]
