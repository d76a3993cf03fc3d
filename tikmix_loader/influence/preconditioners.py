"""Per-layer preconditioners in projected space: identity, K-FAC and EK-FAC (inverse curvatures) and Adam
(the optimizer's step sizes) (docs/methods.md §3).

Every preconditioner maps a layer's (projected) gradient matrix ``M`` [..., k_out, k_in] to ``H^-1 M``:

- ``identity``: ``M`` (TracIn-like).
- ``kfac``: ``(B + lambda_B I)^-1 M (A + lambda_A I)^-1`` with ``A = E_tokens[x~ x~^T]`` and
  ``B = sum_tokens g~ g~^T / examples``.
- ``ekfac``: ``Q_B [(Q_B^T M Q_A) / (Lambda + lambda)] Q_A^T`` with the eigenbases ``Q_A``, ``Q_B`` of A and B
  and ``Lambda = E_examples[(Q_B^T phi_e Q_A)^2]``.
- ``adam``: ``M`` as well, because ``D = 1 / (sqrt(v_hat) + eps)`` of the training Adam/AdamW was applied
  (rank-1 factored) to ``x`` and ``g`` *before* projection (``influence/_adam.py``).

Each class says what the engine must collect for it, and the engine branches on these flags, never on the
name: ``needs_factors`` (the K-FAC factor sums A and B), ``needs_lambda`` (the corrected eigenvalues
``Lambda``, measured in the eigenbasis of those factors: a second pass over the domains, or online the basis
fixed at the previous call) and ``needs_optimizer`` (the training optimizer's state).

Ours (the paper is silent): ``g`` is the gradient of the *summed* per-token loss, so it has per-token scale,
and B is normalised by examples (rows) while A is normalised by tokens. Then ``A (x) B`` approximates the
per-example empirical Fisher ``E_e[vec(W_e) vec(W_e)^T]`` (cross-token terms dropped, as in Kronfluence), the
same scale as EK-FAC's per-example ``Lambda``. Damping is relative (``InfluenceConfig.damping``) to the
*unprojected* mean eigenvalue: K-FAC adds ``damping * trace(A) / d_in`` to A and ``damping * trace(B) /
d_out`` to B, EK-FAC adds ``damping * sum(Lambda) / (d_out d_in)`` to Lambda. The projections (variance 1/k)
keep traces in expectation, so the shift does not depend on k; dividing by k instead grew it as d/k and shrank
projected influence steadily as k fell (issue 14; docs/influence.md compares this with Kronfluence's
convention). Without projection (k = d) both are the same. A factor that saw no signal (all zero) gets
``damping`` itself, so it stays invertible and its layer contributes 0. Linear algebra runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tikmix_loader.errors import ConfigError


def _damping_shift(total: float, unprojected_size: int, damping: float) -> float:
    """``damping`` times the *unprojected* mean eigenvalue ``total / unprojected_size`` (``damping`` itself
    when the factor saw no signal). ``total`` is a trace, which the projections preserve in expectation."""
    return damping * total / unprojected_size if total > 0 else damping


def _damped_inverse(factor: torch.Tensor, unprojected_size: int, damping: float) -> torch.Tensor:
    size = factor.shape[0]
    shift = _damping_shift(float(torch.trace(factor)), unprojected_size, damping)
    eye = torch.eye(size, dtype=factor.dtype, device=factor.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(factor + shift * eye))


def _check_layers(owner: str, what: str, items: list, per_layer: list) -> None:
    if len(items) != len(per_layer):
        raise ConfigError(
            f"{owner}: {len(items)} {what} but {len(per_layer)} per-layer entries to pair them with; give "
            "one of each per tracked layer"
        )


@dataclass(frozen=True)
class Eigenbasis:
    """The eigenbases of one layer's K-FAC factors: ``A = Q_A diag(eig_a) Q_A^T``, likewise B (float64)."""

    q_a: torch.Tensor
    q_b: torch.Tensor
    eig_a: torch.Tensor
    eig_b: torch.Tensor

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> Eigenbasis:
        """Eigendecompose the (symmetrised) factors ``a`` [k_in, k_in] and ``b`` [k_out, k_out]."""
        eig_a, q_a = torch.linalg.eigh(0.5 * (a + a.T).double())
        eig_b, q_b = torch.linalg.eigh(0.5 * (b + b.T).double())
        return cls(q_a=q_a, q_b=q_b, eig_a=eig_a.clamp(min=0), eig_b=eig_b.clamp(min=0))

    def kfac_eigenvalues(self) -> torch.Tensor:
        """K-FAC's eigenvalues in this basis, ``eig_b eig_a^T`` [k_out, k_in] (EK-FAC before correction)."""
        return torch.outer(self.eig_b, self.eig_a)

    def rotated_squares(self, phi: torch.Tensor) -> torch.Tensor:
        """``sum_e (Q_B^T phi_e Q_A)^2`` [k_out, k_in] over per-example matrices ``phi`` [E, k_out, k_in]."""
        q_a = self.q_a.to(device=phi.device, dtype=phi.dtype)
        q_b = self.q_b.to(device=phi.device, dtype=phi.dtype)
        return (q_b.T @ phi @ q_a).square().sum(0)


class IdentityPreconditioner:
    """``H = I``: influence is the plain inner product of gradients."""

    name = "identity"
    needs_factors = False
    needs_lambda = False
    needs_optimizer = False

    def apply(self, layer: int, m: torch.Tensor) -> torch.Tensor:
        """``m`` unchanged."""
        return m


class AdamPreconditioner(IdentityPreconditioner):
    """``H^-1 = D``, Adam's per-weight step sizes: the engine scales every gradient by the rank-1 factored
    ``sqrt(D)`` before projection (``influence/_adam.py``), so in projected space it is the identity."""

    name = "adam"
    needs_optimizer = True


class KFACPreconditioner:
    """``H^-1 M = (B + lambda_B I)^-1 M (A + lambda_A I)^-1`` per layer.

    Args:
        factors (list[tuple[Tensor, Tensor]]): per layer ``(A, B)``, normalised (see the module docstring).
        widths (list[tuple[int, int]]): per layer the unprojected ``(d_in, d_out)``, which set the damping.
        damping (float): Relative damping: ``lambda_A = damping * trace(A) / d_in``, likewise B.
    """

    name = "kfac"
    needs_factors = True
    needs_lambda = False
    needs_optimizer = False

    def __init__(
        self,
        *,
        factors: list[tuple[torch.Tensor, torch.Tensor]],
        widths: list[tuple[int, int]],
        damping: float,
    ):
        _check_layers("KFACPreconditioner", "factor pairs", factors, widths)
        self._inverses = [
            (_damped_inverse(a.double(), d_in, damping), _damped_inverse(b.double(), d_out, damping))
            for (a, b), (d_in, d_out) in zip(factors, widths, strict=True)
        ]

    def apply(self, layer: int, m: torch.Tensor) -> torch.Tensor:
        """``(B + lambda_B I)^-1 m (A + lambda_A I)^-1`` for ``m`` [..., k_out, k_in] float64."""
        inv_a, inv_b = self._inverses[layer]
        return inv_b @ m @ inv_a


class EKFACPreconditioner:
    """``H^-1 M = Q_B [(Q_B^T M Q_A) / (Lambda + damping * sum(Lambda) / (d_out d_in))] Q_A^T`` per layer.

    Args:
        bases (list[Eigenbasis]): per layer eigenbases of the K-FAC factors.
        lambdas (list[Tensor]): per layer corrected eigenvalues ``Lambda`` [k_out, k_in] in those bases.
        widths (list[tuple[int, int]]): per layer the unprojected ``(d_in, d_out)``, which set the damping.
        damping (float): Relative damping (of the unprojected mean eigenvalue).
    """

    name = "ekfac"
    needs_factors = True
    needs_lambda = True
    needs_optimizer = False

    def __init__(
        self,
        *,
        bases: list[Eigenbasis],
        lambdas: list[torch.Tensor],
        widths: list[tuple[int, int]],
        damping: float,
    ):
        _check_layers("EKFACPreconditioner", "eigenbases", bases, lambdas)
        _check_layers("EKFACPreconditioner", "eigenbases", bases, widths)
        self._bases = bases
        self._denominators = [
            lam.double() + _damping_shift(float(lam.double().sum()), d_in * d_out, damping)
            for lam, (d_in, d_out) in zip(lambdas, widths, strict=True)
        ]

    def apply(self, layer: int, m: torch.Tensor) -> torch.Tensor:
        """``Q_B [(Q_B^T m Q_A) / (Lambda + lambda)] Q_A^T`` for ``m`` [..., k_out, k_in] float64."""
        basis = self._bases[layer]
        rotated = basis.q_b.T @ m @ basis.q_a
        return basis.q_b @ (rotated / self._denominators[layer]) @ basis.q_a.T


PRECONDITIONERS = {
    "adam": AdamPreconditioner,
    "ekfac": EKFACPreconditioner,
    "identity": IdentityPreconditioner,
    "kfac": KFACPreconditioner,
}


def get_preconditioner(name: str) -> type:
    """The preconditioner class registered as ``name``.

    Raises:
        ConfigError: unknown ``name``; the message lists the valid ones.
    """
    if name not in PRECONDITIONERS:
        raise ConfigError(f"unknown preconditioner {name!r}; valid: {sorted(PRECONDITIONERS)}")
    return PRECONDITIONERS[name]
