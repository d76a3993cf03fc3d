"""Shared fixtures of the mixer tests: synthetic influence problems and a feasible-point sampler."""

import numpy as np
import pytest


def make_problem(num_domains: int, num_targets: int, seed: int = 0):
    """A realistic influence matrix: a shared positive "domain quality" plus target-specific structure and
    noise, and a prior concentrated on the weaker domains (so it has room to improve)."""
    rng = np.random.default_rng(seed)
    quality = rng.gamma(2.0, 1.0, num_domains)
    affinity = rng.normal(0.0, 1.0, (num_targets, num_domains))
    S = quality[None, :] * (1.0 + 0.5 * affinity) * rng.uniform(0.2, 3.0, (num_targets, 1))
    prior = rng.dirichlet(np.full(num_domains, 2.0)) / (1.0 + quality)
    return S, prior / prior.sum()


@pytest.fixture
def problem():
    return make_problem


@pytest.fixture
def feasible_points():
    """``sample(S, w_prior, lo, hi, n, rng, around)``: ``n`` honest feasible points of TiKMiX-D's constraints,
    Dirichlet draws (broad ones and ones concentrated around ``around``) kept only if they satisfy
    ``S w >= S w_prior`` and the bounds."""

    def sample(S, w_prior, lo, hi, n, rng, around):
        kept = []
        for _ in range(200):
            broad = rng.dirichlet(np.ones(S.shape[1]), 2000)
            local = np.concatenate([rng.dirichlet(c * np.maximum(around, 1e-9), 1000) for c in (30.0, 300.0)])
            draws = np.concatenate([broad, local])
            ok = np.all(draws @ S.T >= S @ w_prior, axis=1) & np.all((draws >= lo) & (draws <= hi), axis=1)
            kept.extend(draws[ok])
            if len(kept) >= n:
                return np.array(kept[:n])
        raise AssertionError(f"only {len(kept)} feasible points found; the test problem is too tight")

    return sample
