"""Damping in projected space: relative to the unprojected mean eigenvalue, so it does not grow as d/k."""

from __future__ import annotations

import pytest
import torch

from tikmix_loader.errors import ConfigError
from tikmix_loader.influence.preconditioners import Eigenbasis, EKFACPreconditioner, KFACPreconditioner

D = 256  # unprojected width of both sides
RANK = 8  # directions the gradients live in
KS = (128, 64, 32, 16)


def _factor(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor with one outlier direction (eigenvalue 100, like an activation's mean) and ``RANK`` directions
    of eigenvalue 1, and an orthonormal basis of the latter [D, RANK]."""
    basis, _ = torch.linalg.qr(torch.randn(D, RANK + 1, generator=gen, dtype=torch.float64))
    outlier, signal = basis[:, :1], basis[:, 1:]
    return 100.0 * outlier @ outlier.T + signal @ signal.T, signal


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    (a, u_a), (b, u_b) = _factor(gen), _factor(gen)
    # A gradient [D_out, D_in] inside the signal directions of both sides.
    return a, b, u_b @ torch.randn(RANK, RANK, generator=gen, dtype=torch.float64) @ u_a.T


def _self_influence(kind: str, a, b, psi, *, widths) -> float:
    """``<psi, H^-1 psi>`` for one layer with the given preconditioner (positive, so ratios are stable)."""
    if kind == "kfac":
        preconditioner = KFACPreconditioner(factors=[(a, b)], widths=[widths], damping=0.1)
    else:
        basis = Eigenbasis.of(a, b)
        preconditioner = EKFACPreconditioner(
            bases=[basis], lambdas=[basis.kfac_eigenvalues()], widths=[widths], damping=0.1
        )
    return float((psi * preconditioner.apply(0, psi)).sum())


def _projected_ratio(kind: str, k: int, seeds=range(8)) -> float:
    """Projected over unprojected self-influence, averaged over Gaussian projections (variance 1/k, as the
    engine's)."""
    a, b, psi = _case()
    exact = _self_influence(kind, a, b, psi, widths=(D, D))
    ratios = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(100 + seed)
        p_in, p_out = (torch.randn(D, k, generator=gen, dtype=torch.float64) / k**0.5 for _ in range(2))
        projected = _self_influence(
            kind, p_in.T @ a @ p_in, p_out.T @ b @ p_out, p_out.T @ psi @ p_in, widths=(D, D)
        )
        ratios.append(projected / exact)
    return sum(ratios) / len(ratios)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_projected_influence_does_not_shrink_as_k_falls(kind):
    # The earlier convention, 0.1 x the *projected* mean eigenvalue (trace / k), grows as d/k: 0.1 * 108 / 16
    # = 0.68 at k = 16 against signal eigenvalues of 1, and measured ratios of 0.92/0.75/0.49/0.27 (K-FAC) and
    # 0.95/0.73/0.36/0.15 (EK-FAC) at k = 128/64/32/16, the pattern. Now: 1.00/0.98/0.95/0.90.
    ratios = {k: _projected_ratio(kind, k) for k in KS}
    assert all(0.85 <= ratio <= 1.1 for ratio in ratios.values()), ratios


def test_damping_is_the_unprojected_mean_eigenvalue():
    factor = torch.diag(torch.tensor([4.0, 2.0, 2.0], dtype=torch.float64))  # trace 8
    identity = torch.eye(3, dtype=torch.float64)
    preconditioner = KFACPreconditioner(factors=[(factor, identity)], widths=[(80, 3)], damping=0.5)
    # lambda_A = 0.5 * 8 / 80 = 0.05 (not 0.5 * 8 / 3); lambda_B = 0.5 * 3 / 3 = 0.5.
    expected = torch.diag(1.0 / (torch.tensor([4.0, 2.0, 2.0], dtype=torch.float64) + 0.05)) / 1.5
    torch.testing.assert_close(preconditioner.apply(0, identity), expected)


def test_ekfac_damping_is_the_unprojected_mean_of_lambda():
    basis = Eigenbasis.of(torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    lam = torch.tensor([[3.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # sum 4
    preconditioner = EKFACPreconditioner(bases=[basis], lambdas=[lam], widths=[(10, 20)], damping=0.5)
    m = torch.ones(2, 2, dtype=torch.float64)
    torch.testing.assert_close(preconditioner.apply(0, m), 1.0 / (lam + 0.5 * 4 / 200))


def test_widths_must_match_the_layers():
    factors = [(torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))]
    with pytest.raises(ConfigError, match=r"KFACPreconditioner: 1 factor pairs but 2 per-layer entries"):
        KFACPreconditioner(factors=factors, widths=[(2, 2), (2, 2)], damping=0.1)
