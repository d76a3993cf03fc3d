"""QuaDMix's search: Algorithm 1 sampling, the cross-validated regression, the top-k mean, implied shares."""

import json

import numpy as np
import pytest
from scipy import stats

from tikmix_loader.errors import ConfigError, ScoreError
from tikmix_loader.quality import QualityParams
from tikmix_loader.quality.search import (
    ParamTable,
    SearchSpace,
    fit_quadmix,
    implied_domain_weights,
    read_quadmix_params,
    run_quadmix_search,
    sample_feasible_params,
    sample_quadmix_params,
    search_quadmix,
)

SPACE = SearchSpace(domains=("web", "code"), criteria=("ppl", "rules", "zip"))


def test_samples_stay_in_the_papers_ranges():
    table = sample_quadmix_params(SPACE, 20_000, seed=3)
    assert table.alpha.shape == (20_000, 2, 3) and table.lam.shape == (20_000, 2)
    assert np.all(table.alpha >= 0)
    np.testing.assert_allclose(table.alpha.sum(axis=-1), 1.0)
    assert table.lam.min() >= 1.0 and table.lam.max() <= 1000.0
    assert table.omega.min() >= 0 and table.omega.max() <= 0.1
    assert table.eta.min() >= 0 and table.eta.max() <= 2.0
    assert table.eps.min() >= 0 and table.eps.max() <= 1e-3
    # lambda is log-uniform over three decades: a third of the draws in each decade.
    decades = np.histogram(np.log10(table.lam), bins=[0, 1, 2, 3])[0] / table.lam.size
    np.testing.assert_allclose(decades, 1 / 3, atol=0.02)
    # The shared global weight makes a criterion's weight correlate across domains.
    assert stats.spearmanr(table.alpha[:, 0, 0], table.alpha[:, 1, 0]).statistic > 0.2


def test_sampling_is_deterministic_in_the_seed_and_honours_the_scales():
    a, b = sample_quadmix_params(SPACE, 50, seed=1), sample_quadmix_params(SPACE, 50, seed=1)
    np.testing.assert_array_equal(a.features(), b.features())
    assert not np.array_equal(a.features(), sample_quadmix_params(SPACE, 50, seed=2).features())
    wide = SearchSpace(SPACE.domains, SPACE.criteria, omega_scale=1.0, eta_max=0.5, lam_decades=1.0)
    table = sample_quadmix_params(wide, 5000, seed=0)
    assert table.omega.max() > 0.9 and table.eta.max() <= 0.5 and table.lam.max() <= 10.0


def test_features_round_trip_to_params():
    table = sample_quadmix_params(SPACE, 4, seed=0)
    back = ParamTable.from_features(SPACE, table.features())
    params = back.params(2)
    assert list(params) == ["web", "code"]
    assert params["code"].omega == pytest.approx(table.omega[2, 1])
    assert params["code"].lam == pytest.approx(table.lam[2, 1])
    np.testing.assert_allclose(params["web"].alpha, table.alpha[2, 0])
    with pytest.raises(ConfigError, match="2 domains x"):
        ParamTable.from_features(SPACE, table.features()[:, :-1])


def test_top_k_mean_by_hand():
    table = sample_quadmix_params(SPACE, 6, seed=5)
    mean = table.mean_of([1, 4])
    alpha = (table.alpha[1, 0] + table.alpha[4, 0]) / 2
    np.testing.assert_allclose(mean["web"].alpha, alpha / alpha.sum())
    assert mean["code"].omega == pytest.approx((table.omega[1, 1] + table.omega[4, 1]) / 2)
    assert mean["code"].eps == pytest.approx((table.eps[1, 1] + table.eps[4, 1]) / 2)
    assert mean["web"].lam == pytest.approx(np.sqrt(table.lam[1, 0] * table.lam[4, 0]))  # geometric mean


def test_search_averages_the_lowest_predicted_candidates():
    # A predictor that ranks candidates by omega of "web": the top 10 of 1000 are its 10 smallest omegas.
    space = SPACE
    mean, predicted = search_quadmix(lambda X: X[:, 4], space, num_candidates=1000, top_k=10, seed=7)
    candidates = sample_quadmix_params(space, 1000, seed=7)
    lowest = np.sort(candidates.omega[:, 0])[:10]
    assert mean["web"].omega == pytest.approx(lowest.mean())
    assert predicted == pytest.approx(lowest.mean())


def _objective(params: dict[str, QualityParams]) -> float:
    """A synthetic proxy loss with its optimum at omega = 0.08 in both domains and alpha[web] = (1, 0, 0)."""
    return sum(40 * (p.omega - 0.08) ** 2 for p in params.values()) + 0.3 * (1 - params["web"].alpha[0])


def test_search_lands_near_a_known_optimum():
    search = run_quadmix_search(
        _objective, SPACE, num_proxies=300, flops_per_run=2.0, seed=0, num_candidates=20_000, progress=False
    )
    assert abs(search.params["web"].omega - 0.08) < 0.015
    assert abs(search.params["code"].omega - 0.08) < 0.015
    assert search.params["web"].alpha[0] > 0.6
    assert search.fit.cv_spearman > 0.8 and search.fit.cv_rmse < search.fit.loss_std / 2
    assert search.decision_flops == 600.0 and len(search.proxy_losses) == 300
    # The chosen set is better under the true objective than the best proxy it was fitted on.
    assert _objective(search.params) <= search.proxy_losses.min() + 0.01


def test_cross_validation_reports_no_skill_on_noise():
    rng = np.random.default_rng(0)
    fit = fit_quadmix(rng.random((60, 4)), rng.random(60), folds=5)
    assert fit.cv_spearman is None or abs(fit.cv_spearman) < 0.4
    assert fit.cv_rmse >= 0.9 * fit.loss_std
    with pytest.raises(ConfigError, match="folds"):
        fit_quadmix(rng.random((4, 2)), rng.random(4), folds=5)


def test_search_json_round_trip(tmp_path):
    search = run_quadmix_search(
        _objective, SPACE, num_proxies=20, flops_per_run=1.0, num_candidates=500, progress=False
    )
    path = tmp_path / "quadmix.json"
    path.write_text(json.dumps(search.to_dict()))
    assert read_quadmix_params(path) == search.params
    assert json.loads(path.read_text())["num_proxies"] == 20
    path.write_text('{"params": {"web": {"alpha": [1]}}}')
    with pytest.raises(ConfigError, match="quadmix.json"):
        read_quadmix_params(path)


def test_implied_domain_weights_are_expected_tokens():
    weights = implied_domain_weights(
        {"a": np.array([2.0, 0.0, 1.5]), "b": np.array([1.0])},
        {"a": np.array([10, 5, 4]), "b": np.array([14])},
    )
    assert weights == pytest.approx({"a": 26 / 40, "b": 14 / 40})
    with pytest.raises(ScoreError, match="'b'"):
        implied_domain_weights({"b": np.ones(2)}, {"b": np.ones(3)})
    with pytest.raises(ScoreError, match="no token"):
        implied_domain_weights({"b": np.zeros(2)}, {"b": np.ones(2)})


def test_bad_space_names_the_field():
    with pytest.raises(ConfigError, match="omega_scale"):
        SearchSpace(("a",), ("x",), omega_scale=0)
    with pytest.raises(ConfigError, match="criteria"):
        SearchSpace(("a",), ("x", "x"))


def test_infeasible_sets_are_never_trained_or_chosen():
    def feasible(params):
        return all(p.omega >= 0.05 for p in params.values())

    table = sample_feasible_params(SPACE, 40, feasible=feasible, seed=2)
    assert len(table) == 40 and table.omega.min() >= 0.05
    first = sample_quadmix_params(SPACE, 40, seed=2)
    kept = [row for row in range(40) if feasible(first.params(row))]
    np.testing.assert_array_equal(table.omega[: len(kept)], first.omega[kept])  # the first round, in order
    # The predictor prefers small omegas of "web"; the top 5 feasible are the 5 smallest feasible ones.
    mean, _ = search_quadmix(lambda X: X[:, 4], SPACE, num_candidates=500, top_k=5, seed=3, feasible=feasible)
    candidates = sample_quadmix_params(SPACE, 500, seed=3)
    ok = [row for row in range(500) if feasible(candidates.params(row))]
    assert mean["web"].omega == pytest.approx(np.sort(candidates.omega[ok, 0])[:5].mean())
    with pytest.raises(ConfigError, match="feasible"):
        sample_feasible_params(SPACE, 5, feasible=lambda params: False, max_rounds=3)
