"""Synthetic TiKMiX-D problems: an influence matrix and a prior to try the solvers on without a model."""

from __future__ import annotations

import numpy as np


def synthetic_problem(num_domains: int, num_targets: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(S, w_prior)``: an influence matrix ``S`` [num_targets, num_domains] with a shared positive domain
    quality, target-specific structure and noise, and a prior concentrated on the weaker domains (so a
    solver has room to improve on it). The same ``seed`` gives the same problem; the mixer tests and
    ``benchmarks/bench_solver.py`` solve these."""
    rng = np.random.default_rng(seed)
    quality = rng.gamma(2.0, 1.0, num_domains)
    affinity = rng.normal(0.0, 1.0, (num_targets, num_domains))
    S = quality[None, :] * (1.0 + 0.5 * affinity) * rng.uniform(0.2, 3.0, (num_targets, 1))
    prior = rng.dirichlet(np.full(num_domains, 2.0)) / (1.0 + quality)
    return S, prior / prior.sum()
