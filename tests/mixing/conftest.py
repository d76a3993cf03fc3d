"""Shared fixtures of the mixer tests: synthetic influence problems and a feasible-point sampler."""

import numpy as np
import pytest

from tikmix_loader.mixing import synthetic_problem


@pytest.fixture
def problem():
    """``problem(num_domains, num_targets, seed=0)``: ``synthetic_problem``'s ``(S, w_prior)``."""
    return synthetic_problem


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
