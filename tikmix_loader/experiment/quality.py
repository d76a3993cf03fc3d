"""The quality side of the QuaDMix experiment methods: criteria, filters, implied weights, noise served.

``docs/quadmix.md`` ("Experiment") describes the methods these serve: ``uniform-docs``, the single-criterion
``topk-<criterion>`` filters, ``quadmix`` and ``quadmix+tikmix-d``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tikmix_loader.data.corpus import noise_labels
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.noise import NOISE_KINDS
from tikmix_loader.errors import ConfigError
from tikmix_loader.quality import QualityParams, QualitySampler, read_scores
from tikmix_loader.quality.sampler import ORIENTATIONS
from tikmix_loader.quality.scorers import DEFAULT_CRITERIA
from tikmix_loader.quality.search import implied_domain_weights


def parse_criteria(text: str) -> dict[str, str]:
    """Criteria from ``"name,name:higher,..."``: a built-in scorer's name takes its own orientation
    (``DEFAULT_CRITERIA``), any other name ``"lower"`` unless ``:higher`` or ``:lower`` follows it."""
    criteria = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, orientation = item.partition(":")
        orientation = orientation or DEFAULT_CRITERIA.get(name, "lower")
        if orientation not in ORIENTATIONS or name in criteria:
            raise ConfigError(
                f"Quality criteria {text!r}: {item!r} must be NAME or NAME:{'|'.join(ORIENTATIONS)}, each "
                "name once."
            )
        criteria[name] = orientation
    if not criteria:
        raise ConfigError(
            f"Quality criteria {text!r}: name at least one criterion (e.g. 'ref_ppl,repetition')."
        )
    return criteria


def topk_params(criteria: Sequence[str], criterion: str, keep: float) -> QualityParams:
    """A single-criterion filter: every document within the best ``keep`` share of tokens by ``criterion``
    once per epoch, the rest never (one-hot ``alpha``, ``eta = eps = 0``, so ``S`` is 1 up to ``omega``)."""
    if criterion not in criteria:
        raise ConfigError(
            f"topk-{criterion}: {criterion!r} is not one of the experiment's criteria {list(criteria)}; add "
            "it with --quadmix-criteria."
        )
    alpha = tuple(float(name == criterion) for name in criteria)
    return QualityParams(alpha=alpha, lam=0.0, omega=keep, eta=0.0, eps=0.0)


class ScoredDomains:
    """Train domains with their scores under ``criteria`` (read once): what a parameter set does to them.

    Args:
        domains (Sequence[Domain]): The train split.
        criteria (Mapping[str, str]): Criterion name -> orientation, in the order of every ``alpha``.
    """

    def __init__(self, domains: Sequence[Domain], criteria: Mapping[str, str]):
        self.domains = list(domains)
        self.criteria = dict(criteria)
        self.scores = {domain.name: read_scores(domain, self.criteria) for domain in self.domains}

    def expected_copies(self, params: Mapping[str, QualityParams]) -> dict[str, np.ndarray]:
        """Each domain's expected copies per document (1 for a domain without parameters)."""
        return {
            domain.name: (
                QualitySampler(
                    domain.name,
                    self.scores[domain.name],
                    domain.doc_lengths,
                    self.criteria,
                    params[domain.name],
                ).expected_copies
                if domain.name in params
                else np.ones(domain.num_docs)
            )
            for domain in self.domains
        }

    def expected_tokens(self, params: Mapping[str, QualityParams]) -> dict[str, float]:
        """Each domain's expected sampled tokens per epoch."""
        copies = self.expected_copies(params)
        return {domain.name: float(copies[domain.name] @ domain.doc_lengths) for domain in self.domains}

    def implied_weights(self, params: Mapping[str, QualityParams]) -> dict[str, float]:
        """The domain weights ``params`` imply: expected sampled tokens per domain, normalised."""
        copies = self.expected_copies(params)
        return implied_domain_weights(copies, {domain.name: domain.doc_lengths for domain in self.domains})

    def keeps(self, params: Mapping[str, QualityParams], min_tokens: float) -> bool:
        """Whether every domain samples at least ``min_tokens`` tokens per epoch in expectation."""
        return min(self.expected_tokens(params).values()) >= min_tokens


def served_noise(corpus: str | Path, domains: Sequence[Domain], served: Mapping[str, np.ndarray]) -> dict:
    """How much of each injected noise kind a run served, from its per-document served tokens.

    Returns, per kind (``noise_kinds`` of the corpus manifest, plus ``"noisy"`` for all kinds together):
    ``share`` (its share of the served tokens), ``pool`` (its share of the train split's tokens) and
    ``rate`` (``share / pool``: 1 for sampling blind to quality, 0 for never serving it). Empty when the
    corpus has no noise labels.
    """
    served_by_label = np.zeros(len(NOISE_KINDS) + 1)
    pool_by_label = np.zeros(len(NOISE_KINDS) + 1)
    for domain in domains:
        try:
            labels = np.asarray(noise_labels(corpus, domain.name), dtype=np.int64)
        except ConfigError:
            return {}
        tokens = np.asarray(served[domain.name], dtype=np.float64)
        if labels.shape != (domain.num_docs,) or tokens.shape != labels.shape:
            raise ConfigError(
                f"Domain {domain.name!r}: {labels.shape} noise labels and {tokens.shape} served counts for "
                f"{domain.num_docs} documents; rebuild the corpus."
            )
        served_by_label += np.bincount(labels, weights=tokens, minlength=len(served_by_label))
        pool_by_label += np.bincount(labels, weights=domain.doc_lengths, minlength=len(pool_by_label))
    kinds = {kind: [k + 1] for k, kind in enumerate(NOISE_KINDS)} | {
        "noisy": list(range(1, len(NOISE_KINDS) + 1))
    }
    report = {}
    for kind, rows in kinds.items():
        share = served_by_label[rows].sum() / max(served_by_label.sum(), 1.0)
        pool = pool_by_label[rows].sum() / max(pool_by_label.sum(), 1.0)
        report[kind] = {
            "share": float(share),
            "pool": float(pool),
            "rate": float(share / pool) if pool else None,
        }
    return report
