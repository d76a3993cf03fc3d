"""Brute-force Group Influence from plain autograd weight gradients, the reference for tests and benchmarks.

Nothing here is projected, fused or hooked into the kernels. Weight gradients come from
``torch.autograd.grad`` with respect to the weights themselves (per example by looping over rows, for EK-FAC);
the K-FAC factors come from the layers' inputs and from output gradients taken with ``torch.autograd.grad``;
the preconditioners are written out with dense ``torch.linalg`` calls, and ``adam`` uses the optimizer's
element-wise ``1 / (sqrt(v_hat) + eps)`` itself, not the engine's rank-1 factoring of it. It follows the
conventions documented in ``tikmix_loader.influence.group_influence`` and ``.preconditioners`` (summed-loss
scale, live tokens, A per token, B per example, relative damping), restated here so a slip in either place
shows up as a mismatch.
Gradients of Hugging Face ``Conv1D`` weights (stored ``[d_in, d_out]``) are transposed to the Linear layout
``[d_out, d_in]`` the factors are written in. Cost grows with d_out * d_in per example: use it on small models
only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from tikmix_loader.influence.task import is_conv1d
from tikmix_loader.losses import loss_mask, per_token_loss


def _mask_and_live(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    counted = loss_mask(batch).to(device)
    live = torch.zeros_like(counted)
    for t in range(counted.shape[1]):  # live: this or any later position of the row counts
        live[:, t] = counted[:, t:].any(1)
    return counted.double(), live


def _weight_gradients(loss: torch.Tensor, modules, **options) -> list[torch.Tensor]:
    """d loss / d weight of every module, in the Linear layout [d_out, d_in]."""
    grads = torch.autograd.grad(loss, [m.weight for m in modules], **options)
    return [g.T if is_conv1d(m) else g for m, g in zip(modules, grads, strict=True)]


def _summed_gradients(model, modules, batches, loss_fn) -> tuple[list[torch.Tensor], float]:
    total = [0.0] * len(modules)
    tokens = 0.0
    for batch in batches:
        loss = loss_fn(model, batch)
        mask, _ = _mask_and_live(batch, loss.device)
        grads = _weight_gradients((loss.double() * mask).sum(), modules)
        total = [t + g.double() for t, g in zip(total, grads, strict=True)]
        tokens += float(mask.sum())
    return total, tokens


def _factors(model, modules, batches, loss_fn) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sums_a = [0.0] * len(modules)
    sums_b = [0.0] * len(modules)
    live_tokens = live_rows = 0.0
    for batch in batches:
        seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        handles = [
            m.register_forward_hook(lambda mod, inp, out, i=i, seen=seen: seen.append((i, inp[0], out)))
            for i, m in enumerate(modules)
        ]
        try:
            loss = loss_fn(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        mask, live = _mask_and_live(batch, loss.device)
        grads = torch.autograd.grad((loss.double() * mask).sum(), [out for _, _, out in seen])
        keep = live.reshape(-1)
        for (i, x, _), g in zip(seen, grads, strict=True):
            x = x.detach().reshape(-1, x.shape[-1])[keep].double()
            g = g.reshape(-1, g.shape[-1])[keep].double()
            sums_a[i] = sums_a[i] + x.T @ x
            sums_b[i] = sums_b[i] + g.T @ g
        live_tokens += float(live.sum())
        live_rows += float(live.any(1).sum())
    return [(a / live_tokens, b / live_rows) for a, b in zip(sums_a, sums_b, strict=True)]


def _per_example_gradients(model, modules, batches, loss_fn):
    for batch in batches:
        loss = loss_fn(model, batch)
        mask, live = _mask_and_live(batch, loss.device)
        for row in range(loss.shape[0]):
            if live[row].any():
                yield _weight_gradients((loss[row].double() * mask[row]).sum(), modules, retain_graph=True)


def _damped(factor: torch.Tensor, damping: float) -> torch.Tensor:
    mean = float(torch.trace(factor)) / factor.shape[0]
    return factor + (damping * mean if mean > 0 else damping) * torch.eye(factor.shape[0], dtype=factor.dtype)


def _adam_denominator(optimizer: torch.optim.Optimizer, module: nn.Module) -> torch.Tensor:
    """AdamW's ``sqrt(v_hat) + eps`` for ``module``'s weight, in the Linear layout [d_out, d_in], float64."""
    group = next(g for g in optimizer.param_groups if any(p is module.weight for p in g["params"]))
    state = optimizer.state[module.weight]
    v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
    denominator = v_hat.sqrt() + group["eps"]
    return denominator.T if is_conv1d(module) else denominator


def exact_influence(
    model: nn.Module,
    domains: Mapping[str, Iterable[dict]],
    targets: Mapping[str, Iterable[dict]],
    *,
    layers: list[str],
    loss_fn=per_token_loss,
    preconditioner: str = "identity",
    damping: float = 0.1,
    optimizer: torch.optim.Optimizer | None = None,
) -> np.ndarray:
    """Unprojected ``S[b, d] = psi_b^T H^-1 phi_d`` [n_targets, n_domains] float64, by brute force.

    Args:
        model (nn.Module): The model (run in eval mode; its ``.grad`` is not touched).
        domains (Mapping[str, Iterable[dict]]): Domain name -> batches (re-iterable: read several times).
        targets (Mapping[str, Iterable[dict]]): Target name -> batches.
        layers (list[str]): Names of the ``nn.Linear``/``Conv1D`` modules whose weights count.
        loss_fn: Per-token loss [B, T]. Default: ``per_token_loss``.
        preconditioner (str): ``"identity"``, ``"kfac"``, ``"ekfac"`` or ``"adam"``. Default: ``"identity"``.
        damping (float): Relative damping, as in ``InfluenceConfig``. Default: 0.1.
        optimizer (torch.optim.Optimizer | None): ``"adam"``: the torch Adam/AdamW whose bias-corrected
            ``exp_avg_sq`` gives ``D = 1 / (sqrt(v_hat) + eps)``, element-wise (unfactored). Default: None.
    """
    training = model.training
    model.eval()
    modules = [model.get_submodule(name) for name in layers]
    try:
        phis, psis = [], []
        for groups, out in ((domains, phis), (targets, psis)):
            for batches in groups.values():
                total, tokens = _summed_gradients(model, modules, batches, loss_fn)
                out.append([t / tokens for t in total])
        all_domain_batches = [batch for batches in domains.values() for batch in batches]
        if preconditioner == "identity":
            precondition = lambda i, m: m
        elif preconditioner == "adam":
            denominators = [_adam_denominator(optimizer, module) for module in modules]
            precondition = lambda i, m: m / denominators[i]
        else:
            factors = _factors(model, modules, all_domain_batches, loss_fn)
            if preconditioner == "kfac":
                precondition = lambda i, m: torch.linalg.solve(
                    _damped(factors[i][1], damping),
                    torch.linalg.solve(_damped(factors[i][0], damping), m.T).T,
                )
            else:
                bases = [(torch.linalg.eigh(a)[1], torch.linalg.eigh(b)[1]) for a, b in factors]
                lambdas = [0.0] * len(modules)
                count = 0
                for grads in _per_example_gradients(model, modules, all_domain_batches, loss_fn):
                    count += 1
                    for i, ((q_a, q_b), grad) in enumerate(zip(bases, grads, strict=True)):
                        lambdas[i] = lambdas[i] + (q_b.T @ grad.double() @ q_a) ** 2
                lambdas = [lam / count for lam in lambdas]

                def precondition(i, m):
                    q_a, q_b = bases[i]
                    lam = lambdas[i]
                    return q_b @ ((q_b.T @ m @ q_a) / (lam + damping * float(lam.mean()))) @ q_a.T

        values = np.zeros((len(psis), len(phis)))
        for b, psi in enumerate(psis):
            for d, phi in enumerate(phis):
                values[b, d] = sum(
                    float((precondition(i, p) * f).sum())
                    for i, (p, f) in enumerate(zip(psi, phi, strict=True))
                )
        return values
    finally:
        model.train(training)


def correlation(a: np.ndarray, b: np.ndarray, *, per_target: bool = False) -> float:
    """Pearson correlation of two influence matrices: over all entries, or the mean over target rows."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if per_target:
        return float(np.mean([np.corrcoef(row_a, row_b)[0, 1] for row_a, row_b in zip(a, b, strict=True)]))
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def projection_curve(
    model: nn.Module,
    domains: Mapping[str, Iterable[dict]],
    targets: Mapping[str, Iterable[dict]],
    *,
    ks: tuple[int, ...],
    seeds: tuple[int, ...] = (0, 1),
    preconditioner: str = "kfac",
    per_target: bool = False,
    **engine_options,
) -> dict[int, list[float]]:
    """Correlation of projected S (each k, each projection seed) with the unprojected S of the same engine.

    Returns:
        dict[int, list[float]]: k -> one correlation per seed (see ``correlation``).
    """
    from tikmix_loader.influence.group_influence import GroupInfluence

    build = lambda k, seed: GroupInfluence(
        model, k=k, preconditioner=preconditioner, seed=seed, **engine_options
    )
    exact = build(None, 0).compute(domains, targets).values
    return {
        k: [
            correlation(build(k, seed).compute(domains, targets).values, exact, per_target=per_target)
            for seed in seeds
        ]
        for k in ks
    }
