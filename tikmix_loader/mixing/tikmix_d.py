"""TiKMiX-D: choose the mixture maximising normalised Group Influence by direct optimisation (docs/methods.md
§4).

Problem (paper, with the project's additions marked "ours")::

    Phat_b(w) = (S w)_b / (max_d S[b, d] + 1e-8)        (ours: max_d |S[b, d]| when that max is <= 0)
    minimise   alpha * std(Phat) - beta * sum(Phat) - gamma * H(w),   H(w) = -sum_d w_d log w_d
    subject to sum w = 1,  lo <= w <= hi,  S w >= S w_prior   (element-wise: no target gets worse)

``std`` is the population standard deviation over targets (ddof = 0). The bounds are ``min_weight`` /
``max_weight`` (ours) tightened by availability caps ``w_d <= available_tokens_d * max_epochs_d /
remaining_tokens`` (ours) and, optionally, a trust region ``w_prior_d / max_step <= w_d <= max_step *
w_prior_d`` (ours: online decisions see a noisy S, and the box limits how far one decision can move the
mixture, like TiKMiX-M's ``[w_D / 2, 2 w_D]`` candidate box). The problem is convex (a norm of an affine
map, a linear term and the negative entropy), so any local solution is global. Optionally (ours, ``step`` <
1) the answer is only part of the way from ``w_prior`` to the solution (:func:`partial_step`): measured
outcomes are concave in ``w``, so the full step of this nearly linear objective overshoots (docs/methods.md
§4).

Solvers. Both are SciPy SLSQP with analytic gradients:

* ``"dual"`` (ours; the default whenever ``gamma > 0``) exploits the structure. The entropy makes the inner
  minimisation over ``w`` a clipped Gibbs distribution ``w_d = clip(exp(-c_d / gamma - tau), lo_d, hi_d)``,
  so the Lagrange dual lives in ``2 n_targets`` variables (a unit-ball multiplier ``u`` for the std and
  ``lambda >= 0`` for the Pareto rows) instead of ``n_domains``. SLSQP's dense quasi-Newton step costs
  ``O(dim^3)`` and needs about ``dim`` iterations to learn the entropy's diagonal curvature ``gamma / w_d``,
  so on ``w`` it takes seconds at 256 domains and, when weights span several orders of magnitude, can stop
  1e-5 above the optimum; the dual takes milliseconds. The primal ``w`` is recovered from the
  dual optimum, violated Pareto rows are made to hold to 1e-12 by damped Newton steps on their multipliers,
  and the result is accepted only with a duality-gap certificate (``GAP_RTOL``); otherwise the primal
  solver runs. The dual starts at ``u = 0, lambda = 0``.
* ``"primal"`` optimises ``w`` directly (the paper's formulation; used when ``gamma = 0`` and as the
  dual's fallback), started from the uniform mixture moved into the bounds (ours: the max-entropy point of
  the box-simplex, which is the uniform mixture whenever the bounds allow it); the Pareto constraint may
  be violated at the start, which SLSQP handles.

Both see reduced Pareto rows (ours): rows are centred (``1^T (w - w_prior) = 0`` makes a constant shift
irrelevant), rows that become zero are dropped (always satisfied) and parallel rows are merged, so SLSQP
never sees a rank-deficient constraint matrix. Availability caps become per-domain upper bounds rather than
constraints.

Safety. Non-finite, all-zero, all-non-positive or rank-one (with >= 2 targets) ``S``, infeasible caps, a
failed solve, a constraint violated beyond ``FEASIBILITY_TOL`` or a result worse than ``w_prior`` all return
``w_prior`` with ``fallback=True`` and the reason. BLAS pools are pinned to one thread during the solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog, minimize

from tikmix_loader.errors import ConfigError, MixtureWeightError
from tikmix_loader.mixing._threads import blas_threads
from tikmix_loader.mixing.base import Mixer, MixerConfig, MixingContext, MixtureSolution, option

SCALE_EPS = 1e-8  # docs/methods.md §4: Phat_b = P_b / (max_d S[b, d] + 1e-8)
LOG_FLOOR = 1e-300  # w is clipped here inside log so the entropy and its gradient stay finite at w_d = 0
FEASIBILITY_TOL = 1e-9  # allowed Pareto / simplex violation, in units of the target's best-domain influence
RANK_ONE_RTOL = 1e-9  # S is rank one when its second singular value is below this times the first
GAP_RTOL = 1e-8  # the dual solution is accepted when f(w) - g(u, lambda) <= this times max(1, |f(w)|)
METHODS = ("auto", "primal", "dual")


# ---------------------------------------------------------------- objective


class TikmixObjective:
    """The TiKMiX-D objective and its analytic gradient for one influence matrix.

    Args:
        S (np.ndarray): Influence ``[n_targets, n_domains]``.
        alpha (float): Weight of ``std(Phat)``. Default: 1.
        beta (float): Weight of ``-sum(Phat)``. Default: 1.
        gamma (float): Weight of ``-H(w)``. Default: 1.
    """

    def __init__(self, S: np.ndarray, *, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0):
        S = np.asarray(S, dtype=np.float64)
        row_max = S.max(axis=1)
        self.scale = np.where(row_max > 0, row_max, np.abs(S).max(axis=1)) + SCALE_EPS
        self.A = S / self.scale[:, None]  # Phat = A w
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self._column_sums = self.A.sum(axis=0)

    def terms(self, w: np.ndarray) -> dict[str, float]:
        """Unweighted parts: ``std`` and ``sum`` of ``Phat`` and the entropy ``H(w)``."""
        phat = self.A @ w
        safe = np.maximum(w, LOG_FLOOR)
        return {
            "std": float(np.std(phat)),
            "sum": float(phat.sum()),
            "entropy": float(-np.sum(w * np.log(safe))),
        }

    def value(self, w: np.ndarray) -> float:
        """``alpha * std(Phat) - beta * sum(Phat) - gamma * H(w)``."""
        terms = self.terms(w)
        return self.alpha * terms["std"] - self.beta * terms["sum"] - self.gamma * terms["entropy"]

    def grad(self, w: np.ndarray) -> np.ndarray:
        """Analytic gradient: ``alpha A^T (Phat - mean) / (n std) - beta A^T 1 + gamma (log w + 1)``.

        The std term is not differentiable where all targets are equal (std = 0); there we return the
        zero subgradient. ``log w`` uses ``w`` clipped at ``LOG_FLOOR``.
        """
        grad = -self.beta * self._column_sums + self.gamma * (np.log(np.maximum(w, LOG_FLOOR)) + 1.0)
        phat = self.A @ w
        centred = phat - phat.mean()
        std = math.sqrt(centred @ centred / len(phat))
        if self.alpha and std > 0:
            grad += self.alpha * (self.A.T @ centred) / (len(phat) * std)
        return grad


# ---------------------------------------------------------------- input checks


def degeneracy(S: np.ndarray) -> str | None:
    """Why ``S`` cannot be trusted for a solve, or None. Checked in this order:

    non-finite entries; all zero; every entry <= 0 (no domain helps any target); rank one with two or more
    targets (every target's row is a multiple of one vector, so the "balance across targets" the std term
    asks for carries no information, which usually means the influence estimate collapsed). One target is
    rank one by construction and is allowed.
    """
    if not np.all(np.isfinite(S)):
        bad = np.argwhere(~np.isfinite(S))[:3].tolist()
        return f"degenerate S: contains NaN or inf (first at [target, domain] {bad})"
    if not np.any(S):
        return "degenerate S: all entries are zero"
    if np.all(S <= 0):
        return f"degenerate S: every entry is <= 0 (max {S.max():.3g}); no domain helps any target"
    if S.shape[0] >= 2:
        singular = np.linalg.svd(S, compute_uv=False)
        if singular[1] <= RANK_ONE_RTOL * singular[0]:
            return f"degenerate S: rank one (singular values {singular[0]:.3g}, {singular[1]:.3g})"
    return None


def _check_prior(w_prior, num_domains: int) -> np.ndarray:
    w = np.asarray(w_prior, dtype=np.float64)
    if w.shape != (num_domains,):
        raise MixtureWeightError(
            f"`w_prior` must have one weight per domain ({num_domains}), got shape {w.shape}."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not math.isclose(w.sum(), 1.0, abs_tol=1e-6):
        raise MixtureWeightError(
            f"`w_prior` must be finite, >= 0 and sum to 1 (it is the fallback), got {w.tolist()} "
            f"with sum {w.sum()!r}."
        )
    return w.copy()  # not renormalised: a fallback returns exactly the weights in force


def weight_bounds(
    num_domains: int,
    min_weight: float,
    max_weight: float,
    available_tokens=None,
    remaining_tokens: float | None = None,
    max_epochs=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain bounds ``lo, hi`` of the weights.

    Availability caps ``available_tokens_d * max_epochs_d / remaining_tokens`` tighten ``hi`` and win over
    ``min_weight`` (data cannot be conjured), so ``lo`` is lowered to a cap below it.

    Args:
        num_domains (int): Number of domains.
        min_weight (float): Lower bound of every weight.
        max_weight (float): Upper bound of every weight.
        available_tokens (array | None): Tokens per domain per epoch; caps are off when None. Default: None.
        remaining_tokens (float | None): Training tokens still to come; needed with ``available_tokens``.
        max_epochs (float | array | None): Epochs allowed per domain; None means 1, ``inf`` no cap.

    Raises:
        ConfigError: Bounds no mixture can meet, or bad cap arguments.
    """
    check_weight_range(min_weight, max_weight)
    if min_weight * num_domains > 1 + 1e-12 or max_weight * num_domains < 1 - 1e-12:
        raise ConfigError(
            f"No mixture of {num_domains} domains fits `min_weight`={min_weight}, `max_weight`={max_weight}: "
            f"need min_weight <= 1/{num_domains} <= max_weight."
        )
    lo = np.full(num_domains, float(min_weight))
    hi = np.full(num_domains, float(max_weight))
    if (available_tokens is None) != (remaining_tokens is None):
        raise ConfigError(
            "Availability caps need both `available_tokens` and `remaining_tokens` (or neither)."
        )
    if available_tokens is not None:
        available = np.broadcast_to(np.asarray(available_tokens, dtype=np.float64), (num_domains,))
        epochs = np.broadcast_to(
            np.asarray(1.0 if max_epochs is None else max_epochs, dtype=np.float64), (num_domains,)
        )
        if not (np.all(np.isfinite(available)) and np.all(available >= 0)):
            raise ConfigError(f"`available_tokens` must be finite and >= 0, got {available.tolist()}.")
        if not np.all(epochs > 0):
            raise ConfigError(f"`max_epochs` must be > 0 (inf for unlimited), got {epochs.tolist()}.")
        if not (math.isfinite(remaining_tokens) and remaining_tokens > 0):
            raise ConfigError(f"`remaining_tokens` must be finite and > 0, got {remaining_tokens}.")
        with np.errstate(invalid="ignore"):
            caps = np.where(np.isinf(epochs), np.inf, available * epochs / remaining_tokens)
        hi = np.minimum(hi, caps)
        lo = np.minimum(lo, hi)
    return lo, hi


def check_weight_range(min_weight: float, max_weight: float) -> None:
    """Raise ``ConfigError`` unless ``0 <= min_weight <= max_weight <= 1``."""
    if not 0 <= min_weight <= max_weight <= 1:
        raise ConfigError(f"Need 0 <= `min_weight` <= `max_weight` <= 1, got {min_weight} and {max_weight}.")


def check_objective_options(alpha: float, beta: float, gamma: float, method: str) -> None:
    """Raise ``ConfigError`` unless the objective's weights are finite and >= 0 and ``method`` is known."""
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"`{name}` must be finite and >= 0, got {value}.")
    if method not in METHODS:
        raise ConfigError(f"`method` must be one of {METHODS}, got {method!r}.")


def check_max_step(max_step) -> None:
    """Raise ``ConfigError`` unless ``max_step`` is a finite number > 1."""
    if not (isinstance(max_step, (int, float)) and math.isfinite(max_step) and max_step > 1):
        raise ConfigError(f"`max_step` must be a finite number > 1 (None: no trust region), got {max_step}.")


def trust_region(
    lo: np.ndarray, hi: np.ndarray, w_prior: np.ndarray, max_step: float
) -> tuple[np.ndarray, np.ndarray]:
    """``lo, hi`` tightened to the box ``[w_prior / max_step, max_step * w_prior]`` around the prior.

    A domain at zero weight may still rise to its ``lo`` (``min_weight``): set a ``min_weight`` to keep every
    domain reachable. The box contains ``w_prior``, so it never makes an in-bounds prior infeasible.

    Raises:
        ConfigError: ``max_step`` is not a finite number > 1.
    """
    check_max_step(max_step)
    hi = np.minimum(hi, np.maximum(max_step * w_prior, lo))
    return np.minimum(np.maximum(lo, w_prior / max_step), hi), hi


def check_step(step) -> None:
    """Raise ``ConfigError`` unless ``step`` is a number in (0, 1]."""
    if not (isinstance(step, (int, float)) and 0 < step <= 1):
        raise ConfigError(f"`step` must be a number in (0, 1] (1: the solved mixture itself), got {step}.")


def partial_step(w_prior: np.ndarray, w: np.ndarray, lo: np.ndarray, hi: np.ndarray, step: float) -> float:
    """The fraction ``t`` of the way from ``w_prior`` to the solved ``w`` that a partial step takes: ``step``,
    raised to the smallest ``t`` whose point ``w_prior + t (w - w_prior)`` is inside ``[lo, hi]`` when the
    prior itself is outside (e.g. above an availability cap); ``w`` is inside, so ``t = 1`` always is.

    Every point of the segment is on the simplex and keeps the Pareto rows (they are linear and hold at both
    ends), and the objective is convex, so it is no worse than at ``w_prior``.
    """
    check_step(step)
    move = w - w_prior
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.where((w_prior < lo) & (move > 0), (lo - w_prior) / move, 0.0)
        above = np.where((w_prior > hi) & (move < 0), (hi - w_prior) / move, 0.0)
    return float(min(1.0, max(step, below.max(initial=0.0), above.max(initial=0.0))))


def _pareto_rows(A: np.ndarray, w_prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-redundant Pareto rows ``R`` and right-hand side ``R w_prior`` with ``R w >= R w_prior`` equivalent
    to ``A w >= A w_prior`` on the simplex (centred, zero rows dropped, parallel rows merged, unit norm)."""
    centred = A - A.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    keep = norms > 1e-12 * max(1.0, np.abs(A).max())
    rows = centred[keep] / norms[keep, None]
    unique: list[np.ndarray] = []
    for row in rows:
        if not any(row @ other > 1 - 1e-12 for other in unique):
            unique.append(row)
    R = np.array(unique).reshape(len(unique), A.shape[1])
    return R, R @ w_prior


# ---------------------------------------------------------------- the two solvers


def _box_gibbs(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``w = clip(exp(a - tau), lo, hi)`` with ``tau`` such that ``sum w = 1``: the maximiser of
    ``a^T w + H(w)`` over the box-simplex (``sum lo <= 1 <= sum hi``). Safeguarded Newton on the monotone
    scalar equation in ``tau``; hand-written because it runs inside every dual evaluation, where a generic
    SciPy root finder's per-call overhead would dominate."""
    top = a.max()
    scaled = np.exp(a - top)
    total = scaled.sum()
    softmax = scaled / total
    if np.all(softmax >= lo) and np.all(softmax <= hi):
        return softmax  # no bound active: the plain softmax (the common case)
    lo_total = float(lo.sum())
    if lo_total >= 1.0 - 1e-15:
        return lo / lo_total
    with np.errstate(divide="ignore"):
        left = float(np.min(a - np.log(hi)))  # every domain at hi here (hi_d = 0 never binds): sum >= 1
    right = top + math.log(total) - math.log(1.0 - lo_total)  # sum(clip) <= sum(exp) + sum(lo) <= 1 here
    tau = min(max(top + math.log(total), left), right)
    for _ in range(200):
        with np.errstate(over="ignore"):
            raw = np.exp(a - tau)  # inf or 0 at the extremes, which the clip turns into hi or lo
        w = np.clip(raw, lo, hi)
        excess = w.sum() - 1.0
        if abs(excess) <= 1e-15 or right - left <= 1e-15 * max(1.0, abs(tau)):
            break
        if excess > 0:
            left = tau
        else:
            right = tau
        slope = w[(raw > lo) & (raw < hi)].sum()
        step = tau + excess / slope if slope > 0 else math.nan
        tau = step if left < step < right else 0.5 * (left + right)
    return w


class _Dual:
    """Lagrange dual of TiKMiX-D in ``x = [u (n_targets), lambda (n_pareto)]``; see the module docstring.

    ``g(u, lambda) = lambda^T b + min_w [c^T w - gamma H(w)]`` with
    ``c = A^T (alpha/sqrt(n) C u - beta 1) - R^T lambda`` and ``C`` the centring matrix.
    """

    def __init__(self, objective: TikmixObjective, R, b, lo, hi):
        self.objective, self.R, self.b, self.lo, self.hi = objective, R, b, lo, hi
        self.n = objective.A.shape[0]
        self.k = objective.alpha / math.sqrt(self.n)

    def primal(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, lam = x[: self.n], x[self.n :]
        c = self.objective.A.T @ (self.k * (u - u.mean()) - self.objective.beta) - self.R.T @ lam
        return c, _box_gibbs(-c / self.objective.gamma, self.lo, self.hi)

    def value(self, x: np.ndarray) -> float:
        c, w = self.primal(x)
        return float(x[self.n :] @ self.b + c @ w - self.objective.gamma * _entropy(w))

    def negative_value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        c, w = self.primal(x)
        phat = self.objective.A @ w
        grad_u = self.k * (phat - phat.mean())
        grad_lam = self.b - self.R @ w
        value = x[self.n :] @ self.b + c @ w - self.objective.gamma * _entropy(w)
        return -float(value), -np.concatenate([grad_u, grad_lam])

    def polish(self, x: np.ndarray, max_steps: int = 20) -> tuple[np.ndarray, int]:
        """Raise the multipliers of violated Pareto rows (``u`` fixed) by damped Newton steps until every
        row holds to 1e-12. The dual leaves violations of about 1e-10; the fix moves along the same Gibbs
        family, so the objective changes only to second order (the duality gap is checked afterwards)."""
        x = x.copy()

        def worst(candidate):
            return float(np.max(self.b - self.R @ self.primal(candidate)[1], initial=0.0))

        for step in range(max_steps):
            _, w = self.primal(x)
            residual = self.R @ w - self.b
            if residual.size == 0 or residual.min() >= -1e-12:
                return x, step
            rows = self.R[residual < 0]
            free = np.where((w > self.lo) & (w < self.hi), w, 0.0)
            mean = rows @ free / max(free.sum(), LOG_FLOOR)
            jacobian = ((rows * free) @ rows.T - np.outer(mean, rows @ free)) / self.objective.gamma
            jacobian += 1e-12 * max(np.trace(jacobian), LOG_FLOOR) * np.eye(len(rows))
            delta = np.linalg.lstsq(jacobian, -residual[residual < 0], rcond=None)[0]
            current, scale = -residual.min(), 1.0
            while scale > 1e-6:
                trial = x.copy()
                trial[self.n :][residual < 0] = np.maximum(x[self.n :][residual < 0] + scale * delta, 0.0)
                if worst(trial) < current:
                    x = trial
                    break
                scale /= 2
            else:
                return x, step
        return x, max_steps


def _entropy(w: np.ndarray) -> float:
    return float(-np.sum(w * np.log(np.maximum(w, LOG_FLOOR))))


def _solve_dual(objective, R, b, lo, hi, tol, max_iter) -> tuple[np.ndarray, bool, int, str]:
    """The dual solve: the recovered ``w``, whether it passed the gap and feasibility checks, iterations
    and a message. A rejected ``w`` still serves the primal solver as a warm start and scale."""
    dual = _Dual(objective, R, b, lo, hi)
    n, k = dual.n, len(b)
    u_part = np.concatenate([np.ones(n), np.zeros(k)])
    constraints = [
        {
            "type": "ineq",
            "fun": lambda x: 1.0 - x[:n] @ x[:n],
            "jac": lambda x: np.r_[-2 * x[:n], np.zeros(k)][None],
        },
        {"type": "eq", "fun": lambda x: np.array([x[:n].sum()]), "jac": lambda x: u_part[None]},
    ]
    # Where the Pareto set has no interior (e.g. w_prior is the only feasible point) the multipliers run off
    # to infinity; the NaNs that follow fail the gap check below and the primal solver takes over.
    with np.errstate(invalid="ignore", over="ignore"):
        result = minimize(
            dual.negative_value_and_grad,
            np.zeros(n + k),
            jac=True,
            method="SLSQP",
            bounds=[(-1.0, 1.0)] * n + [(0.0, None)] * k,
            constraints=constraints,
            options={"maxiter": max_iter, "ftol": tol * 1e-4},
        )
        x, polish_steps = dual.polish(result.x)
        _, w = dual.primal(x)
        gap = objective.value(w) - dual.value(x)
    iterations = int(result.nit) + polish_steps
    violation = float(np.max(b - R @ w, initial=0.0))
    if not (gap <= GAP_RTOL * max(1.0, abs(objective.value(w))) and violation <= FEASIBILITY_TOL):
        message = (
            f"dual SLSQP (status {result.status}: {result.message}) left duality gap {gap:.3g} and "
            f"Pareto violation {violation:.3g}"
        )
        return w, False, iterations, message
    return w, True, iterations, f"dual SLSQP converged, duality gap {gap:.2g}"


def _pareto_feasible(R, b, lo, hi) -> bool:
    """Whether some ``w`` in the box-simplex has ``R w >= b`` (a HiGHS feasibility LP)."""
    ones = np.ones((1, len(lo)))
    result = linprog(
        np.zeros(len(lo)),
        A_ub=-R if len(b) else None,
        b_ub=-b if len(b) else None,
        A_eq=ones,
        b_eq=[1.0],
        bounds=list(zip(lo, hi, strict=True)),
        method="highs",
    )
    return result.status != 2  # 2: infeasible; anything else (solved, numerical trouble) lets the solver try


def _solve_primal(objective, R, b, lo, hi, start, scale, tol, max_iter) -> tuple[np.ndarray | None, int, str]:
    """SLSQP on ``z = w / scale``. A scale of ``sqrt(w_ref)`` for a rough estimate ``w_ref`` of the optimum
    turns the entropy's curvature ``gamma / w`` into about ``gamma`` in every coordinate, which SLSQP's
    identity-initialised quasi-Newton matrix then needs a few iterations, not ``n_domains``, to learn."""
    constraints = [
        {"type": "eq", "fun": lambda z: np.array([scale @ z - 1.0]), "jac": lambda z: scale[None]},
    ]
    if len(b):
        scaled_rows = R * scale
        constraints.append(
            {"type": "ineq", "fun": lambda z: scaled_rows @ z - b, "jac": lambda z: scaled_rows}
        )
    result = minimize(
        lambda z: objective.value(scale * z),
        start / scale,
        jac=lambda z: scale * objective.grad(scale * z),
        method="SLSQP",
        bounds=list(zip(lo / scale, hi / scale, strict=True)),
        constraints=constraints,
        options={"maxiter": max_iter, "ftol": tol},
    )
    message = f"SLSQP status {result.status}: {result.message}"
    return (scale * result.x if result.success else None), int(result.nit), message


# ---------------------------------------------------------------- entry point


def solve_tikmix_d(
    S,
    w_prior,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    min_weight: float = 0.0,
    max_weight: float = 1.0,
    available_tokens=None,
    remaining_tokens: float | None = None,
    max_epochs=None,
    max_step: float | None = None,
    step: float = 1.0,
    method: str = "auto",
    tol: float = 1e-10,
    max_iter: int = 1000,
) -> MixtureSolution:
    """Solve TiKMiX-D (docs/methods.md §4) for one influence matrix.

    Args:
        S (array): Group Influence ``[n_targets, n_domains]``, positive = helpful.
        w_prior (array): Current mixture ``[n_domains]`` on the simplex; feasible for the Pareto constraint
            and the fallback.
        alpha (float): Weight of the std of normalised influence (balance across targets). Default: 1.
        beta (float): Weight of the sum of normalised influence. Default: 1.
        gamma (float): Weight of the mixture entropy. Default: 1.
        min_weight (float): Lower bound of every weight. Default: 0.
        max_weight (float): Upper bound of every weight. Default: 1.
        available_tokens (array | None): Tokens per domain per epoch still available; with
            ``remaining_tokens`` caps ``w_d <= available_tokens_d * max_epochs_d / remaining_tokens``.
            Default: None (no caps).
        remaining_tokens (float | None): Training tokens still to come. Default: None.
        max_epochs (float | array | None): Epochs allowed per domain; None means 1, ``inf`` no cap.
        max_step (float | None): Trust region: keep ``w_prior_d / max_step <= w_d <= max_step * w_prior_d``
            (see :func:`trust_region`). Default: None (off, as in the paper).
        step (float): Partial step (ours): return ``w_prior + step (w* - w_prior)`` for the solution ``w*``
            (see :func:`partial_step`; docs/methods.md §4 on why). Default: 1 (``w*`` itself, the paper).
        method (str): ``"auto"``, ``"primal"`` or ``"dual"`` (see the module docstring). Default: ``"auto"``.
        tol (float): SLSQP ``ftol`` of the primal solve; the dual, whose value is flat near its optimum,
            uses ``tol * 1e-4``. Default: 1e-10.
        max_iter (int): SLSQP iteration limit. Default: 1000.

    Returns:
        MixtureSolution: ``status`` is ``"optimal"`` or ``"fallback"``; ``terms`` holds ``std``, ``sum``,
        ``entropy`` at the returned weights, ``prior_objective`` and, with ``step < 1``, the ``step``
        taken; ``iterations`` counts SLSQP iterations
        (plus polish steps for the dual).

    Raises:
        ConfigError: Bad shapes, coefficients, bounds or caps arguments, or an unknown ``method``.
        MixtureWeightError: ``w_prior`` is NaN, negative, not on the simplex or the wrong length.
    """
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] == 0 or S.shape[1] == 0:
        raise ConfigError(f"`S` must be a [n_targets >= 1, n_domains >= 1] matrix, got shape {S.shape}.")
    num_domains = S.shape[1]
    w_prior = _check_prior(w_prior, num_domains)
    check_objective_options(alpha, beta, gamma, method)
    check_step(step)
    lo, hi = weight_bounds(
        num_domains, min_weight, max_weight, available_tokens, remaining_tokens, max_epochs
    )
    if max_step is not None:
        lo, hi = trust_region(lo, hi, w_prior, max_step)

    def fallback(reason: str, iterations: int = 0) -> MixtureSolution:
        if not np.all(np.isfinite(S)):
            return MixtureSolution(w_prior, "fallback", reason, iterations=iterations, fallback=True)
        objective = TikmixObjective(S, alpha=alpha, beta=beta, gamma=gamma)
        terms = {**objective.terms(w_prior), "prior_objective": objective.value(w_prior)}
        return MixtureSolution(w_prior, "fallback", reason, objective.value(w_prior), terms, iterations, True)

    reason = degeneracy(S)
    if reason:
        return fallback(reason)
    if hi.sum() < 1.0 - FEASIBILITY_TOL:
        return fallback(
            f"infeasible: availability caps allow at most {hi.sum():.4g} of the remaining tokens "
            f"(caps {np.round(hi, 6).tolist()}); raise `max_epochs` or add data"
        )
    objective = TikmixObjective(S, alpha=alpha, beta=beta, gamma=gamma)
    R, b = _pareto_rows(objective.A, w_prior)
    prior_in_bounds = bool(np.all(w_prior >= lo - 1e-12) and np.all(w_prior <= hi + 1e-12))
    if not prior_in_bounds and not _pareto_feasible(R, b, lo, hi):
        return fallback(
            "infeasible: no mixture within the bounds and caps keeps every target at least as good as "
            "w_prior (w_prior itself is outside the bounds); relax `min_weight` / `max_weight` or the caps"
        )
    use_dual = method == "dual" or (method == "auto" and gamma > 0)
    if use_dual and gamma <= 0:
        raise ConfigError(
            "`method='dual'` needs `gamma` > 0 (the entropy makes the dual smooth); use 'primal'."
        )
    iterations, messages = 0, []
    with blas_threads(1):
        w = reference = None
        if use_dual:
            candidate, accepted, iterations, message = _solve_dual(objective, R, b, lo, hi, tol, max_iter)
            messages.append(message)
            w = candidate if accepted else None
            reference = candidate if np.all(np.isfinite(candidate)) else None
        if w is None:
            if reference is None:  # the uniform mixture moved into the bounds, unscaled
                start, scale = _box_gibbs(np.zeros(num_domains), lo, hi), np.ones(num_domains)
            else:  # warm start from the rejected dual estimate, scaled by it
                start, scale = reference, np.sqrt(np.maximum(reference, 1e-3 / num_domains))
            w, primal_iterations, message = _solve_primal(
                objective, R, b, lo, hi, start, scale, tol, max_iter
            )
            iterations += primal_iterations
            messages.append(message)
    if w is None:
        return fallback("solver failed: " + "; ".join(messages), iterations)
    w = np.clip(w, lo, hi)
    w = w / w.sum()
    violation = float(np.max(objective.A @ w_prior - objective.A @ w, initial=0.0))
    if violation > FEASIBILITY_TOL:
        return fallback(f"solver result violates the Pareto constraint by {violation:.3g}", iterations)
    value, prior_value = objective.value(w), objective.value(w_prior)
    if prior_in_bounds and value > prior_value + 1e-9 * max(1.0, abs(prior_value)):
        return fallback(f"solver result ({value:.6g}) is worse than w_prior ({prior_value:.6g})", iterations)
    terms = {"prior_objective": prior_value}
    if step < 1.0:
        terms["step"] = partial_step(w_prior, w, lo, hi, step)
        w = w_prior + terms["step"] * (w - w_prior)
        value = objective.value(w)
    terms = {**objective.terms(w), **terms}
    return MixtureSolution(w, "optimal", "; ".join(messages), value, terms, iterations, False)


# ---------------------------------------------------------------- the mixer


@dataclass(frozen=True)
class TiKMiXDConfig(MixerConfig):
    """Options of :class:`TiKMiXD`; the keyword arguments of :func:`solve_tikmix_d` that are not data."""

    alpha: float = option(1.0, "weight of std(Phat): balance across targets")
    beta: float = option(1.0, "weight of -sum(Phat): total normalised influence")
    gamma: float = option(1.0, "weight of -H(w): mixture entropy")
    min_weight: float = option(0.0, "lower bound of every weight")
    max_weight: float = option(1.0, "upper bound of every weight")
    max_step: float | None = option(
        None, "trust region: w_d within [w_prior_d / max_step, max_step * w_prior_d] (None: off)"
    )
    step: float = option(1.0, "partial step: w_prior + step * (solution - w_prior), in (0, 1]")
    method: str = option("auto", "solver: 'auto', 'primal' (SLSQP on w) or 'dual' (SLSQP on the 2n-dim dual)")
    tol: float = option(1e-10, "SLSQP ftol")
    max_iter: int = option(1000, "SLSQP iteration limit")

    def __post_init__(self):
        check_objective_options(self.alpha, self.beta, self.gamma, self.method)
        check_weight_range(self.min_weight, self.max_weight)
        if self.max_step is not None:
            check_max_step(self.max_step)
        check_step(self.step)
        if not (self.tol > 0 and self.max_iter >= 1):
            raise ConfigError(f"Need `tol` > 0 and `max_iter` >= 1, got {self.tol}, {self.max_iter}.")


class TiKMiXD(Mixer):
    """TiKMiX-D as a mixer: solves :func:`solve_tikmix_d` on ``context.influence`` around ``context.w_prior``,
    with availability caps from the context when it carries ``available_tokens`` and ``remaining_tokens``.
    Stateless."""

    name = "tikmix_d"
    Config = TiKMiXDConfig

    def propose(self, context: MixingContext) -> MixtureSolution:
        context.require("influence", mixer=self.name)
        return solve_tikmix_d(
            context.influence,
            context.w_prior,
            available_tokens=context.available_tokens,
            remaining_tokens=context.remaining_tokens,
            max_epochs=context.max_epochs,
            **self.config.to_dict(),
        )
