"""TiKMiX-D: constraints, optimality against feasible points, gradients, fallbacks and caps."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import check_grad

from tikmix_loader.errors import ConfigError, MixtureWeightError
from tikmix_loader.mixing import MixingContext, TiKMiXD, TikmixObjective, _threads, solve_tikmix_d, tikmix_d
from tikmix_loader.mixing.tikmix_d import _box_gibbs, degeneracy

SHAPES = [(26, 9), (5, 3), (80, 6)]


def assert_feasible(S, w_prior, solution, lo=0.0, hi=1.0, tol=1e-9):
    w = solution.weights
    assert not solution.fallback, solution.reason
    assert np.all(np.isfinite(w))
    assert abs(w.sum() - 1.0) <= 1e-9
    assert np.all(w >= lo - 1e-12) and np.all(w <= hi + 1e-12)
    scale = np.abs(S).max(axis=1)
    assert np.all(S @ w - S @ w_prior >= -tol * scale), (S @ w - S @ w_prior) / scale


@pytest.mark.parametrize("num_domains,num_targets", SHAPES)
@pytest.mark.parametrize("method", ["primal", "dual"])
def test_constraints_hold_and_methods_agree(problem, num_domains, num_targets, method):
    S, w_prior = problem(num_domains, num_targets, seed=1)
    solution = solve_tikmix_d(S, w_prior, method=method, min_weight=0.001, max_weight=0.5)
    assert solution.status == "optimal"
    assert_feasible(S, w_prior, solution, lo=0.001, hi=0.5)
    other = solve_tikmix_d(
        S, w_prior, method="dual" if method == "primal" else "primal", min_weight=0.001, max_weight=0.5
    )
    assert solution.objective == pytest.approx(other.objective, rel=1e-7, abs=1e-7)


@pytest.mark.parametrize("num_domains,num_targets,seed", [(26, 9, 0), (8, 3, 1), (80, 4, 2)])
def test_objective_no_worse_than_prior_or_1000_feasible_points(
    problem, feasible_points, num_domains, num_targets, seed
):
    S, w_prior = problem(num_domains, num_targets, seed=seed)
    solution = solve_tikmix_d(S, w_prior)
    assert_feasible(S, w_prior, solution)
    objective = TikmixObjective(S)
    assert solution.objective == pytest.approx(objective.value(solution.weights))
    assert solution.objective <= objective.value(w_prior) + 1e-12
    points = feasible_points(S, w_prior, 0.0, 1.0, 1000, np.random.default_rng(seed), solution.weights)
    values = np.array([objective.value(w) for w in points])
    assert solution.objective <= values.min() + 1e-9, values.min() - solution.objective


def test_solution_is_strictly_better_than_a_poor_prior(problem):
    S, w_prior = problem(26, 9, seed=3)
    solution = solve_tikmix_d(S, w_prior)
    assert solution.terms["prior_objective"] - solution.objective > 0.1
    assert set(solution.terms) == {"std", "sum", "entropy", "prior_objective"}


@pytest.mark.parametrize("alpha,beta,gamma", [(1, 1, 1), (2.0, 0.5, 0.1), (0.0, 1.0, 1.0)])
def test_analytic_gradient_matches_finite_differences(problem, alpha, beta, gamma):
    S, _ = problem(26, 9, seed=4)
    objective = TikmixObjective(S, alpha=alpha, beta=beta, gamma=gamma)
    rng = np.random.default_rng(0)
    for w in rng.dirichlet(np.full(26, 4.0), 5):  # interior points: forward differences see curvature 1/w
        error = check_grad(objective.value, objective.grad, w, epsilon=1e-8)
        assert error <= 1e-5 * max(1.0, np.linalg.norm(objective.grad(w))), error


def test_normalisation_uses_abs_max_for_rows_without_a_helpful_domain():
    S = np.array([[2.0, 1.0, 0.5], [-1.0, -4.0, -2.0]])
    objective = TikmixObjective(S)
    np.testing.assert_allclose(objective.scale, [2.0 + 1e-8, 4.0 + 1e-8])
    w = np.array([0.2, 0.3, 0.5])
    phat = S @ w / objective.scale
    expected = np.std(phat) - phat.sum() + np.sum(w * np.log(w))
    assert objective.value(w) == pytest.approx(expected)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda S: np.where(np.arange(S.size).reshape(S.shape) == 3, np.nan, S), "NaN or inf"),
        (lambda S: np.where(np.arange(S.size).reshape(S.shape) == 5, np.inf, S), "NaN or inf"),
        (lambda S: np.zeros_like(S), "all entries are zero"),
        (lambda S: -np.abs(S) - 0.1, "every entry is <= 0"),
        (lambda S: np.outer(np.arange(1.0, S.shape[0] + 1), np.abs(S[0]) + 0.1), "rank one"),
    ],
)
def test_degenerate_influence_falls_back_to_prior_with_reason(problem, make, reason):
    S, w_prior = problem(10, 4, seed=5)
    solution = solve_tikmix_d(make(S), w_prior)
    assert solution.fallback and solution.status == "fallback"
    assert reason in solution.reason
    np.testing.assert_array_equal(solution.weights, w_prior)
    json.dumps(solution.to_dict(), allow_nan=False)


def test_single_target_is_not_rank_one_degenerate(problem):
    S, w_prior = problem(10, 1, seed=6)
    assert degeneracy(S) is None
    assert_feasible(S, w_prior, solve_tikmix_d(S, w_prior))


def test_a_rejected_dual_hands_over_to_the_scaled_primal(problem, monkeypatch):
    S, w_prior = problem(80, 6, seed=12)
    accepted = solve_tikmix_d(S, w_prior)
    monkeypatch.setattr(tikmix_d, "GAP_RTOL", -1.0)  # no duality gap passes: the primal must take over
    rescued = solve_tikmix_d(S, w_prior)
    assert "left duality gap" in rescued.reason and "SLSQP status 0" in rescued.reason
    assert_feasible(S, w_prior, rescued)
    assert rescued.objective == pytest.approx(accepted.objective, abs=1e-7)


def test_solver_failure_falls_back(problem):
    S, w_prior = problem(26, 9, seed=7)
    solution = solve_tikmix_d(S, w_prior, method="primal", max_iter=1)
    assert solution.fallback and "solver failed" in solution.reason
    np.testing.assert_array_equal(solution.weights, w_prior)


def test_availability_caps_are_respected(problem):
    S, _ = problem(12, 5, seed=8)
    w_prior = np.full(12, 1 / 12)
    free = solve_tikmix_d(S, w_prior)
    available = np.full(12, 1e9)
    top = np.argsort(-free.weights)[:3]
    available[top] = (
        0.5 * free.weights[top] * 1e6
    )  # with 2 epochs over 2e6 tokens: caps at half the free weight
    solution = solve_tikmix_d(S, w_prior, available_tokens=available, remaining_tokens=2e6, max_epochs=2.0)
    assert_feasible(S, w_prior, solution)
    assert np.all(solution.weights * 2e6 <= available * 2.0 * (1 + 1e-9))
    np.testing.assert_allclose(solution.weights[top], 0.5 * free.weights[top], rtol=1e-6)


def test_pareto_set_outside_the_bounds_falls_back_with_a_hint():
    S = np.array([[1.0, 0.0, 0.1], [0.0, 1.0, 0.1]])
    w_prior = np.array([0.45, 0.45, 0.1])  # both targets need w_0, w_1 >= 0.45, the bound allows 0.4
    solution = solve_tikmix_d(S, w_prior, max_weight=0.4)
    assert solution.fallback and solution.reason.startswith("infeasible: no mixture within the bounds")
    np.testing.assert_array_equal(solution.weights, w_prior)


def test_infeasible_caps_fall_back(problem):
    S, w_prior = problem(6, 3, seed=9)
    solution = solve_tikmix_d(S, w_prior, available_tokens=np.full(6, 10.0), remaining_tokens=1000.0)
    assert solution.fallback and "availability caps" in solution.reason


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": -1.0}, "`alpha` must be finite"),
        ({"gamma": float("nan")}, "`gamma` must be finite"),
        ({"min_weight": 0.5}, "No mixture of 6 domains"),
        ({"max_weight": 0.1}, "No mixture of 6 domains"),
        ({"min_weight": 0.3, "max_weight": 0.2}, "min_weight"),
        ({"available_tokens": np.ones(6)}, "both `available_tokens` and `remaining_tokens`"),
        (
            {"available_tokens": np.ones(6), "remaining_tokens": 0.0},
            "`remaining_tokens` must be finite and > 0",
        ),
        ({"available_tokens": -np.ones(6), "remaining_tokens": 1.0}, "`available_tokens` must be finite"),
        (
            {"available_tokens": np.ones(6), "remaining_tokens": 1.0, "max_epochs": 0.0},
            "`max_epochs` must be > 0",
        ),
        ({"method": "newton"}, "`method` must be one of"),
    ],
)
def test_bad_arguments_raise_config_error(problem, kwargs, match):
    S, w_prior = problem(6, 3, seed=10)
    with pytest.raises(ConfigError, match=match):
        solve_tikmix_d(S, w_prior, **kwargs)


def test_dual_needs_entropy(problem):
    S, w_prior = problem(6, 3, seed=10)
    with pytest.raises(ConfigError, match="needs `gamma` > 0"):
        solve_tikmix_d(S, w_prior, gamma=0.0, method="dual")
    assert_feasible(S, w_prior, solve_tikmix_d(S, w_prior, gamma=0.0))


@pytest.mark.parametrize(
    "w_prior,match",
    [
        ([np.nan, 0.5, 0.5], "finite, >= 0 and sum to 1"),
        ([-0.1, 0.6, 0.5], "finite, >= 0 and sum to 1"),
        ([0.2, 0.2, 0.2], "finite, >= 0 and sum to 1"),
        ([0.5, 0.5], "one weight per domain"),
    ],
)
def test_bad_prior_raises_mixture_weight_error(w_prior, match):
    with pytest.raises(MixtureWeightError, match=match):
        solve_tikmix_d(np.eye(3) + 0.1, w_prior)


def test_bad_influence_shape_raises():
    with pytest.raises(ConfigError, match=r"\[n_targets >= 1, n_domains >= 1\]"):
        solve_tikmix_d(np.ones(3), np.full(3, 1 / 3))


def test_mixer_uses_context_influence_and_caps(problem):
    S, w_prior = problem(8, 3, seed=11)
    domains = tuple(f"d{i}" for i in range(8))
    context = MixingContext(
        domains=domains,
        w_prior=w_prior,
        influence=S,
        available_tokens=np.full(8, 100.0),
        remaining_tokens=500.0,
    )
    solution = TiKMiXD(alpha=0.5).propose(context)
    expected = solve_tikmix_d(
        S, w_prior, alpha=0.5, available_tokens=np.full(8, 100.0), remaining_tokens=500.0
    )
    # The mixer renormalises w_prior (MixingContext), a change of ~1e-17 that moves SLSQP's answer by ~1e-11
    # depending on the BLAS build: "the same solution" means equal to well below any weight that matters.
    np.testing.assert_allclose(solution.weights, expected.weights, rtol=0, atol=1e-9)
    assert np.all(solution.weights <= 0.2 + 1e-12)
    with pytest.raises(ConfigError, match="needs MixingContext field"):
        TiKMiXD().propose(MixingContext(domains=domains, w_prior=w_prior))


def test_blas_threads_pins_and_restores():
    from threadpoolctl import threadpool_info

    def blas_threads_now():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads_now()
    assert before, "NumPy/SciPy's BLAS should be visible to threadpoolctl"
    with _threads.blas_threads(1):
        assert blas_threads_now() == [1] * len(before)
    assert blas_threads_now() == before


@pytest.mark.parametrize("spread", [1.0, 30.0, 2000.0])
@pytest.mark.parametrize("lo_value,hi_value", [(0.0, 1.0), (0.0, 0.3), (0.02, 0.25)])
def test_box_gibbs_is_the_clipped_softmax_on_the_simplex(spread, lo_value, hi_value):
    rng = np.random.default_rng(int(spread))
    a = rng.normal(0.0, spread, 8)
    lo, hi = np.full(8, lo_value), np.full(8, hi_value)
    w = _box_gibbs(a, lo, hi)
    assert np.all(np.isfinite(w)) and abs(w.sum() - 1.0) < 1e-12
    assert np.all(w >= lo) and np.all(w <= hi)
    free = (w > lo + 1e-12) & (w < hi - 1e-12) & (w > 1e-250)
    if free.sum() >= 2:  # KKT: log w_d - a_d is the same for every domain strictly inside its bounds
        np.testing.assert_allclose(np.log(w[free]) - a[free], (np.log(w[free]) - a[free])[0], atol=1e-9)
    assert np.all(np.diff(w[np.argsort(a)]) >= -1e-15)  # clipping keeps the order of a


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31),
    num_domains=st.integers(2, 40),
    num_targets=st.integers(1, 10),
    variant=st.sampled_from(["plain", "duplicate rows", "zero row", "vertex prior", "bounds", "huge scale"]),
    gamma=st.sampled_from([0.0, 1e-3, 1.0, 5.0]),
)
def test_any_input_gives_a_valid_mixture_or_a_reasoned_fallback(
    seed, num_domains, num_targets, variant, gamma
):
    rng = np.random.default_rng(seed)
    S = rng.normal(rng.uniform(-0.5, 1.0), 1.0, (num_targets, num_domains))
    w_prior = rng.dirichlet(np.full(num_domains, rng.uniform(0.2, 3.0)))
    options = {"alpha": float(rng.uniform(0, 3)), "beta": float(rng.uniform(0, 3)), "gamma": gamma}
    if variant == "duplicate rows":
        S[0] = S[-1]
    elif variant == "zero row":
        S[-1] = 0.0
    elif variant == "vertex prior":
        w_prior = np.eye(num_domains)[0]
    elif variant == "bounds":
        options.update(min_weight=0.5 / num_domains, max_weight=min(1.0, 3.0 / num_domains))
    elif variant == "huge scale":
        S *= 1e6
    solution = solve_tikmix_d(S, w_prior, **options)
    w = solution.weights
    assert np.all(np.isfinite(w)) and abs(w.sum() - 1.0) < 1e-9 and np.all(w >= 0)
    if solution.fallback:
        assert solution.reason.startswith(("degenerate S", "infeasible", "solver")), solution.reason
        np.testing.assert_array_equal(w, w_prior)
    else:
        lo = options.get("min_weight", 0.0)
        assert_feasible(S, w_prior, solution, lo=lo, hi=options.get("max_weight", 1.0))
        if variant != "bounds":
            assert solution.objective <= TikmixObjective(S, **options).value(w_prior) + 1e-9


def test_trust_region_limits_one_decision_and_keeps_the_prior_feasible(problem):
    S, w_prior = problem(9, 26, seed=11)
    free = solve_tikmix_d(S, w_prior)
    ratio = free.weights / w_prior
    assert ratio.max() > 2 or ratio.min() < 0.5  # the free step leaves the box, so the box is binding
    solution = solve_tikmix_d(S, w_prior, max_step=2.0)
    assert_feasible(S, w_prior, solution, lo=w_prior / 2, hi=2 * w_prior)
    objective = TikmixObjective(S)
    assert objective.value(free.weights) <= solution.objective <= objective.value(w_prior)


def test_trust_region_lets_a_zero_weight_domain_rise_to_its_min_weight():
    lo, hi = tikmix_d.trust_region(np.full(3, 0.1), np.ones(3), np.array([0.0, 0.5, 0.5]), 2.0)
    np.testing.assert_allclose(lo, [0.1, 0.25, 0.25])
    np.testing.assert_allclose(hi, [0.1, 1.0, 1.0])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"alpha": float("nan")}, "`alpha` must be finite and >= 0, got nan"),
        ({"beta": -0.5}, "`beta` must be finite and >= 0"),
        ({"min_weight": 0.3, "max_weight": 0.2}, "Need 0 <= `min_weight` <= `max_weight` <= 1"),
        ({"method": "newton"}, "`method` must be one of"),
    ],
)
def test_bad_mixer_options_raise_config_error_when_the_mixer_is_built(options, match):
    with pytest.raises(ConfigError, match=match):
        TiKMiXD(**options)


@pytest.mark.parametrize("max_step", [1.0, 0.5, float("inf"), float("nan"), "2"])
def test_bad_max_step_raises_config_error(problem, max_step):
    S, w_prior = problem(6, 3, seed=10)
    with pytest.raises(ConfigError, match="`max_step` must be a finite number > 1"):
        solve_tikmix_d(S, w_prior, max_step=max_step)
    with pytest.raises(ConfigError, match="`max_step` must be a finite number > 1"):
        TiKMiXD(max_step=max_step)


@pytest.mark.parametrize("step", [0.25, 0.5])
def test_partial_step_goes_that_fraction_of_the_way_to_the_solution(problem, step):
    S, w_prior = problem(8, 5, seed=12)
    full = solve_tikmix_d(S, w_prior, min_weight=0.01)
    partial = solve_tikmix_d(S, w_prior, min_weight=0.01, step=step)
    np.testing.assert_allclose(partial.weights, w_prior + step * (full.weights - w_prior), atol=1e-12)
    assert partial.terms["step"] == step
    assert_feasible(S, w_prior, partial, lo=min(0.01, w_prior.min()))
    objective = TikmixObjective(S)
    assert partial.objective == pytest.approx(objective.value(partial.weights))
    assert full.objective <= partial.objective <= objective.value(w_prior)  # convex along the segment


def test_partial_step_is_raised_until_a_prior_over_its_cap_is_back_under_it():
    S = np.array([[1.0, 3.0, 2.0], [2.0, 1.0, 3.0]])
    w_prior = np.array([0.7, 0.2, 0.1])
    # Domain 0 can supply 500 of the 1000 tokens still to come: w_0 <= 0.5, but the prior has 0.7.
    caps = {"available_tokens": [500.0, 1e9, 1e9], "remaining_tokens": 1000.0, "max_epochs": 1.0}
    full = solve_tikmix_d(S, w_prior, **caps)
    assert full.weights[0] <= 0.5 + 1e-9
    partial = solve_tikmix_d(S, w_prior, step=0.1, **caps)
    needed = (0.7 - 0.5) / (0.7 - full.weights[0])  # the fraction of the way that reaches the cap
    assert partial.terms["step"] == pytest.approx(needed)
    assert partial.weights[0] == pytest.approx(0.5)
    np.testing.assert_allclose(partial.weights, w_prior + needed * (full.weights - w_prior), atol=1e-12)


def test_partial_step_of_one_is_the_solution_and_a_fallback_ignores_the_step(problem):
    S, w_prior = problem(6, 3, seed=13)
    assert "step" not in solve_tikmix_d(S, w_prior, step=1.0).terms
    fallback = solve_tikmix_d(np.zeros_like(S), w_prior, step=0.5)
    assert fallback.fallback and np.array_equal(fallback.weights, w_prior)


@pytest.mark.parametrize("step", [0.0, -0.5, 1.5, float("nan"), "0.5"])
def test_bad_step_raises_config_error(problem, step):
    S, w_prior = problem(6, 3, seed=10)
    with pytest.raises(ConfigError, match="`step` must be a number in \\(0, 1\\]"):
        solve_tikmix_d(S, w_prior, step=step)
    with pytest.raises(ConfigError, match="`step` must be a number in \\(0, 1\\]"):
        TiKMiXD(step=step)
