"""Regressors from a mixture to its measured quality: LightGBM (optional extra) and a closed-form ridge.

TiKMiX-M and RegMix both fit one. LightGBM is imported only when a fit runs, so the rest of the package works
without the ``lightgbm`` extra; its absence raises ``MissingExtraError`` with the install command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tikmix_loader.errors import ConfigError, MissingExtraError

INSTALL_HINT = "pip install 'tikmix-loader[lightgbm]'  (or: pip install lightgbm)"


def require_lightgbm():
    """Import and return ``lightgbm``, or raise ``MissingExtraError`` saying how to install it."""
    try:
        import lightgbm
    except ImportError as exc:
        raise MissingExtraError(
            f"TiKMiX-M and RegMix fit a LightGBM surrogate, but `lightgbm` is not installed; "
            f"run {INSTALL_HINT}, "
            "or use RegMix with model='ridge'."
        ) from exc
    return lightgbm


@dataclass(frozen=True)
class Surrogate:
    """A fitted regressor.

    Attributes:
        predict (Callable[[np.ndarray], np.ndarray]): ``[N, n_domains] -> [N]`` predictions.
        kind (str): ``"lightgbm"`` or ``"ridge"``.
        valid_r2 (float | None): R^2 on the held-out split (None when there was none).
        num_rounds (int): Boosting rounds kept after early stopping (0 for ridge).
    """

    predict: Callable[[np.ndarray], np.ndarray]
    kind: str
    valid_r2: float | None
    num_rounds: int


def r2_score(y: np.ndarray, prediction: np.ndarray) -> float:
    """Coefficient of determination; 0 for a constant target."""
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - prediction) ** 2)) / total if total > 0 else 0.0


def _check_table(X, y) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < 2:
        raise ConfigError(
            f"Surrogate table needs X [N >= 2, n_domains] and y [N]; got {X.shape} and {y.shape}."
        )
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ConfigError("Surrogate table has NaN or inf mixtures or labels; drop the failed runs first.")
    return X, y


def _split(num_rows: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_rows)
    num_valid = int(round(valid_fraction * num_rows))
    return order[num_valid:], order[:num_valid]


def fit_lightgbm(
    X,
    y,
    *,
    learning_rate: float = 0.01,
    num_rounds: int = 1000,
    early_stopping_rounds: int = 50,
    valid_fraction: float = 0.2,
    seed: int = 0,
    params: dict | None = None,
) -> Surrogate:
    """Fit a LightGBM regressor (single-threaded and deterministic), early-stopped on a held-out split.

    Args:
        X (array): Mixtures ``[N, n_domains]``.
        y (array): Labels ``[N]``.
        learning_rate (float): Shrinkage. Default: 0.01 (RegMix's value).
        num_rounds (int): Maximum boosting rounds. Default: 1000 (RegMix's value).
        early_stopping_rounds (int): Stop when the held-out L2 has not improved for this many rounds.
            Default: 50.
        valid_fraction (float): Share of rows held out for early stopping and ``valid_r2``; 0 disables both.
            Default: 0.2.
        seed (int): Seeds the split and LightGBM. Default: 0.
        params (dict | None): Extra LightGBM parameters, overriding ours. Default: None.
    """
    lightgbm = require_lightgbm()
    X, y = _check_table(X, y)
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"`valid_fraction` must be in [0, 1), got {valid_fraction}.")
    train, valid = _split(len(y), valid_fraction, seed)
    settings = {
        "objective": "regression",
        "learning_rate": learning_rate,
        "min_data_in_leaf": max(2, min(20, len(train) // 10)),
        "num_threads": 1,
        "deterministic": True,
        "force_col_wise": True,
        "seed": seed,
        "verbosity": -1,
        **(params or {}),
    }
    train_set = lightgbm.Dataset(X[train], y[train], params={"verbosity": -1})
    valid_sets, callbacks = [], []
    if len(valid):
        valid_sets = [lightgbm.Dataset(X[valid], y[valid], reference=train_set)]
        callbacks = [lightgbm.early_stopping(early_stopping_rounds, verbose=False)]
    booster = lightgbm.train(
        settings, train_set, num_boost_round=num_rounds, valid_sets=valid_sets, callbacks=callbacks
    )
    rounds = booster.best_iteration or num_rounds

    def predict(mixtures: np.ndarray) -> np.ndarray:
        return booster.predict(np.asarray(mixtures, dtype=np.float64), num_iteration=rounds)

    valid_r2 = r2_score(y[valid], predict(X[valid])) if len(valid) else None
    return Surrogate(predict, "lightgbm", valid_r2, int(rounds))


def fit_ridge(X, y, *, alpha: float = 1e-4, valid_fraction: float = 0.2, seed: int = 0) -> Surrogate:
    """Linear ridge regression ``y ~ X beta + c`` in closed form (RegMix's linear baseline).

    Hand-written with NumPy because it is four lines and keeps scikit-learn out of the dependencies.

    Args:
        X (array): Mixtures ``[N, n_domains]``.
        y (array): Labels ``[N]``.
        alpha (float): L2 penalty on ``beta`` (not on the intercept). Default: 1e-4.
        valid_fraction (float): Share held out to report ``valid_r2``; the final fit uses every row.
            Default: 0.2.
        seed (int): Seeds the split. Default: 0.
    """
    X, y = _check_table(X, y)

    def solve(rows):
        design = np.hstack([X[rows], np.ones((len(rows), 1))])
        penalty = alpha * np.diag(np.r_[np.ones(X.shape[1]), 0.0])
        coef = np.linalg.solve(design.T @ design + penalty, design.T @ y[rows])
        return lambda mixtures: np.asarray(mixtures, dtype=np.float64) @ coef[:-1] + coef[-1]

    train, valid = _split(len(y), valid_fraction, seed)
    valid_r2 = r2_score(y[valid], solve(train)(X[valid])) if len(valid) else None
    return Surrogate(solve(np.arange(len(y))), "ridge", valid_r2, 0)
