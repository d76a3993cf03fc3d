"""QuaDMix's per-document sampling function: quality scores and parameters -> copies of each document.

For one domain (``docs/methods.md`` §8, choices in ``docs/quadmix.md``):

1. each criterion's scores become token-weighted percentiles ``p`` in ``[0, 1]`` within the domain, oriented
   so that 0 is the best document, then tail scores ``-ln(1 - p)`` (ours: the paper's ``sigma``; see below);
2. the merged score ``q = sum_n alpha[n] * sigma_n``;
3. ``r`` = the token-weighted percentile of ``q`` within the domain;
4. expected copies ``S(r) = (2 / (1 + exp(-lambda (omega - r)))) ** eta + eps`` for ``r <= omega``,
   else ``eps``;
5. an epoch takes ``floor(S)`` copies of each document plus one more with probability ``frac(S)``, drawn from
   a generator keyed by ``(seed, domain, epoch)`` so that every rank and every resume draws the same copies.

Why tail scores rather than plain percentiles: each kind of bad document is usually flagged by one criterion
alone (boilerplate by repetition, fragments by line structure). A weighted mean of percentiles puts such a
document mid-rank (0.99 on one criterion, 0.5 on three others merges to about 0.6), so no cut-off drops it
without dropping clean documents too. ``-ln(1 - p)`` is the standard exponential quantile of ``p``: the
scores of a criterion average 1 while its worst 1% score above 4.6, so one criterion that flags a
document is enough to rank it last. Measured in ``docs/quadmix.md`` ("Merging criteria").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from tikmix_loader.data.shuffle import QUALITY_COPIES, rng_for
from tikmix_loader.errors import ScoreError

ORIENTATIONS = ("lower", "higher")  # which end of a criterion's raw scores is the better document


@dataclasses.dataclass(frozen=True)
class QualityParams:
    """QuaDMix parameters of one domain.

    Args:
        alpha (tuple[float, ...]): Weight of each criterion in the merged score (>= 0, not all 0), in the
            order of the sampler's ``criteria``.
        lam (float): Steepness ``lambda`` of the sigmoid (>= 0).
        omega (float): Cut-off percentile in ``[0, 1]``: documents ranked above it get only ``eps`` copies.
        eta (float): Exponent ``eta`` (>= 0); the best document gets ``2 ** eta`` copies plus ``eps``.
        eps (float): Copies of every document past the cut-off (>= 0).
    """

    alpha: tuple[float, ...]
    lam: float
    omega: float
    eta: float
    eps: float

    def __post_init__(self):
        alpha = tuple(float(a) for a in self.alpha)
        object.__setattr__(self, "alpha", alpha)
        numbers = {"lam": self.lam, "omega": self.omega, "eta": self.eta, "eps": self.eps}
        for name, value in [*numbers.items(), *((f"alpha[{i}]", a) for i, a in enumerate(alpha))]:
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ScoreError(f"QualityParams: `{name}` must be a finite number >= 0, got {value!r}.")
        if not alpha or sum(alpha) == 0:
            raise ScoreError(f"QualityParams: `alpha` needs at least one positive weight, got {alpha}.")
        if self.omega > 1:
            raise ScoreError(f"QualityParams: `omega` is a percentile in [0, 1], got {self.omega}.")

    def copies_at(self, r: np.ndarray) -> np.ndarray:
        """Expected copies ``S(r)`` at percentiles ``r``."""
        r = np.asarray(r, dtype=np.float64)
        with np.errstate(over="ignore"):
            boost = (2.0 / (1.0 + np.exp(-self.lam * (self.omega - r)))) ** self.eta
        return np.where(r <= self.omega, boost, 0.0) + self.eps

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "alpha": list(self.alpha)}

    @classmethod
    def from_dict(cls, values: Mapping) -> QualityParams:
        try:
            return cls(**{key: values[key] for key in ("alpha", "lam", "omega", "eta", "eps")})
        except (KeyError, TypeError) as exc:
            raise ScoreError(
                f"QualityParams: expected keys alpha, lam, omega, eta, eps; got {dict(values)!r} ({exc})."
            ) from None


def weighted_percentiles(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Token-weighted mid-rank percentile of each value in ``[0, 1]``; equal values share one percentile.

    ``p = (weight of smaller values + half the weight of equal values) / total weight``.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    unique, inverse = np.unique(values, return_inverse=True)
    group_weight = np.bincount(inverse, weights=weights, minlength=len(unique))
    below = np.concatenate(([0.0], np.cumsum(group_weight)[:-1]))
    total = group_weight.sum()
    return ((below + 0.5 * group_weight) / total)[inverse] if total > 0 else np.full(len(values), 0.5)


def tail_scores(percentiles: np.ndarray) -> np.ndarray:
    """``-ln(1 - p)``: percentiles mapped to the standard exponential quantiles, so a bad tail stands out."""
    return -np.log1p(-np.minimum(percentiles, _MAX_PERCENTILE))


_MAX_PERCENTILE = 1 - 1e-12  # a zero-token document can sit at exactly 1


class QualitySampler:
    """Copies of each document of one domain under QuaDMix parameters.

    Args:
        domain_name (str): For error messages and the random key.
        scores (Mapping[str, np.ndarray]): Raw scores per criterion, one per document (storage order).
        doc_lengths (np.ndarray): Tokens per document (the percentile weights).
        criteria (Mapping[str, str]): Criterion name -> ``"lower"`` or ``"higher"`` (which raw end is better),
            in the order ``params.alpha`` follows.
        params (QualityParams): The domain's parameters.
    """

    def __init__(
        self,
        domain_name: str,
        scores: Mapping[str, np.ndarray],
        doc_lengths: np.ndarray,
        criteria: Mapping[str, str],
        params: QualityParams,
    ):
        self.domain_name = domain_name
        self.criteria = dict(criteria)
        self.params = params
        lengths = np.asarray(doc_lengths, dtype=np.float64)
        if len(params.alpha) != len(self.criteria):
            raise ScoreError(
                f"Domain {domain_name!r}: `alpha` has {len(params.alpha)} weights but there are "
                f"{len(self.criteria)} criteria {list(self.criteria)}."
            )
        merged = np.zeros(len(lengths))
        for weight, (name, orientation) in zip(params.alpha, self.criteria.items()):
            if orientation not in ORIENTATIONS:
                raise ScoreError(
                    f"Criterion {name!r}: orientation must be one of {ORIENTATIONS}, got {orientation!r}."
                )
            if name not in scores:
                raise ScoreError(f"Domain {domain_name!r}: no scores for criterion {name!r}.")
            raw = np.asarray(scores[name], dtype=np.float64)
            if raw.shape != lengths.shape:
                raise ScoreError(
                    f"Domain {domain_name!r}: criterion {name!r} has {raw.shape} scores for "
                    f"{len(lengths)} documents."
                )
            oriented = raw if orientation == "lower" else -raw
            merged += weight * tail_scores(weighted_percentiles(oriented, lengths))
        self.percentiles = weighted_percentiles(merged, lengths)
        self.expected_copies = params.copies_at(self.percentiles)

    def copies(self, seed: int, domain_key: int, epoch: int) -> np.ndarray:
        """Copies of each document in ``epoch``: ``floor(S)`` plus one with probability ``frac(S)``."""
        whole = np.floor(self.expected_copies)
        draws = rng_for(seed, domain_key, epoch, QUALITY_COPIES).random(len(whole))
        extra = draws < self.expected_copies - whole
        return (whole + extra).astype(np.int64)


def criteria_from(names: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """A criteria mapping from a list of names (all ``"lower"``) or a name -> orientation mapping."""
    return dict(names) if isinstance(names, Mapping) else {name: "lower" for name in names}
