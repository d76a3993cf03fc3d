"""Projection fidelity: projected S tracks the unprojected S more closely as k grows."""

from __future__ import annotations

import numpy as np
import pytest
from influence_cases import batches

from tikmix_loader.influence.reference import projection_curve
from tikmix_loader.models import GPTConfig, TinyGPT

KS = (4, 16, 64)


@pytest.fixture(scope="module")
def model():
    # Wider than k=64 on every side (d_model 96, MLP 384), so the default k really projects.
    return TinyGPT(GPTConfig(d_model=96, n_layer=1, n_head=2, seq_len=32), seed=0)


def test_domain_level_influence_survives_projection_at_default_k(model):
    kinds = ("alpha", "digits", "random")
    domains = {kind: batches(kind, 1, seed=50 + i) for i, kind in enumerate(kinds)}
    domains["alpha_2"] = batches("alpha", 1, seed=60)
    targets = {f"{kind}_val": batches(kind, 1, seed=70 + i) for i, kind in enumerate(kinds)}
    curve = projection_curve(model, domains, targets, ks=KS, preconditioner="kfac")
    means = {k: float(np.mean(v)) for k, v in curve.items()}
    assert means[64] >= 0.9, curve
    assert means[64] >= means[4] - 0.005, curve


def test_fine_grained_correlation_grows_with_k(model):
    # Twelve groups of two rows from one distribution: only small differences separate them, the hard case.
    domains = {f"g{i}": batches("alpha", 1, batch_size=2, seed=100 + i) for i in range(12)}
    targets = {"alpha_val": batches("alpha", 1, seed=7), "digits_val": batches("digits", 1, seed=8)}
    curve = projection_curve(model, domains, targets, ks=KS, preconditioner="identity", per_target=True)
    means = {k: float(np.mean(v)) for k, v in curve.items()}
    assert means[64] > means[16] > means[4], curve
    assert means[64] >= 0.7, curve
