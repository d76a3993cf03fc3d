"""QuaDMix's parameter search: sample parameter sets, regress proxy loss on them, keep the best predicted.

The steps (``docs/methods.md`` §8; our choices in ``docs/quadmix.md``, "Search and joint mode"):

1. :func:`sample_quadmix_params` draws parameter sets after the paper's Algorithm 1. Per domain ``m`` and
   criterion ``n``, ``alpha[n, m] = g[n] * d[n, m]`` renormalised over ``n``, with a global weight
   ``g ~ U(0, 1)`` shared by every domain and a per-domain weight ``d ~ U(0, 1)``; ``lambda = 10 ** (3 u)``
   (the paper's "x 10^3" read on a log scale, so sets range from soft to step-like cut-offs);
   ``omega = 0.1 u``; ``eta = eta_max u``; ``eps = u / 1000``, each ``u ~ U(0, 1)`` drawn independently.
   Seeded, and vectorised so 100k sets take well under a second.
2. :func:`run_quadmix_search` trains one proxy per sampled set through RegMix's sweep
   (:func:`~tikmix_loader.mixing.regmix.run_regmix_sweep`, which also counts their FLOPs), then
3. :func:`fit_quadmix` fits RegMix's LightGBM regressor from the flattened parameters to the proxy loss and
   reports its cross-validated error (Spearman and RMSE of out-of-fold predictions), and
4. :func:`search_quadmix` predicts 100k fresh sets from the same sampler and averages the 10 with the lowest
   predicted loss into one set (:meth:`ParamTable.mean_of`).

:func:`implied_domain_weights` turns one set into the domain shares it implies (expected sampled tokens per
domain), which the loader's weights take when QuaDMix alone decides the mixture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from tikmix_loader.errors import ConfigError, ScoreError
from tikmix_loader.mixing._surrogate import Surrogate, fit_lightgbm
from tikmix_loader.mixing.regmix import run_regmix_sweep
from tikmix_loader.quality.sampler import QualityParams

SHAPE_FIELDS = ("lam", "omega", "eta", "eps")  # the per-domain scalars of QualityParams, in feature order


@dataclass(frozen=True)
class SearchSpace:
    """The domains and criteria searched over, and the ranges Algorithm 1 draws from.

    Args:
        domains (tuple[str, ...]): Domain names, in the loader's order.
        criteria (tuple[str, ...]): Criterion names, in the order of every ``alpha``.
        lam_decades (float): ``lambda = 10 ** (lam_decades * u)``. Default: 3 (``lambda`` in [1, 1000]).
        omega_scale (float): ``omega = omega_scale * u``. Default: 0.1 (the paper's; it keeps at most the
            best 10% of tokens, for a training budget far below the pool).
        eta_max (float): ``eta = eta_max * u``; the best document gets up to ``2 ** eta_max`` copies.
            Default: 2.
        eps_scale (float): ``eps = eps_scale * u``. Default: 1e-3 (the paper's ``/ 1000``).
    """

    domains: tuple[str, ...]
    criteria: tuple[str, ...]
    lam_decades: float = 3.0
    omega_scale: float = 0.1
    eta_max: float = 2.0
    eps_scale: float = 1e-3

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "criteria", tuple(self.criteria))
        for name in ("domains", "criteria"):
            names = getattr(self, name)
            if not names or len(set(names)) != len(names):
                raise ConfigError(f"SearchSpace: `{name}` must be distinct names, at least one; got {names}.")
        for name in ("lam_decades", "eta_max", "eps_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"SearchSpace: `{name}` must be a finite number >= 0, got {value!r}.")
        if not (isinstance(self.omega_scale, (int, float)) and 0 < self.omega_scale <= 1):
            raise ConfigError(f"SearchSpace: `omega_scale` must be in (0, 1], got {self.omega_scale!r}.")

    @property
    def num_features(self) -> int:
        return len(self.domains) * (len(self.criteria) + len(SHAPE_FIELDS))

    def to_dict(self) -> dict:
        return {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ParamTable:
    """``R`` QuaDMix parameter sets, one row each, as arrays.

    Attributes:
        space (SearchSpace): Domains and criteria.
        alpha (np.ndarray): ``[R, M, N]`` criterion weights, summing to 1 over ``N``.
        lam, omega, eta, eps (np.ndarray): ``[R, M]`` each.
    """

    space: SearchSpace
    alpha: np.ndarray
    lam: np.ndarray
    omega: np.ndarray
    eta: np.ndarray
    eps: np.ndarray

    def __len__(self) -> int:
        return len(self.lam)

    def features(self) -> np.ndarray:
        """``[R, M * (N + 4)]``: per domain its ``alpha``, ``log10(lambda)``, ``omega``, ``eta``, ``eps``.

        ``lambda`` enters on the log scale it is sampled on.
        """
        shape = np.stack([np.log10(self.lam), self.omega, self.eta, self.eps], axis=-1)
        return np.concatenate([self.alpha, shape], axis=-1).reshape(len(self), -1)

    @classmethod
    def from_features(cls, space: SearchSpace, features) -> ParamTable:
        """The inverse of :meth:`features` (e.g. for a proxy table read back from JSON)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != space.num_features:
            raise ConfigError(
                f"QuaDMix features have shape {features.shape}; {len(space.domains)} domains x "
                f"({len(space.criteria)} criteria + 4) need [R, {space.num_features}]."
            )
        per_domain = features.reshape(len(features), len(space.domains), -1)
        n = len(space.criteria)
        shape = per_domain[..., n:]
        return cls(
            space, per_domain[..., :n], 10.0 ** shape[..., 0], shape[..., 1], shape[..., 2], shape[..., 3]
        )

    def params(self, row: int) -> dict[str, QualityParams]:
        """Row ``row`` as ``{domain: QualityParams}``."""
        return {
            domain: QualityParams(
                alpha=tuple(self.alpha[row, m]),
                **{name: float(getattr(self, name)[row, m]) for name in SHAPE_FIELDS},
            )
            for m, domain in enumerate(self.space.domains)
        }

    def take(self, rows) -> ParamTable:
        """The sets in ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return ParamTable(self.space, *(getattr(self, name)[rows] for name in ("alpha", *SHAPE_FIELDS)))

    def mean_of(self, rows) -> dict[str, QualityParams]:
        """The average of ``rows``: each field's mean, ``alpha`` renormalised, ``lambda`` averaged on its log
        scale (a geometric mean, as it is sampled)."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or len(rows) == 0:
            raise ConfigError(f"ParamTable.mean_of needs a non-empty list of rows, got {rows!r}.")
        alpha = self.alpha[rows].mean(axis=0)
        mean = ParamTable(
            self.space,
            (alpha / alpha.sum(axis=-1, keepdims=True))[None],
            10.0 ** np.log10(self.lam[rows]).mean(axis=0)[None],
            *(getattr(self, name)[rows].mean(axis=0)[None] for name in ("omega", "eta", "eps")),
        )
        return mean.params(0)


def sample_quadmix_params(space: SearchSpace, num: int, *, seed: int | Sequence[int] = 0) -> ParamTable:
    """``num`` parameter sets drawn after Algorithm 1 (module docstring), deterministic in ``seed``."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ConfigError(f"sample_quadmix_params: `num` must be a positive int, got {num!r}.")
    rng = np.random.default_rng(seed)
    m, n = len(space.domains), len(space.criteria)
    global_weight = rng.random((num, 1, n))
    domain_weight = rng.random((num, m, n))
    alpha = global_weight * domain_weight + 1e-12  # the tiny floor keeps an all-zero draw (p ~ 0) valid
    alpha /= alpha.sum(axis=-1, keepdims=True)
    uniform = rng.random((4, num, m))
    return ParamTable(
        space,
        alpha,
        lam=10.0 ** (space.lam_decades * uniform[0]),
        omega=space.omega_scale * uniform[1],
        eta=space.eta_max * uniform[2],
        eps=space.eps_scale * uniform[3],
    )


def sample_feasible_params(
    space: SearchSpace,
    num: int,
    *,
    feasible: Callable[[dict[str, QualityParams]], bool],
    seed: int = 0,
    max_rounds: int = 100,
) -> ParamTable:
    """``num`` sets from :func:`sample_quadmix_params` for which ``feasible`` holds (rejection sampling, as
    RegMix rejects mixtures past its epoch cap); the first round is ``sample_quadmix_params(space, num,
    seed=seed)`` itself.

    Raises:
        ConfigError: fewer than ``num`` feasible sets after ``max_rounds`` rounds of ``num`` draws.
    """
    kept: list[ParamTable] = []
    count = 0
    for round_index in range(max_rounds):
        batch = sample_quadmix_params(space, num, seed=seed if round_index == 0 else (seed, round_index))
        rows = [row for row in range(num) if feasible(batch.params(row))]
        kept.append(batch.take(rows))
        count += len(rows)
        if count >= num:
            return ParamTable(
                space,
                *(np.concatenate([getattr(t, f) for t in kept])[:num] for f in ("alpha", *SHAPE_FIELDS)),
            )
    raise ConfigError(
        f"QuaDMix sampling found only {count} feasible parameter sets of {max_rounds * num} drawn; widen the "
        "search space (e.g. a larger `omega_scale`)."
    )


@dataclass(frozen=True)
class QuaDMixFit:
    """The regressor fitted on every proxy, and its out-of-fold validation error.

    Attributes:
        surrogate (Surrogate): LightGBM fitted on every row (its ``valid_r2`` is on its early-stopping split).
        cv_spearman (float | None): Spearman correlation of out-of-fold predictions with the proxy losses.
        cv_rmse (float): Their root mean squared error (nats/token).
        loss_std (float): Standard deviation of the proxy losses: the RMSE of always predicting their mean.
        folds (int): Cross-validation folds.
    """

    surrogate: Surrogate
    cv_spearman: float | None
    cv_rmse: float
    loss_std: float
    folds: int


def fit_quadmix(features, losses, *, folds: int = 5, seed: int = 0, **lightgbm_options) -> QuaDMixFit:
    """Fit RegMix's LightGBM regressor from flattened parameters to proxy loss, with a cross-validated error.

    Each of ``folds`` folds is predicted by a model fitted on the other rows (each fit early-stops on its own
    split), so the reported error is on proxies the model never saw; the returned model is fitted on all.

    Args:
        features (array): ``[R, F]`` from :meth:`ParamTable.features`.
        losses (array): ``[R]`` proxy losses (lower is better).
        folds (int): Cross-validation folds, at most ``R``. Default: 5.
        seed (int): Seeds the folds and LightGBM. Default: 0.
        **lightgbm_options: Passed to :func:`~tikmix_loader.mixing._surrogate.fit_lightgbm`.
    """
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if X.ndim != 2 or y.shape != (len(X),) or not 2 <= folds <= len(X):
        raise ConfigError(
            f"fit_quadmix needs features [R, F], losses [R] and 2 <= folds <= R; got {X.shape}, {y.shape}, "
            f"folds={folds}."
        )
    predicted = np.empty_like(y)
    for held_out in np.array_split(np.random.default_rng(seed).permutation(len(y)), folds):
        kept = np.setdiff1d(np.arange(len(y)), held_out)
        predicted[held_out] = fit_lightgbm(X[kept], y[kept], seed=seed, **lightgbm_options).predict(
            X[held_out]
        )
    spearman = float(stats.spearmanr(predicted, y).statistic) if np.ptp(predicted) > 0 else None
    return QuaDMixFit(
        surrogate=fit_lightgbm(X, y, seed=seed, **lightgbm_options),
        cv_spearman=None if spearman is None or math.isnan(spearman) else spearman,
        cv_rmse=float(np.sqrt(np.mean((predicted - y) ** 2))),
        loss_std=float(y.std()),
        folds=folds,
    )


def search_quadmix(
    predict: Callable[[np.ndarray], np.ndarray],
    space: SearchSpace,
    *,
    num_candidates: int = 100_000,
    top_k: int = 10,
    seed: int = 0,
    feasible: Callable[[dict[str, QualityParams]], bool] | None = None,
) -> tuple[dict[str, QualityParams], float]:
    """The mean of the ``top_k`` of ``num_candidates`` sampled sets with the lowest predicted loss.

    Args:
        predict (callable): ``features [K, F] -> [K]`` predicted loss (e.g. ``QuaDMixFit.surrogate.predict``).
        space (SearchSpace): What to sample.
        num_candidates (int): Sets scored. Default: 100k (the paper's).
        top_k (int): Best sets averaged. Default: 10 (the paper's).
        seed (int): Seeds the candidates. Default: 0.
        feasible (callable | None): Only sets for which it holds count: the ``top_k`` lowest predicted of
            those (the rest are skipped, not scored). Default: None (every set).

    Returns:
        tuple[dict[str, QualityParams], float]: The averaged set and the mean predicted loss of the top-k.
    """
    if not 1 <= top_k <= num_candidates:
        raise ConfigError(
            f"search_quadmix needs 1 <= top_k <= num_candidates, got {top_k}, {num_candidates}."
        )
    candidates = sample_quadmix_params(space, num_candidates, seed=seed)
    predicted = np.asarray(predict(candidates.features()), dtype=np.float64)
    order = np.argsort(predicted, kind="stable")
    top = order[:top_k]
    if feasible is not None:
        top = []
        for row in order:  # best predicted first; stop at the k-th feasible one
            if feasible(candidates.params(row)):
                top.append(row)
                if len(top) == top_k:
                    break
        if len(top) < top_k:
            raise ConfigError(f"QuaDMix search: only {len(top)} of {num_candidates} candidates are feasible.")
    return candidates.mean_of(top), float(predicted[top].mean())


@dataclass(frozen=True)
class QuaDMixSearch:
    """A finished search: the chosen parameters, the proxy table, the regression's error and the compute.

    Attributes:
        params (dict[str, QualityParams]): The chosen set, per domain.
        predicted_loss (float): Mean predicted loss of the averaged top-k.
        space (SearchSpace): What was searched.
        proxy_features (np.ndarray), proxy_losses (np.ndarray): The proxy table ``[R, F]``, ``[R]``.
        fit (QuaDMixFit): The regression and its cross-validated error.
        decision_flops (float): FLOPs of every proxy run (training and scoring), counted as RegMix's.
        num_candidates (int), top_k (int): The search's sizes.
    """

    params: dict[str, QualityParams]
    predicted_loss: float
    space: SearchSpace
    proxy_features: np.ndarray
    proxy_losses: np.ndarray
    fit: QuaDMixFit
    decision_flops: float
    num_candidates: int
    top_k: int

    def to_dict(self) -> dict:
        """JSON-ready: ``params`` first (what :func:`read_quadmix_params` reads), then how they were found."""
        return {
            "params": {domain: p.to_dict() for domain, p in self.params.items()},
            "predicted_loss": self.predicted_loss,
            "num_proxies": len(self.proxy_losses),
            "cv_spearman": self.fit.cv_spearman,
            "cv_rmse": self.fit.cv_rmse,
            "proxy_loss_std": self.fit.loss_std,
            "cv_folds": self.fit.folds,
            "decision_flops": self.decision_flops,
            "num_candidates": self.num_candidates,
            "top_k": self.top_k,
            "space": self.space.to_dict(),
            "proxy_features": self.proxy_features.tolist(),
            "proxy_losses": self.proxy_losses.tolist(),
        }


def run_quadmix_search(
    train_fn: Callable[[dict[str, QualityParams]], float],
    space: SearchSpace,
    *,
    num_proxies: int,
    flops_per_run: float,
    seed: int = 0,
    num_candidates: int = 100_000,
    top_k: int = 10,
    folds: int = 5,
    feasible: Callable[[dict[str, QualityParams]], bool] | None = None,
    progress: bool = True,
) -> QuaDMixSearch:
    """The whole search: ``num_proxies`` sampled sets, one proxy each, the regression, the top-k mean.

    Args:
        train_fn (callable): Trains a fresh proxy under ``{domain: QualityParams}`` (same token budget every
            run) and returns its target validation loss.
        space (SearchSpace): What to sample.
        num_proxies (int): Proxy runs (>= 2 * folds).
        flops_per_run (float): FLOPs of one proxy run (training and scoring).
        seed (int): Seeds the sampling, the folds and LightGBM. Default: 0.
        num_candidates (int), top_k (int): See :func:`search_quadmix`.
        folds (int): See :func:`fit_quadmix`.
        feasible (callable | None): Only sets for which it holds are trained or chosen (e.g. sets that keep
            enough tokens of every domain). Default: None (every set).
        progress (bool): Show a tqdm bar over the proxies. Default: True.
    """
    if num_proxies < 2 * folds:
        raise ConfigError(
            f"QuaDMix search needs at least {2 * folds} proxies for {folds} folds, got {num_proxies}."
        )
    table = (
        sample_quadmix_params(space, num_proxies, seed=seed)
        if feasible is None
        else sample_feasible_params(space, num_proxies, feasible=feasible, seed=seed)
    )
    sweep = run_regmix_sweep(
        lambda row: train_fn(ParamTable.from_features(space, row[None]).params(0)),
        table.features(),
        flops_per_run=flops_per_run,
        progress=progress,
        desc="QuaDMix proxies",
    )
    fit = fit_quadmix(sweep.mixtures, sweep.losses, folds=folds, seed=seed)
    params, predicted = search_quadmix(
        fit.surrogate.predict,
        space,
        num_candidates=num_candidates,
        top_k=top_k,
        seed=seed + 1,
        feasible=feasible,
    )
    return QuaDMixSearch(
        params, predicted, space, sweep.mixtures, sweep.losses, fit, sweep.total_flops, num_candidates, top_k
    )


def implied_domain_weights(
    expected_copies: Mapping[str, np.ndarray], doc_lengths: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """The domain shares a parameter set implies: each domain's expected sampled tokens per epoch,
    ``sum_i length_i * S(r_i)``, normalised over domains.

    Raises:
        ScoreError: mismatched lengths, or no domain samples any token.
    """
    tokens = {}
    for domain, copies in expected_copies.items():
        copies = np.asarray(copies, dtype=np.float64)
        lengths = np.asarray(doc_lengths[domain], dtype=np.float64)
        if copies.shape != lengths.shape:
            raise ScoreError(
                f"Domain {domain!r}: {copies.shape} expected copies for {lengths.shape} document lengths."
            )
        tokens[domain] = float(copies @ lengths)
    total = sum(tokens.values())
    if not total > 0:
        raise ScoreError(f"The quality parameters sample no token from any domain ({tokens}).")
    return {domain: value / total for domain, value in tokens.items()}


def read_quadmix_params(path: str | os.PathLike) -> dict[str, QualityParams]:
    """The ``params`` of a JSON from ``tikmix quadmix search``, as ``{domain: QualityParams}``."""
    try:
        params = json.loads(Path(path).read_text())["params"]
        return {domain: QualityParams.from_dict(values) for domain, values in params.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"Cannot read QuaDMix parameters from {path}: {exc!r}.") from None
