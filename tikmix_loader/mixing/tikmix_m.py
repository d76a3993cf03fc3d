"""TiKMiX-M: refine the TiKMiX-D mixture with a LightGBM surrogate of a measured label (docs/methods.md §5).

Steps (paper, with the project's choices marked "ours"):

1. Anchor: solve TiKMiX-D on ``context.influence`` (:func:`solve_tikmix_d`).
2. Candidates: Latin-hypercube draws (``scipy.stats.qmc.LatinHypercube``) in the box ``[0.5 w_D, 2 w_D]``,
   normalised to sum 1; a draw that leaves its box after normalising is rejected. Ours: with many domains
   almost every draw leaves its box (each of hundreds of coordinates must stay inside), so after
   ``MAX_LHS_BATCHES`` batches the missing candidates are the rejected draws moved onto the box-simplex by
   Euclidean projection; ``terms["projected_candidates"]`` counts them.
3. Labels: a user-supplied ``label_fn(weights [N, n_domains]) -> [N]``, higher = better, that **measures**
   each mixture: a short look-ahead (k optimiser steps on a batch drawn with mixture w, recording the drop
   in mean target loss; model-specific, so the caller supplies it) or :class:`CurvatureLabel` (the
   mixture-dependent curvature ``psi^T H(w)^-1 phi(w)`` with K-FAC factors mixed as ``A(w) = sum w_d A_d``).
   A label that is an affine function of ``S w`` (or, with enough candidates, of ``w``) would make the
   surrogate pointless; such labels are rejected with ``ConfigError``.
4. Surrogate: LightGBM regressor from w to label (the optional ``lightgbm`` extra).
5. Annealed Dirichlet search: at round t draw ``num_samples`` mixtures from ``Dirichlet(c_t * w_best)``,
   score them with the surrogate and set ``w_best`` to the mean of the top-k. The paper's text anneals the
   concentration the wrong way; a *small* concentration spreads the draws widely, so ours makes ``c_t``
   **grow** geometrically (explore first, then exploit). Draws outside the bounds / availability caps are
   rejected. Ours: if the surrogate rates the anchor above the search result, the anchor is kept. The
   search does not impose TiKMiX-D's Pareto constraint: the measured label is the judge here (paper).

Determinism: every decision draws from ``numpy.random.default_rng([seed, decision_index])`` and LightGBM runs
single-threaded with a fixed seed, so the same seed and history give the same weights; the decision index is
the mixer's only state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import qmc

from tikmix_loader.errors import ConfigError
from tikmix_loader.mixing._surrogate import fit_lightgbm
from tikmix_loader.mixing.base import Mixer, MixerConfig, MixingContext, MixtureSolution, option
from tikmix_loader.mixing.tikmix_d import (
    check_objective_options,
    check_weight_range,
    solve_tikmix_d,
    weight_bounds,
)

MAX_LHS_BATCHES = 64
LINEAR_LABEL_R2 = 1.0 - 1e-9  # labels fitted this well by an affine map are "S w in disguise"


# ---------------------------------------------------------------- step 2: candidates


def _project_box_simplex(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Euclidean projection of one point onto ``{sum x = 1, lo <= x <= hi}``: ``clip(y - tau, lo, hi)`` with
    ``tau`` found by bisection (the sum is monotone in ``tau``). Hand-written: SciPy has no such projection,
    and a QP solver would be a heavy way to do a 1-D search."""
    left, right = float(np.min(y - hi)), float(np.max(y - lo))
    for _ in range(200):
        tau = 0.5 * (left + right)
        if np.clip(y - tau, lo, hi).sum() > 1.0:
            left = tau
        else:
            right = tau
    x = np.clip(y - 0.5 * (left + right), lo, hi)
    return x / x.sum()


def latin_hypercube_candidates(
    center: np.ndarray,
    num_candidates: int,
    *,
    rng: np.random.Generator,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[np.ndarray, int]:
    """Latin-hypercube mixtures in the box ``[low * center, high * center]``, normalised to sum 1.

    A normalised draw outside its box is rejected; after ``MAX_LHS_BATCHES`` batches the shortfall is filled
    with rejected draws projected onto the box-simplex (see the module docstring).

    Args:
        center (np.ndarray): The TiKMiX-D mixture ``w_D`` ``[n_domains]``.
        num_candidates (int): Candidates wanted (about 256 in the paper).
        rng (np.random.Generator): Source of the LHS seeds.
        low (float): Lower box factor. Default: 0.5.
        high (float): Upper box factor. Default: 2.0.

    Returns:
        tuple[np.ndarray, int]: Candidates ``[num_candidates, n_domains]`` and how many were projected.
    """
    center = np.asarray(center, dtype=np.float64)
    box_lo, box_hi = low * center, high * center
    slack = 1e-12
    accepted: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    for _ in range(MAX_LHS_BATCHES):
        unit = qmc.LatinHypercube(d=len(center), seed=rng).random(num_candidates)
        draws = box_lo + unit * (box_hi - box_lo)
        draws /= draws.sum(axis=1, keepdims=True)
        inside = np.all((draws >= box_lo - slack) & (draws <= box_hi + slack), axis=1)
        accepted.extend(draws[inside])
        rejected.extend(draws[~inside][:num_candidates])
        if len(accepted) >= num_candidates:
            return np.array(accepted[:num_candidates]), 0
    shortfall = num_candidates - len(accepted)
    projected = [_project_box_simplex(row, box_lo, box_hi) for row in rejected[:shortfall]]
    return np.array(accepted + projected), shortfall


# ---------------------------------------------------------------- step 3: labels


def check_measured_labels(candidates: np.ndarray, labels: np.ndarray, S: np.ndarray | None) -> None:
    """Raise ``ConfigError`` when the labels are (numerically) an affine function of ``S w``, or of ``w``
    itself when there are more candidates than domains + 1: a surrogate of such a label is pointless."""
    designs = []
    if S is not None and len(labels) > S.shape[0] + 1:
        designs.append(("S w", candidates @ np.asarray(S).T))
    if len(labels) > candidates.shape[1] + 1:
        designs.append(("w", candidates))
    for name, design in designs:
        design = np.hstack([design, np.ones((len(labels), 1))])
        fitted = design @ np.linalg.lstsq(design, labels, rcond=None)[0]
        total = float(np.sum((labels - labels.mean()) ** 2))
        if total == 0 or 1.0 - float(np.sum((labels - fitted) ** 2)) / total > LINEAR_LABEL_R2:
            raise ConfigError(
                f"TiKMiX-M labels are an affine function of {name} (or constant); a surrogate of such a "
                "label "
                "is pointless. Label each mixture with a measured quality (a short look-ahead or "
                "CurvatureLabel), never with S w (docs/methods.md §5)."
            )


class CurvatureLabel:
    """Mixture-dependent curvature label ``sum_b t_b sum_l <psi_bl, (B_l(w)+lB)^-1 phi_l(w) (A_l(w)+lA)^-1>``.

    With K-FAC factors mixed linearly, ``A_l(w) = sum_d w_d A_ld`` and ``B_l(w) = sum_d w_d B_ld``, and the
    mixed gradient ``phi_l(w) = sum_d w_d phi_ld``, this is the Group Influence of the whole mixture under the
    curvature that mixture would induce: non-linear in w (docs/methods.md §5, label b). Higher is better.

    Args:
        psi (array | Sequence[array]): Target gradients per layer, ``[n_targets, k_out, k_in]``.
        phi (array | Sequence[array]): Per-token domain gradients per layer, ``[n_domains, k_out, k_in]``.
        a_factors (array | Sequence[array]): Input factors per layer, ``[n_domains, k_in, k_in]``.
        b_factors (array | Sequence[array]): Output-gradient factors per layer, ``[n_domains, k_out, k_out]``.
        damping (float): ``lambda`` as a multiple of each mixed factor's *unprojected* mean eigenvalue, the
            influence engine's convention (docs/influence.md): ``lA = damping * trace(A(w)) / d_in`` and
            ``lB = damping * trace(B(w)) / d_out``, or ``damping`` itself for a factor with zero trace.
            Default: 0.1.
        widths (Sequence[tuple[int, int]] | None): Per layer the unprojected ``(d_in, d_out)`` of projected
            factors. The projections keep traces in expectation, so dividing by ``d`` keeps the damping the
            same for every projection width; dividing by ``k_in``, ``k_out`` would grow it as ``d / k`` and
            shrink the label's curvature term as k falls. Default: None (the factors are not projected:
            ``d_in = k_in``, ``d_out = k_out``).
        target_weights (array | None): ``t_b``; default uniform ``1 / n_targets``.
    """

    def __init__(
        self, *, psi, phi, a_factors, b_factors, damping: float = 0.1, widths=None, target_weights=None
    ):
        layers = [self._as_layers(x) for x in (psi, phi, a_factors, b_factors)]
        if len({len(x) for x in layers}) != 1:
            raise ConfigError(
                "CurvatureLabel needs the same number of layers in every input, got "
                f"{[len(x) for x in layers]}."
            )
        self.layers = list(zip(*layers, strict=True))
        for index, (ps, ph, a, b) in enumerate(self.layers):
            m, k_out, k_in = ph.shape
            if ps.shape[1:] != (k_out, k_in) or a.shape != (m, k_in, k_in) or b.shape != (m, k_out, k_out):
                raise ConfigError(
                    f"CurvatureLabel layer {index}: psi {ps.shape}, phi {ph.shape}, A {a.shape}, B {b.shape} "
                    "do not "
                    "fit [n_targets, k_out, k_in], [n_domains, k_out, k_in], [n_domains, k_in, k_in], "
                    "[n_domains, k_out, k_out]."
                )
        if not damping > 0:
            raise ConfigError(f"CurvatureLabel `damping` must be > 0, got {damping}.")
        self.damping = float(damping)
        own = [(a.shape[-1], b.shape[-1]) for _, _, a, b in self.layers]
        self.widths = own if widths is None else [tuple(int(d) for d in pair) for pair in widths]
        if len(self.widths) != len(own) or any(
            len(pair) != 2 or pair[0] < k_in or pair[1] < k_out
            for pair, (k_in, k_out) in zip(self.widths, own, strict=False)  # lengths checked just before
        ):
            raise ConfigError(
                f"CurvatureLabel `widths` must give one unprojected (d_in, d_out) per layer, each at least "
                f"the factor's own (k_in, k_out) {own}; got {self.widths}."
            )
        n_targets = self.layers[0][0].shape[0]
        self.target_weights = (
            np.full(n_targets, 1.0 / n_targets)
            if target_weights is None
            else np.asarray(target_weights, dtype=np.float64)
        )

    @staticmethod
    def _as_layers(value) -> list[np.ndarray]:
        if isinstance(value, np.ndarray):
            return [value.astype(np.float64)]
        return [np.asarray(v, dtype=np.float64) for v in value]

    def _damped(self, factor: np.ndarray, unprojected_size: int) -> np.ndarray:
        """``factor [n, k, k] + shift_n I``: the engine's relative damping (influence/preconditioners.py),
        vectorised over the ``n`` mixtures."""
        total = np.trace(factor, axis1=-2, axis2=-1)
        shift = np.where(total > 0, self.damping * total / unprojected_size, self.damping)
        return factor + shift[:, None, None] * np.eye(factor.shape[-1])

    def __call__(self, weights) -> np.ndarray:
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        per_target = np.zeros((len(weights), len(self.target_weights)))
        for (psi, phi, a, b), (d_in, d_out) in zip(self.layers, self.widths, strict=True):
            a_mixed = self._damped(np.einsum("nd,dij->nij", weights, a), d_in)
            b_mixed = self._damped(np.einsum("nd,dij->nij", weights, b), d_out)
            phi_mixed = np.einsum("nd,dij->nij", weights, phi)
            left = np.linalg.solve(b_mixed, phi_mixed)  # B^-1 phi
            pre = np.linalg.solve(a_mixed, left.transpose(0, 2, 1)).transpose(
                0, 2, 1
            )  # (B^-1 phi) A^-1 (A sym.)
            per_target += np.einsum("bij,nij->nb", psi, pre)
        return per_target @ self.target_weights


def per_mixture(fn: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], np.ndarray]:
    """Turn a one-mixture label (e.g. a short look-ahead run) into the batch ``label_fn`` TiKMiX-M calls."""
    return lambda weights: np.array([float(fn(w)) for w in np.asarray(weights)])


# ---------------------------------------------------------------- step 5: annealed Dirichlet search


def concentration_schedule(initial: float, growth: float, rounds: int) -> np.ndarray:
    """``c_t = initial * growth**t``: the Dirichlet concentration grows, so the search narrows."""
    return initial * growth ** np.arange(rounds)


@dataclass(frozen=True)
class SearchResult:
    """Outcome of :func:`annealed_dirichlet_search`.

    Attributes:
        weights (np.ndarray): Final ``w_best``.
        score (float): Surrogate score of ``weights``.
        trace (tuple[dict, ...]): Per round: ``concentration``, ``spread`` (mean L1 distance of the accepted
            draws from that round's ``w_best``), ``accepted`` draws and ``top_mean_score``.
    """

    weights: np.ndarray
    score: float
    trace: tuple


def annealed_dirichlet_search(
    score_fn: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    *,
    rng: np.random.Generator,
    rounds: int = 6,
    num_samples: int = 1024,
    top_k: int = 32,
    initial_concentration: float = 20.0,
    growth: float = 2.0,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
) -> SearchResult:
    """Maximise ``score_fn`` over the simplex by rounds of ``Dirichlet(c_t * w_best)`` draws, ``c_t`` growing.

    Domains with ``w_best_d = 0`` or ``hi_d = 0`` stay at 0. Draws outside ``[lo, hi]`` are rejected.
    """
    w_best = np.asarray(start, dtype=np.float64)
    lo = np.zeros_like(w_best) if lo is None else lo
    hi = np.ones_like(w_best) if hi is None else hi
    support = (w_best > 0) & (hi > 0)
    trace = []
    for concentration in concentration_schedule(initial_concentration, growth, rounds):
        draws = np.zeros((num_samples, len(w_best)))
        draws[:, support] = rng.dirichlet(concentration * w_best[support], size=num_samples)
        draws = draws[np.all((draws >= lo) & (draws <= hi), axis=1)]
        if len(draws) == 0:
            trace.append(
                {"concentration": float(concentration), "spread": None, "accepted": 0, "top_mean_score": None}
            )
            continue
        scores = score_fn(draws)
        top = np.argsort(-scores, kind="stable")[:top_k]
        trace.append(
            {
                "concentration": float(concentration),
                "spread": float(np.abs(draws - w_best).sum(axis=1).mean()),
                "accepted": int(len(draws)),
                "top_mean_score": float(scores[top].mean()),
            }
        )
        w_best = draws[top].mean(axis=0)
        support = (w_best > 0) & (hi > 0)
    return SearchResult(w_best / w_best.sum(), float(score_fn(w_best[None])[0]), tuple(trace))


# ---------------------------------------------------------------- the mixer


@dataclass(frozen=True)
class TiKMiXMConfig(MixerConfig):
    """Options of :class:`TiKMiXM`."""

    num_candidates: int = option(256, "Latin-hypercube candidates labelled per decision (paper: ~256)")
    box_low: float = option(0.5, "candidate box lower factor around w_D")
    box_high: float = option(2.0, "candidate box upper factor around w_D")
    rounds: int = option(6, "annealed Dirichlet search rounds")
    num_samples: int = option(1024, "Dirichlet draws per round")
    top_k: int = option(32, "draws averaged into w_best each round")
    initial_concentration: float = option(20.0, "Dirichlet concentration c_0 of the first round")
    growth: float = option(2.0, "c_{t+1} / c_t; must be > 1 (the concentration grows)")
    learning_rate: float = option(0.05, "LightGBM learning rate")
    num_rounds: int = option(500, "LightGBM maximum boosting rounds")
    early_stopping_rounds: int = option(50, "LightGBM early stopping patience on a 20% held-out split")
    seed: int = option(0, "seed of candidates, search and LightGBM")
    alpha: float = option(1.0, "TiKMiX-D anchor: weight of std(Phat)")
    beta: float = option(1.0, "TiKMiX-D anchor: weight of -sum(Phat)")
    gamma: float = option(1.0, "TiKMiX-D anchor: weight of -H(w)")
    min_weight: float = option(0.0, "lower bound of every weight (anchor and search)")
    max_weight: float = option(1.0, "upper bound of every weight (anchor and search)")
    method: str = option("auto", "TiKMiX-D anchor solver")

    def __post_init__(self):
        if self.num_candidates < 8 or self.num_samples < 1 or self.rounds < 1:
            raise ConfigError(
                f"TiKMiX-M needs `num_candidates` >= 8, `num_samples` >= 1 and `rounds` >= 1; got "
                f"{self.num_candidates}, {self.num_samples}, {self.rounds}."
            )
        if not 1 <= self.top_k <= self.num_samples:
            raise ConfigError(
                f"TiKMiX-M `top_k` must be in [1, num_samples={self.num_samples}], got {self.top_k}."
            )
        if not 0 < self.box_low < 1 < self.box_high:
            raise ConfigError(
                f"TiKMiX-M box needs 0 < `box_low` < 1 < `box_high`, got {self.box_low}, {self.box_high}."
            )
        if not (self.initial_concentration > 0 and self.growth > 1):
            raise ConfigError(
                "TiKMiX-M needs `initial_concentration` > 0 and `growth` > 1 (the concentration must grow "
                "over "
                f"rounds: explore, then exploit); got {self.initial_concentration}, {self.growth}."
            )
        check_objective_options(self.alpha, self.beta, self.gamma, self.method)
        check_weight_range(self.min_weight, self.max_weight)


class TiKMiXM(Mixer):
    """TiKMiX-M (see the module docstring).

    Args:
        label_fn (Callable[[np.ndarray], np.ndarray]): Measures mixtures ``[N, n_domains] -> [N]``, higher is
            better. Never ``S w``.
        **options: :class:`TiKMiXMConfig` fields.
    """

    name = "tikmix_m"
    Config = TiKMiXMConfig
    STATE_KEYS = ("decisions",)

    def __init__(self, *, label_fn: Callable[[np.ndarray], np.ndarray] | None = None, **options):
        super().__init__(**options)
        if not callable(label_fn):
            raise ConfigError(
                f"TiKMiX-M needs a callable `label_fn` that measures mixtures, got {label_fn!r}; see "
                "CurvatureLabel or wrap a look-ahead run with per_mixture()."
            )
        self.label_fn = label_fn
        self.decisions = 0

    def propose(self, context: MixingContext) -> MixtureSolution:
        context.require("influence", mixer=self.name)
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.decisions])
        anchor = solve_tikmix_d(
            context.influence,
            context.w_prior,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            min_weight=cfg.min_weight,
            max_weight=cfg.max_weight,
            available_tokens=context.available_tokens,
            remaining_tokens=context.remaining_tokens,
            max_epochs=context.max_epochs,
            method=cfg.method,
        )
        candidates, projected = latin_hypercube_candidates(
            anchor.weights, cfg.num_candidates, rng=rng, low=cfg.box_low, high=cfg.box_high
        )
        labels = self._measure(candidates)
        check_measured_labels(candidates, labels, context.influence)
        surrogate = fit_lightgbm(
            candidates,
            labels,
            learning_rate=cfg.learning_rate,
            num_rounds=cfg.num_rounds,
            early_stopping_rounds=cfg.early_stopping_rounds,
            seed=cfg.seed,
        )
        lo, hi = weight_bounds(
            context.num_domains,
            cfg.min_weight,
            cfg.max_weight,
            context.available_tokens,
            context.remaining_tokens,
            context.max_epochs,
        )
        search = annealed_dirichlet_search(
            surrogate.predict,
            anchor.weights,
            rng=rng,
            rounds=cfg.rounds,
            num_samples=cfg.num_samples,
            top_k=cfg.top_k,
            initial_concentration=cfg.initial_concentration,
            growth=cfg.growth,
            lo=lo,
            hi=hi,
        )
        anchor_score = float(surrogate.predict(anchor.weights[None])[0])
        keep_anchor = anchor_score > search.score
        weights = anchor.weights if keep_anchor else np.clip(search.weights, lo, hi)
        terms = {
            "predicted_label": max(anchor_score, search.score),
            "anchor_predicted_label": anchor_score,
            "anchor_objective": anchor.objective,
            "anchor_fallback": float(anchor.fallback),
            "best_measured_label": float(labels.max()),
            "anchor_neighbourhood_mean_label": float(labels.mean()),
            "surrogate_valid_r2": surrogate.valid_r2,
            "surrogate_rounds": surrogate.num_rounds,
            "projected_candidates": projected,
            "final_concentration": search.trace[-1]["concentration"],
        }
        self.decisions += 1  # only a completed decision advances the RNG stream
        reason = (
            f"LightGBM surrogate of {len(labels)} measured candidates around TiKMiX-D "
            f"({'anchor kept: surrogate rates it highest' if keep_anchor else 'annealed Dirichlet search'}); "
            f"anchor: {anchor.reason}"
        )
        return MixtureSolution(
            weights / weights.sum(),
            "surrogate",
            reason,
            None,
            terms,
            anchor.iterations + len(search.trace),
            False,
        )

    def _measure(self, candidates: np.ndarray) -> np.ndarray:
        labels = np.asarray(self.label_fn(candidates.copy()), dtype=np.float64)
        if labels.shape != (len(candidates),) or not np.all(np.isfinite(labels)):
            raise ConfigError(
                f"TiKMiX-M `label_fn` must return {len(candidates)} finite labels for a [{len(candidates)}, "
                f"n_domains] batch, got shape {labels.shape} with "
                f"{int(np.sum(~np.isfinite(labels)))} non-finite."
            )
        return labels

    def _get_state(self) -> dict:
        return {"decisions": self.decisions}

    def _set_state(self, state: dict) -> None:
        self.decisions = int(state["decisions"])
