"""TiKMiX-M: candidates, measured labels, the surrogate search and determinism."""

import sys

import numpy as np
import pytest

from tikmix_loader.errors import ConfigError, MissingExtraError
from tikmix_loader.mixing import (
    CurvatureLabel,
    MixingContext,
    TiKMiXM,
    get_mixer,
    per_mixture,
    solve_tikmix_d,
)
from tikmix_loader.mixing.tikmix_m import (
    annealed_dirichlet_search,
    check_measured_labels,
    concentration_schedule,
    latin_hypercube_candidates,
)

FAST = {"num_candidates": 96, "num_samples": 256, "rounds": 4, "top_k": 16}
DOMAINS = tuple("abcdef")


@pytest.fixture
def setting(problem):
    """A 6-domain problem and a non-linear label whose optimum sits inside the box around w_D."""
    S, w_prior = problem(6, 3, seed=0)
    anchor = solve_tikmix_d(S, w_prior).weights
    target = anchor * np.array([1.6, 0.6, 1.4, 0.7, 1.2, 0.8])
    target /= target.sum()

    def label(weights):
        return -100.0 * np.sum((np.asarray(weights) - target) ** 2, axis=1)

    context = MixingContext(domains=DOMAINS, w_prior=w_prior, influence=S)
    return S, w_prior, anchor, label, context


def test_surrogate_search_beats_tikmix_d_on_a_nonlinear_label(setting):
    _, _, anchor, label, context = setting
    solution = TiKMiXM(label_fn=label, **FAST).propose(context)
    assert solution.status == "surrogate" and not solution.fallback
    assert label(solution.weights[None])[0] > label(anchor[None])[0] + 0.5
    assert solution.terms["surrogate_valid_r2"] > 0.5
    assert abs(solution.weights.sum() - 1) < 1e-12 and np.all(solution.weights >= 0)


def test_deterministic_given_seed_and_seed_matters(setting):
    *_, label, context = setting
    first = TiKMiXM(label_fn=label, seed=3, **FAST).propose(context).weights
    again = TiKMiXM(label_fn=label, seed=3, **FAST).propose(context).weights
    other = TiKMiXM(label_fn=label, seed=4, **FAST).propose(context).weights
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_state_resume_reproduces_the_next_decision(setting):
    *_, label, context = setting
    straight = TiKMiXM(label_fn=label, **FAST)
    straight.propose(context)
    expected = straight.propose(context).weights
    first = TiKMiXM(label_fn=label, **FAST)
    first.propose(context)
    resumed = TiKMiXM(label_fn=label, **FAST)
    resumed.load_state_dict(first.state_dict())
    np.testing.assert_array_equal(resumed.propose(context).weights, expected)


def test_labels_equal_to_influence_are_rejected(setting):
    S, *_, context = setting
    with pytest.raises(ConfigError, match="affine function of S w"):
        TiKMiXM(label_fn=lambda w: (w @ S.T).sum(axis=1), **FAST).propose(context)
    with pytest.raises(ConfigError, match="affine function"):
        check_measured_labels(np.random.default_rng(0).dirichlet(np.ones(6), 50), np.full(50, 2.0), S)


def test_linear_labels_in_w_are_rejected_when_checkable():
    rng = np.random.default_rng(1)
    candidates = rng.dirichlet(np.ones(4), 40)
    with pytest.raises(ConfigError, match="affine function of w"):
        check_measured_labels(candidates, candidates @ np.array([1.0, -2.0, 0.5, 3.0]), None)
    check_measured_labels(candidates, np.sin(5 * candidates[:, 0]), None)


def test_bad_label_shape_raises(setting):
    *_, context = setting
    with pytest.raises(ConfigError, match="finite labels"):
        TiKMiXM(label_fn=lambda w: np.zeros(3), **FAST).propose(context)
    with pytest.raises(ConfigError, match="needs a callable `label_fn`"):
        get_mixer("tikmix_m")


def test_missing_lightgbm_raises_missing_extra(setting, monkeypatch):
    *_, label, context = setting
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'tikmix-loader\[lightgbm\]'"):
        TiKMiXM(label_fn=label, **FAST).propose(context)


def test_concentration_grows_and_the_search_narrows():
    schedule = concentration_schedule(5.0, 2.0, 6)
    assert np.all(np.diff(schedule) > 0)
    rng = np.random.default_rng(0)
    start = np.full(5, 0.2)
    target = np.array([0.4, 0.3, 0.1, 0.1, 0.1])
    result = annealed_dirichlet_search(
        lambda w: -np.abs(w - target).sum(axis=1),
        start,
        rng=rng,
        rounds=6,
        num_samples=400,
        top_k=20,
        initial_concentration=5.0,
        growth=2.0,
    )
    spreads = [round_["spread"] for round_ in result.trace]
    assert [round_["concentration"] for round_ in result.trace] == list(schedule)
    assert spreads[-1] < 0.5 * spreads[0]
    assert np.abs(result.weights - target).sum() < np.abs(start - target).sum() / 3


def test_search_respects_bounds_and_zero_support():
    rng = np.random.default_rng(1)
    start = np.array([0.5, 0.3, 0.2, 0.0])
    hi = np.array([0.6, 1.0, 1.0, 1.0])
    result = annealed_dirichlet_search(
        lambda w: w[:, 0], start, rng=rng, rounds=3, num_samples=200, top_k=10, hi=hi
    )
    assert result.weights[3] == 0.0 and result.weights[0] <= 0.6


@pytest.mark.parametrize("num_domains", [5, 26, 200])
def test_lhs_candidates_stay_in_their_box_on_the_simplex(num_domains):
    center = np.random.default_rng(2).dirichlet(np.full(num_domains, 3.0))
    candidates, projected = latin_hypercube_candidates(center, 64, rng=np.random.default_rng(3))
    assert candidates.shape == (64, num_domains)
    np.testing.assert_allclose(candidates.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(candidates >= 0.5 * center - 1e-12) and np.all(candidates <= 2.0 * center + 1e-12)
    assert (projected > 0) == (num_domains == 200)  # rejection only runs dry with many domains
    assert len(np.unique(candidates.round(12), axis=0)) == 64


def test_curvature_label_matches_explicit_kronecker_formula():
    rng = np.random.default_rng(4)
    m, k_out, k_in, n_targets = 3, 2, 3, 2

    def spd(size):
        x = rng.normal(size=(size, size + 2))
        return x @ x.T / size

    a = np.stack([spd(k_in) for _ in range(m)])
    b = np.stack([spd(k_out) for _ in range(m)])
    phi = rng.normal(size=(m, k_out, k_in))
    psi = rng.normal(size=(n_targets, k_out, k_in))
    label = CurvatureLabel(psi=psi, phi=phi, a_factors=a, b_factors=b, damping=0.1)
    weights = rng.dirichlet(np.ones(m), 4)
    expected = []
    for w in weights:
        a_w, b_w = np.einsum("d,dij->ij", w, a), np.einsum("d,dij->ij", w, b)
        a_w += 0.1 * np.trace(a_w) / k_in * np.eye(k_in)
        b_w += 0.1 * np.trace(b_w) / k_out * np.eye(k_out)
        # vec(B^-1 M A^-1) = (A^-1 kron B^-1) vec(M) with column-major vec and symmetric A
        h_inv = np.kron(np.linalg.inv(a_w), np.linalg.inv(b_w))
        g = np.einsum("d,dij->ij", w, phi).reshape(-1, order="F")
        expected.append(np.mean([p.reshape(-1, order="F") @ h_inv @ g for p in psi]))
    np.testing.assert_allclose(label(weights), expected, rtol=1e-10)
    candidates = rng.dirichlet(np.ones(m), 40)
    check_measured_labels(candidates, label(candidates), None)  # non-linear in w: accepted


def test_per_mixture_wraps_a_single_mixture_label():
    batch = per_mixture(lambda w: float(w[0] * 2))(np.array([[0.5, 0.5], [0.25, 0.75]]))
    np.testing.assert_allclose(batch, [1.0, 0.5])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"growth": 1.0}, "concentration must grow"),
        ({"growth": 0.5}, "concentration must grow"),
        ({"top_k": 0}, "`top_k` must be in"),
        ({"box_low": 1.2}, "box needs"),
        ({"num_candidates": 2}, "`num_candidates` >= 8"),
        ({"method": "x"}, "`method` must be one of"),
        ({"gamma": -1.0}, "`gamma` must be finite and >= 0"),
        (
            {"min_weight": 0.5, "max_weight": 0.2},
            r"Need 0 <= `min_weight` <= `max_weight` <= 1, got 0.5 and 0.2",
        ),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ConfigError, match=match):
        get_mixer("tikmix_m", label_fn=lambda w: w[:, 0], **options)


def test_curvature_label_damps_projected_factors_by_the_unprojected_mean_eigenvalue():
    rng = np.random.default_rng(5)
    m, k_out, k_in, d_out, d_in = 2, 2, 3, 8, 12
    a = np.stack([np.diag(rng.uniform(0.5, 2.0, k_in)) for _ in range(m)])
    b = np.stack([np.diag(rng.uniform(0.5, 2.0, k_out)) for _ in range(m)])
    b[1] = 0.0  # domain 1 saw no output-gradient signal
    phi, psi = rng.normal(size=(m, k_out, k_in)), rng.normal(size=(1, k_out, k_in))
    label = CurvatureLabel(psi=psi, phi=phi, a_factors=a, b_factors=b, damping=0.1, widths=[(d_in, d_out)])
    for w in ([0.3, 0.7], [0.0, 1.0]):
        a_w, b_w = np.einsum("d,dij->ij", w, a), np.einsum("d,dij->ij", w, b)
        lam_a = 0.1 * np.trace(a_w) / d_in  # trace over the unprojected width, not k_in
        lam_b = 0.1 * np.trace(b_w) / d_out if np.trace(b_w) > 0 else 0.1  # an empty factor gets `damping`
        g = np.einsum("d,dij->ij", w, phi)
        # Diagonal factors: (B + lB)^-1 g (A + lA)^-1 is an element-wise division.
        expected = np.sum(psi[0] * g / np.outer(np.diag(b_w) + lam_b, np.diag(a_w) + lam_a))
        assert label(np.array([w]))[0] == pytest.approx(expected, rel=1e-12)
    unprojected = CurvatureLabel(psi=psi, phi=phi, a_factors=a, b_factors=b, damping=0.1)
    assert not np.isclose(label([[0.3, 0.7]])[0], unprojected([[0.3, 0.7]])[0])  # widths change the shift


@pytest.mark.parametrize("widths", [[(2, 2)], [(12, 8), (12, 8)], [(12,)]])
def test_curvature_label_rejects_widths_that_do_not_fit_the_layers(widths):
    a, b = np.ones((2, 3, 3)), np.ones((2, 2, 2))
    with pytest.raises(ConfigError, match="`widths` must give one unprojected"):
        CurvatureLabel(
            psi=np.ones((1, 2, 3)), phi=np.ones((2, 2, 3)), a_factors=a, b_factors=b, widths=widths
        )
