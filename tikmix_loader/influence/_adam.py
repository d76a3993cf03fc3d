"""The ``"adam"`` metric: an Adam optimizer's per-weight step sizes, factored so the kernels can apply them.

One AdamW step on a mixture ``w`` moves a target's loss by ``-lr (1 - beta1) sum_d w_d psi^T D phi_d`` to
first order, plus terms that do not depend on ``w`` (momentum, weight decay), where ``D = 1 / (sqrt(v_hat) +
eps)`` element-wise, from the optimizer's bias-corrected second moments ``v_hat`` (the LESS observation,
docs/methods.md §3). So the ``"adam"`` preconditioner weighs gradients by ``D``, not an inverse curvature.

The kernels project per-token factors ``x`` and ``g`` of the weight gradient ``sum_t g_t x_t^T``, and an
element-wise ``D`` does not commute with projection. A rank-1 ``D`` does: if ``D_ij = u_i s_j`` then ``D o G
= diag(u) G diag(s)``, which is the gradient of the tokens with ``g`` scaled by ``u`` and ``x`` by ``s``. So
the *denominator* ``M = sqrt(v_hat) + eps`` of every tracked weight is factored the way Adafactor factors the
second moment (Shazeer & Stern 2018): ``M ~ r c^T / sum(r)`` with ``r`` and ``c`` its row and column sums
(the closest rank-1 matrix in generalised KL divergence; exact when ``M`` is rank-1). Then ``D_ij ~ sum(r) /
(r_i c_j)``, and ``psi^T D phi = <sqrt(D) o Psi, sqrt(D) o Phi>``: both the domain and the target gradients
have their ``g`` scaled by ``sqrt(sum(r) / r_i)`` and their ``x`` by ``1 / sqrt(c_j)`` before projection,
after which the inner product is the identity's (the engine scales the rows of the projections instead,
which is the same product and cheaper). Approximated, then: ``M`` by its rank-1 factoring (``eps``
is kept, inside ``M``; with ``eps = 0`` a row or column of ``M`` that is all zero gets scale 0); only the
weights count (biases are not tracked, as for every preconditioner); the second moments are read whenever
gradients are scaled (at each ``observe`` step in online mode, at the call in ``compute`` and
``influence``), and the step's own gradient is not in them (first order).
"""

from __future__ import annotations

import torch

from tikmix_loader.errors import ConfigError
from tikmix_loader.influence.task import is_conv1d

Scales = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (x scale [d_in], g scale [d_out]), float32


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """``id(param)`` -> its param group."""
    return {id(param): group for group in optimizer.param_groups for param in group["params"]}


def check_optimizer(optimizer, layers) -> None:
    """Raise ``ConfigError`` unless ``optimizer`` is a torch optimizer with Adam's ``betas`` and ``eps``
    that updates every tracked layer's weight (``layers``: ``TrackedLayer``s)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "GroupInfluence: preconditioner 'adam' needs the training optimizer (torch Adam or AdamW), got "
            f"{type(optimizer).__name__}"
        )
    groups = _groups_by_param(optimizer)
    for layer in layers:
        group = groups.get(id(layer.module.weight))
        if group is None:
            raise ConfigError(
                f"GroupInfluence: the weight of tracked layer {layer.name!r} is in none of the optimizer's "
                "param groups; pass the optimizer that trains it, or exclude the layer"
            )
        if "betas" not in group or "eps" not in group:
            raise ConfigError(
                f"GroupInfluence: preconditioner 'adam' needs an Adam-family optimizer (`betas`, `eps` and "
                f"`exp_avg_sq`), but {type(optimizer).__name__}'s group for layer {layer.name!r} has options "
                f"{sorted(key for key in group if key != 'params')}"
            )


def _second_moment(optimizer, group: dict, state: dict, name: str) -> torch.Tensor:
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"  # AMSGrad divides by the running max
    if key not in state:
        raise ConfigError(
            f"GroupInfluence: the optimizer ({type(optimizer).__name__}) keeps no `{key}` for tracked layer "
            f"{name!r} (state keys {sorted(state)}); preconditioner 'adam' needs torch Adam or AdamW"
        )
    return state[key]


def adam_scales(optimizer: torch.optim.Optimizer, layers) -> Scales | None:
    """Per tracked layer the ``(x, g)`` scales of the rank-1 factored ``1 / (sqrt(v_hat) + eps)``.

    Args:
        optimizer (torch.optim.Optimizer): The training Adam/AdamW (checked by ``check_optimizer``).
        layers (list[TrackedLayer]): The tracked layers.

    Returns:
        Scales | None: None when no tracked weight has optimizer state yet (before the first step).

    Raises:
        ConfigError: some tracked weights have state and others not, the state has no second moment, or
            its shape differs from the weight's, or ``check_optimizer`` fails; the message names the layer.
    """
    check_optimizer(optimizer, layers)  # its param groups may have changed since it was bound
    states = [optimizer.state.get(layer.module.weight) or {} for layer in layers]
    if not any(states):
        return None
    missing = [layer.name for layer, state in zip(layers, states, strict=True) if not state]
    if missing:
        raise ConfigError(
            f"GroupInfluence: tracked layers {missing} have no optimizer state while others do (did their "
            "weights get no gradient?); exclude them for preconditioner 'adam'"
        )
    scales, groups = [], _groups_by_param(optimizer)
    for layer, state in zip(layers, states, strict=True):
        weight = layer.module.weight
        group = groups[id(weight)]
        v = _second_moment(optimizer, group, state, layer.name)
        if v.shape != weight.shape:
            raise ConfigError(
                f"GroupInfluence: the optimizer's second moment for tracked layer {layer.name!r} has shape "
                f"{tuple(v.shape)}, its weight {tuple(weight.shape)} (a sharded or flattened optimizer?); "
                "preconditioner 'adam' needs one full `exp_avg_sq` per weight"
            )
        beta2, step = group["betas"][1], float(state["step"])
        # float32, one weight-sized temporary per layer (this runs at every online step)
        denominator = v.detach().float().div(1.0 - beta2**step).sqrt_().add_(group["eps"])
        if is_conv1d(layer.module):  # stored [d_in, d_out]; the kernels use the Linear layout
            denominator = denominator.T
        rows, columns = denominator.sum(1), denominator.sum(0)
        g_scale = torch.where(rows > 0, rows.sum() / rows, 0.0).sqrt()
        x_scale = torch.where(columns > 0, columns, 1.0).rsqrt() * (columns > 0)
        scales.append((x_scale, g_scale))
    return scales
