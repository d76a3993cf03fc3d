"""RegMix: the mixture prior, the proxy sweep's FLOP count, the regressors and recovering a known optimum."""

import json

import numpy as np
import pytest

from tikmix_loader.errors import ConfigError, StateError
from tikmix_loader.mixing import (
    MixingContext,
    fit_regmix,
    get_mixer,
    run_regmix_sweep,
    sample_regmix_mixtures,
    simulate_best_mixture,
)
from tikmix_loader.mixing.regmix import regmix_scales

SHARES = np.array([0.45, 0.3, 0.15, 0.0999, 0.0001])


def test_scale_grid_is_15_log_spaced_values_in_the_paper_range():
    scales = regmix_scales()
    assert len(scales) == 15 and scales[0] == pytest.approx(0.1) and scales[-1] == pytest.approx(5.0)
    np.testing.assert_allclose(np.diff(np.log(scales)), np.log(50) / 14)


def test_sampled_mixtures_honour_sums_caps_and_zeroing():
    mixtures = sample_regmix_mixtures(SHARES, 512, seed=0)
    assert mixtures.shape == (512, 5)
    np.testing.assert_allclose(mixtures.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(mixtures <= 15 * SHARES + 1e-15)
    assert not np.any((mixtures > 0) & (mixtures < 2e-4))
    assert np.any(mixtures == 0)  # small Dirichlet scales put many weights under the threshold
    assert mixtures[:, 4].max() <= 15 * 0.0001 + 1e-15  # the tiny domain is held under its epoch cap


def test_sampled_mixtures_are_bit_identical_for_a_seed_and_differ_across_seeds():
    mixtures = sample_regmix_mixtures(SHARES, 512, seed=0)
    np.testing.assert_array_equal(mixtures, sample_regmix_mixtures(SHARES, 512, seed=0))
    assert not np.array_equal(mixtures, sample_regmix_mixtures(SHARES, 512, seed=1))


def test_sampling_errors():
    with pytest.raises(ConfigError, match="finite and > 0"):
        sample_regmix_mixtures([0.5, 0.5, 0.0])
    with pytest.raises(ConfigError, match="epoch cap"):
        sample_regmix_mixtures([0.5, 0.5], 10, epoch_cap=1.0 - 1e-3, max_batches=2, batch_size=64)


def test_sweep_counts_flops_and_losses():
    mixtures = sample_regmix_mixtures(SHARES, 6, seed=2)
    sweep = run_regmix_sweep(lambda w: float(w[0]), mixtures, flops_per_run=1e12, progress=False)
    np.testing.assert_allclose(sweep.losses, mixtures[:, 0])
    assert sweep.total_flops == pytest.approx(6e12)
    sweep = run_regmix_sweep(lambda w: 1.0, mixtures, flops_fn=lambda w: 1e9 * (1 + w[0]), progress=False)
    assert sweep.total_flops == pytest.approx(1e9 * (6 + mixtures[:, 0].sum()))
    with pytest.raises(ConfigError, match="exactly one of `flops_fn` or `flops_per_run`"):
        run_regmix_sweep(lambda w: 1.0, mixtures)
    with pytest.raises(ConfigError, match="returned loss nan"):
        run_regmix_sweep(lambda w: float("nan"), mixtures, flops_per_run=1.0, progress=False)


def synthetic_loss(weights, optimum):
    """A known loss with its minimum at ``optimum``: the target's proxy loss as a convex bowl."""
    return 2.0 + 5.0 * np.sum((np.atleast_2d(weights) - optimum) ** 2, axis=1)


def test_lightgbm_regmix_recovers_the_optimum_of_a_known_loss():
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    optimum = np.array([0.15, 0.25, 0.35, 0.25])
    mixtures = sample_regmix_mixtures(shares, 512, seed=0)
    losses = synthetic_loss(mixtures, optimum) + np.random.default_rng(0).normal(0, 0.01, 512)
    surrogate = fit_regmix(mixtures, losses, model="lightgbm")
    assert surrogate.kind == "lightgbm" and surrogate.valid_r2 > 0.8
    best, predicted = simulate_best_mixture(surrogate, shares, num_simulations=20_000, top_k=100)
    assert np.abs(best - optimum).sum() < 0.15
    assert synthetic_loss(best, optimum)[0] < synthetic_loss(shares, optimum)[0] - 0.1
    assert predicted == pytest.approx(synthetic_loss(best, optimum)[0], abs=0.1)


def test_ridge_baseline_fits_a_linear_loss_exactly():
    mixtures = sample_regmix_mixtures(SHARES, 200, seed=3)
    coef = np.array([1.0, 3.0, -2.0, 0.5, 4.0])
    surrogate = fit_regmix(mixtures, mixtures @ coef, model="ridge", ridge_alpha=1e-10)
    assert surrogate.kind == "ridge" and surrogate.valid_r2 > 0.999
    probe = sample_regmix_mixtures(SHARES, 20, seed=4)
    np.testing.assert_allclose(surrogate.predict(probe), probe @ coef, atol=1e-4)
    with pytest.raises(ConfigError, match="`model` must be one of"):
        fit_regmix(mixtures, mixtures @ coef, model="mlp")


def test_regmix_mixer_proposes_once_and_resumes():
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    optimum = np.array([0.15, 0.25, 0.35, 0.25])
    mixtures = sample_regmix_mixtures(shares, 256, seed=1)
    losses = synthetic_loss(mixtures, optimum)
    context = MixingContext(domains=("a", "b", "c", "d"), w_prior=shares, domain_tokens=shares * 1e9)
    mixer = get_mixer("regmix", mixtures=mixtures, losses=losses, model="ridge", num_simulations=5000)
    first = mixer.propose(context)
    assert first.status == "surrogate" and first.terms["num_proxies"] == 256
    state = json.loads(json.dumps(mixer.state_dict()))
    resumed = get_mixer("regmix", mixtures=mixtures, losses=losses, model="ridge", num_simulations=5000)
    resumed.load_state_dict(state)
    again = resumed.propose(context)
    np.testing.assert_array_equal(again.weights, first.weights)
    assert again.terms == first.terms
    other = get_mixer("regmix", mixtures=mixtures, losses=losses + 1, model="ridge", num_simulations=5000)
    with pytest.raises(StateError, match="another \\(mixture, loss\\) table"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="needs the proxy table"):
        get_mixer("regmix")
    with pytest.raises(ConfigError, match="the context has 3 domains"):
        get_mixer("regmix", mixtures=mixtures, losses=losses).propose(
            MixingContext(domains=("a", "b", "c"), w_prior=[1, 1, 1], domain_tokens=[1, 1, 1])
        )
