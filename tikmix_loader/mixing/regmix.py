"""RegMix: pick a static mixture by regressing proxy loss on the mixture (docs/methods.md §7, arXiv
2407.01492).

1. :func:`sample_regmix_mixtures` draws mixtures from ``Dirichlet(s * p**0.5)`` with ``p`` the natural token
   shares and ``s`` drawn from 15 log-spaced values in ``[0.1, 5]``; small weights (< 2e-4) are zeroed and the
   rest renormalised, then any mixture with ``w_d > 15 p_d`` (the epoch cap) is rejected. Ours: the cap is
   checked *after* renormalising, so every returned mixture honours it. ``p**0.5`` is used as written (not
   renormalised), as in docs/methods.md.
2. :func:`run_regmix_sweep` trains one proxy per mixture with a user-supplied ``train_fn`` and counts the
   FLOPs spent deciding the mixture.
3. :func:`fit_regmix` fits LightGBM (learning rate 0.01, 1000 rounds, early stopping) or the ridge baseline
   on the (mixture, loss) table.
4. :func:`simulate_best_mixture` predicts 100k-1M simulated mixtures from the same prior and averages the
   top-100 (lowest predicted loss). :class:`RegMixMixer` does 3-4 once and then proposes that static mixture.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from tikmix_loader.errors import ConfigError, StateError
from tikmix_loader.mixing._surrogate import Surrogate, fit_lightgbm, fit_ridge
from tikmix_loader.mixing.base import Mixer, MixerConfig, MixingContext, MixtureSolution, option
from tikmix_loader.mixing.natural import token_shares

MODELS = ("lightgbm", "ridge")


def regmix_scales(num: int = 15, low: float = 0.1, high: float = 5.0) -> np.ndarray:
    """The Dirichlet scale grid: ``num`` log-spaced values in ``[low, high]``."""
    return np.geomspace(low, high, num)


def sample_regmix_mixtures(
    shares,
    num_mixtures: int = 512,
    *,
    seed: int = 0,
    temperature: float = 0.5,
    scales: np.ndarray | None = None,
    epoch_cap: float = 15.0,
    zero_below: float = 2e-4,
    batch_size: int = 4096,
    max_batches: int = 10_000,
) -> np.ndarray:
    """Draw RegMix mixtures (see the module docstring).

    Args:
        shares (array): Natural token shares ``p`` ``[n_domains]``, all > 0.
        num_mixtures (int): Mixtures to return. Default: 512.
        seed (int): RNG seed. Default: 0.
        temperature (float): Exponent on ``p`` in the Dirichlet concentration. Default: 0.5.
        scales (np.ndarray | None): Scale grid; default :func:`regmix_scales` (15 values in [0.1, 5]).
        epoch_cap (float): Reject mixtures with ``w_d > epoch_cap * p_d``. Default: 15.
        zero_below (float): Weights below this are set to 0 before renormalising. Default: 2e-4.
        batch_size (int): Draws per vectorised batch. Default: 4096.
        max_batches (int): Give up (``ConfigError``) after this many batches. Default: 10000.

    Returns:
        np.ndarray: ``[num_mixtures, n_domains]``, rows on the simplex.
    """
    p = np.asarray(shares, dtype=np.float64)
    if p.ndim != 1 or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ConfigError(f"RegMix `shares` must be finite and > 0 for every domain, got {p.tolist()}.")
    p = p / p.sum()
    scales = regmix_scales() if scales is None else np.asarray(scales, dtype=np.float64)
    rng = np.random.default_rng(seed)
    prior = p**temperature
    kept: list[np.ndarray] = []
    count = 0
    for _ in range(max_batches):
        scale = rng.choice(scales, size=batch_size)
        gammas = rng.gamma(scale[:, None] * prior[None, :])  # Dirichlet via normalised gammas, one s per row
        sums = gammas.sum(axis=1, keepdims=True)
        draws = np.divide(gammas, sums, out=np.zeros_like(gammas), where=sums > 0)
        draws[draws < zero_below] = 0.0
        totals = draws.sum(axis=1, keepdims=True)
        ok = totals[:, 0] > 0
        draws = draws[ok] / totals[ok]
        draws = draws[np.all(draws <= epoch_cap * p, axis=1)]
        kept.append(draws)
        count += len(draws)
        if count >= num_mixtures:
            return np.concatenate(kept)[:num_mixtures]
    raise ConfigError(
        f"RegMix sampling kept only {count} of {num_mixtures} mixtures after {max_batches * batch_size} "
        "draws; "
        f"the epoch cap {epoch_cap} x p is too tight for shares {np.round(p, 4).tolist()}."
    )


@dataclass(frozen=True)
class RegMixSweep:
    """The proxy sweep's table and its cost.

    Attributes:
        mixtures (np.ndarray): ``[R, n_domains]``.
        losses (np.ndarray): Target validation loss of each proxy ``[R]`` (lower is better).
        flops (np.ndarray): FLOPs of each proxy run ``[R]``.
        total_flops (float): ``flops.sum()``: RegMix's cost of deciding the mixture.
    """

    mixtures: np.ndarray
    losses: np.ndarray
    flops: np.ndarray
    total_flops: float


def run_regmix_sweep(
    train_fn: Callable[[np.ndarray], float],
    mixtures,
    *,
    flops_fn: Callable[[np.ndarray], float] | None = None,
    flops_per_run: float | None = None,
    progress: bool = True,
    desc: str = "RegMix proxies",
) -> RegMixSweep:
    """Train one proxy per mixture and record its loss and FLOPs.

    Args:
        train_fn (Callable[[np.ndarray], float]): Trains a fresh proxy on the mixture (same token budget for
            every run) and returns its target validation loss.
        mixtures (array): ``[R, n_domains]``, e.g. from :func:`sample_regmix_mixtures`.
        flops_fn (Callable[[np.ndarray], float] | None): FLOPs of the run for a mixture (e.g. ``6 * params *
            tokens``). Give this or ``flops_per_run``.
        flops_per_run (float | None): FLOPs of every run when they are all equal.
        progress (bool): Show a tqdm bar. Default: True.
        desc (str): The bar's label and the name in errors (QuaDMix's search reuses this sweep).
            Default: "RegMix proxies".
    """
    if (flops_fn is None) == (flops_per_run is None):
        raise ConfigError(
            "run_regmix_sweep needs exactly one of `flops_fn` or `flops_per_run` to count compute."
        )
    mixtures = np.asarray(mixtures, dtype=np.float64)
    losses, flops = [], []
    for row, mixture in enumerate(tqdm(mixtures, desc=desc, disable=not progress)):
        loss = float(train_fn(mixture.copy()))
        if not math.isfinite(loss):
            raise ConfigError(
                f"{desc}: run {row} (row {np.round(mixture, 4).tolist()}) returned loss {loss}."
            )
        losses.append(loss)
        flops.append(float(flops_fn(mixture) if flops_fn is not None else flops_per_run))
    flops = np.array(flops)
    return RegMixSweep(mixtures, np.array(losses), flops, float(flops.sum()))


def fit_regmix(
    mixtures,
    losses,
    *,
    model: str = "lightgbm",
    seed: int = 0,
    learning_rate: float = 0.01,
    num_rounds: int = 1000,
    early_stopping_rounds: int = 50,
    ridge_alpha: float = 1e-4,
) -> Surrogate:
    """Fit RegMix's regressor from mixture to loss: ``"lightgbm"`` (paper settings) or ``"ridge"``."""
    if model == "lightgbm":
        return fit_lightgbm(
            mixtures,
            losses,
            learning_rate=learning_rate,
            num_rounds=num_rounds,
            early_stopping_rounds=early_stopping_rounds,
            seed=seed,
        )
    if model == "ridge":
        return fit_ridge(mixtures, losses, alpha=ridge_alpha, seed=seed)
    raise ConfigError(f"RegMix `model` must be one of {MODELS}, got {model!r}.")


def simulate_best_mixture(
    surrogate: Surrogate,
    shares,
    *,
    num_simulations: int = 100_000,
    top_k: int = 100,
    seed: int = 0,
    chunk: int = 100_000,
) -> tuple[np.ndarray, float]:
    """Average the ``top_k`` of ``num_simulations`` prior mixtures with the lowest predicted loss.

    Returns:
        tuple[np.ndarray, float]: The mixture and the mean predicted loss of the top-k.
    """
    simulated = sample_regmix_mixtures(shares, num_simulations, seed=seed)
    predicted = np.concatenate(
        [surrogate.predict(simulated[i : i + chunk]) for i in range(0, len(simulated), chunk)]
    )
    top = np.argsort(predicted, kind="stable")[:top_k]
    best = simulated[top].mean(axis=0)
    return best / best.sum(), float(predicted[top].mean())


@dataclass(frozen=True)
class RegMixConfig(MixerConfig):
    """Options of :class:`RegMixMixer`."""

    model: str = option("lightgbm", "regressor: 'lightgbm' (paper) or 'ridge' (linear baseline)")
    num_simulations: int = option(100_000, "simulated mixtures scored by the regressor (paper: 100k-1M)")
    top_k: int = option(100, "lowest-loss simulated mixtures averaged (paper: 100)")
    learning_rate: float = option(0.01, "LightGBM learning rate (paper: 0.01)")
    num_rounds: int = option(1000, "LightGBM boosting rounds (paper: 1000)")
    early_stopping_rounds: int = option(50, "LightGBM early stopping patience")
    ridge_alpha: float = option(1e-4, "ridge L2 penalty")
    seed: int = option(0, "seed of the fit and the simulation")

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"RegMix `model` must be one of {MODELS}, got {self.model!r}.")
        if not 1 <= self.top_k <= self.num_simulations:
            raise ConfigError(
                f"RegMix needs 1 <= `top_k` <= `num_simulations`, got {self.top_k}, {self.num_simulations}."
            )


class RegMixMixer(Mixer):
    """RegMix as a mixer: fits the (mixture, loss) table once, then always proposes the simulated optimum.

    Args:
        mixtures (array): Proxy mixtures ``[R, n_domains]`` in the context's domain order.
        losses (array): Their target validation losses ``[R]`` (lower is better).
        **options: :class:`RegMixConfig` fields.

    The chosen mixture and a hash of the table are the state, so a resumed run proposes the same mixture
    without refitting, and a different table is refused.
    """

    name = "regmix"
    Config = RegMixConfig
    STATE_KEYS = ("weights", "table_hash", "predicted_loss", "valid_r2")

    def __init__(self, *, mixtures=None, losses=None, **options):
        super().__init__(**options)
        if mixtures is None or losses is None:
            raise ConfigError(
                "RegMix needs the proxy table: `mixtures` [R, n_domains] and `losses` [R] "
                "(see run_regmix_sweep)."
            )
        self.mixtures = np.asarray(mixtures, dtype=np.float64)
        self.losses = np.asarray(losses, dtype=np.float64)
        self.table_hash = hashlib.sha256(self.mixtures.tobytes() + self.losses.tobytes()).hexdigest()
        self.weights: np.ndarray | None = None
        self.predicted_loss: float | None = None
        self.valid_r2: float | None = None

    def propose(self, context: MixingContext) -> MixtureSolution:
        if self.mixtures.ndim != 2 or self.mixtures.shape[1] != context.num_domains:
            raise ConfigError(
                f"RegMix table has mixtures of shape {self.mixtures.shape}; the context has "
                f"{context.num_domains} domains {list(context.domains)}."
            )
        if self.weights is None:
            cfg = self.config
            surrogate = fit_regmix(
                self.mixtures,
                self.losses,
                model=cfg.model,
                seed=cfg.seed,
                learning_rate=cfg.learning_rate,
                num_rounds=cfg.num_rounds,
                early_stopping_rounds=cfg.early_stopping_rounds,
                ridge_alpha=cfg.ridge_alpha,
            )
            self.weights, self.predicted_loss = simulate_best_mixture(
                surrogate,
                token_shares(context, self.name),
                num_simulations=cfg.num_simulations,
                top_k=cfg.top_k,
                seed=cfg.seed,
            )
            self.valid_r2 = surrogate.valid_r2
        terms = {
            "predicted_loss": self.predicted_loss,
            "valid_r2": self.valid_r2,
            "num_proxies": len(self.losses),
        }
        return MixtureSolution(
            self.weights,
            "surrogate",
            f"RegMix {self.config.model} fit on "
            f"{len(self.losses)} proxies, top-{self.config.top_k} simulated mixtures",
            None,
            terms,
        )

    def _get_state(self) -> dict:
        weights = None if self.weights is None else self.weights.tolist()
        return {
            "weights": weights,
            "table_hash": self.table_hash,
            "predicted_loss": self.predicted_loss,
            "valid_r2": self.valid_r2,
        }

    def _set_state(self, state: dict) -> None:
        if state["table_hash"] != self.table_hash:
            raise StateError(
                "RegMix state was saved with another (mixture, loss) table; pass the same table."
            )
        self.weights = None if state["weights"] is None else np.asarray(state["weights"], dtype=np.float64)
        self.predicted_loss, self.valid_r2 = state["predicted_loss"], state["valid_r2"]
