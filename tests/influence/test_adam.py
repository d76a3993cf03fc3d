"""The "adam" preconditioner: S = psi^T D phi with AdamW's rank-1 factored step sizes D, against a plain
autograd derivation written out here (not the engine's kernels or its ``_adam`` module)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from influence_cases import batches, mixed, with_masks
from testkit.hf_models import tiny_gpt2

from tikmix_loader.errors import ConfigError
from tikmix_loader.influence import GroupInfluence, HFCausalLMTask
from tikmix_loader.influence.reference import exact_influence
from tikmix_loader.losses import loss_mask
from tikmix_loader.models import per_token_loss

DOMAINS = ("alpha", "digits", "random")


def _groups() -> tuple[dict, dict]:
    domains = {
        "alpha": [with_masks(b) for b in batches("alpha", 2, seed=1, domain=0)],
        "digits": batches("digits", 1, seed=2, domain=1),
        "random": batches("random", 2, seed=3, batch_size=3, domain=2),
    }
    targets = {"alpha_val": batches("alpha", 1, seed=11), "digits_val": batches("digits", 1, seed=12)}
    return domains, targets


def _adamw(model, steps: int = 3, *, eps: float = 1e-8, loss=per_token_loss) -> torch.optim.AdamW:
    """AdamW after ``steps`` steps on mixed batches, so every weight has a (not rank-1) ``exp_avg_sq``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=eps)
    groups = [batches(kind, steps, seed=50 + d, domain=d) for d, kind in enumerate(DOMAINS)]
    for step in range(steps):
        batch = mixed(groups, step)
        per_token = loss(model, batch)
        (per_token.sum() / loss_mask(batch).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _mean_gradients(model, layers: list[str], groups: dict, loss_fn) -> list[list[torch.Tensor]]:
    """Per group, the gradient of its mean per-token loss w.r.t. each layer's weight as stored (float64)."""
    model.eval()
    weights = [model.get_submodule(name).weight for name in layers]
    out = []
    for group in groups.values():
        total, tokens = [torch.zeros_like(w, dtype=torch.float64) for w in weights], 0.0
        for batch in group:
            mask = loss_mask(batch).double()
            loss = (loss_fn(model, batch).double() * mask).sum()
            total = [t + g.double() for t, g in zip(total, torch.autograd.grad(loss, weights), strict=True)]
            tokens += float(mask.sum())
        out.append([t / tokens for t in total])
    model.train()
    return out


def _denominator(optimizer, weight) -> torch.Tensor:
    """AdamW's ``sqrt(v_hat) + eps`` for ``weight``, bias-corrected, float64."""
    state, group = optimizer.state[weight], optimizer.param_groups[0]
    v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
    return v_hat.sqrt() + group["eps"]


def _factored(denominator: torch.Tensor) -> torch.Tensor:
    """Adafactor's rank-1 fit ``r c^T / sum(r)`` of a non-negative matrix (row sums r, column sums c)."""
    return torch.outer(denominator.sum(1), denominator.sum(0)) / denominator.sum()


def _expected(model, layers, domains, targets, metric, loss_fn=per_token_loss) -> np.ndarray:
    """``S[t, d] = sum_layers <psi_t, metric(weight) o phi_d>``, element-wise in the weight's stored layout
    (the rank-1 fit is the same in either orientation, so Conv1D needs no transposing here)."""
    phis = _mean_gradients(model, layers, domains, loss_fn)
    psis = _mean_gradients(model, layers, targets, loss_fn)
    d = [metric(model.get_submodule(name).weight) for name in layers]
    return np.array(
        [
            [sum(float((p * m * f).sum()) for p, m, f in zip(psi, d, phi, strict=True)) for phi in phis]
            for psi in psis
        ]
    )


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    worst, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert worst <= rtol * scale, f"max |diff| {worst:.3e} > {rtol} * {scale:.3e}\n{actual}\n{expected}"


def test_exact_adam_influence_equals_autograd_with_factored_step_sizes(micro):
    optimizer = _adamw(micro, eps=1e-4)  # an eps that matters next to sqrt(v_hat) (about 1e-3 here)
    domains, targets = _groups()
    gi = GroupInfluence(micro, k=None, preconditioner="adam", optimizer=optimizer)
    before = copy.deepcopy(optimizer.state_dict())
    S = gi.compute(domains, targets)
    after = optimizer.state_dict()
    for key, state in before["state"].items():  # reading the second moments leaves them alone
        assert all(torch.equal(value, after["state"][key][name]) for name, value in state.items())
    factored = _expected(
        micro, gi.layer_names, domains, targets, lambda w: 1 / _factored(_denominator(optimizer, w))
    )
    _assert_close(S.values, factored, rtol=2e-6)
    assert S.preconditioner == "adam" and S.values.shape == (2, 3)
    # The metric matters: plain gradients and the unfactored D give other numbers (the test sees the formula).
    plain = _expected(micro, gi.layer_names, domains, targets, lambda w: torch.ones((), dtype=torch.float64))
    unfactored = _expected(micro, gi.layer_names, domains, targets, lambda w: 1 / _denominator(optimizer, w))
    assert not np.allclose(factored / np.abs(factored).max(), plain / np.abs(plain).max(), atol=0.05)
    assert not np.allclose(factored, unfactored, rtol=0.01)


def test_gpt2_conv1d_weights_are_scaled_in_their_own_layout():
    model = tiny_gpt2(seq_len=32, tie=False)
    task = HFCausalLMTask()
    optimizer = _adamw(model, loss=task.per_token_loss)
    domains, targets = _groups()
    gi = GroupInfluence(
        model, task=task, k=None, preconditioner="adam", optimizer=optimizer, layers=["transformer.h.0.*"]
    )
    expected = _expected(
        model,
        gi.layer_names,
        domains,
        targets,
        lambda w: 1 / _factored(_denominator(optimizer, w)),
        task.per_token_loss,
    )
    _assert_close(gi.compute(domains, targets).values, expected, rtol=2e-6)


def test_rank_one_second_moment_gives_the_unfactored_adam_step(micro):
    """With ``v`` exactly rank-1 and eps = 0 the factoring is exact: S = psi^T D phi, D = 1 / sqrt(v_hat)."""
    optimizer = _adamw(micro, steps=1)
    gen = torch.Generator().manual_seed(0)
    for group in optimizer.param_groups:
        group["eps"] = 0.0
        for param in group["params"]:
            if param.dim() == 2:
                rows, columns = (torch.rand(n, generator=gen) * 9 + 1 for n in param.shape)
                optimizer.state[param]["exp_avg_sq"] = 1e-6 * torch.outer(rows, columns)
    domains, targets = _groups()
    gi = GroupInfluence(micro, k=None, preconditioner="adam", optimizer=optimizer)
    unfactored = _expected(micro, gi.layer_names, domains, targets, lambda w: 1 / _denominator(optimizer, w))
    _assert_close(gi.compute(domains, targets).values, unfactored, rtol=2e-6)
    # The benchmarks' brute-force reference (unfactored D) agrees.
    reference = exact_influence(
        micro, domains, targets, layers=gi.layer_names, preconditioner="adam", optimizer=optimizer
    )
    _assert_close(reference, unfactored, rtol=1e-9)


def test_projected_adam_influence_is_unbiased_over_projection_seeds(micro):
    optimizer = _adamw(micro)
    domains, targets = _groups()
    exact = GroupInfluence(micro, k=None, preconditioner="adam", optimizer=optimizer).compute(
        domains, targets
    )
    draws = np.stack(
        [
            GroupInfluence(micro, k=8, preconditioner="adam", optimizer=optimizer, seed=seed)
            .compute(domains, targets)
            .values
            for seed in range(24)
        ]
    )
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - exact.values) <= 4 * se + 1e-3 * np.abs(exact.values).max()), (
        mean,
        exact.values,
    )
    assert np.all(se > 0)  # k = 8 really projects (each draw differs)


def test_online_adam_equals_observation_mode_while_the_state_is_fixed(micro):
    optimizer = _adamw(micro)
    domains, targets = _groups()
    online = GroupInfluence(micro, k=16, preconditioner="adam", domains=DOMAINS)
    online.bind_optimizer(optimizer)
    for i in range(2):  # no optimizer.step() in between, so D is the same for every pass
        batch = mixed([domains["alpha"], domains["digits"] * 2, domains["random"]], i)
        with online.observe(batch):
            (per_token_loss(micro, batch).sum() / loss_mask(batch).sum()).backward()
    micro.zero_grad()
    offline = GroupInfluence(micro, k=16, preconditioner="adam", optimizer=optimizer)
    expected = offline.compute({**domains, "digits": domains["digits"] * 2}, targets)
    np.testing.assert_allclose(online.influence(targets).values, expected.values, rtol=1e-5)

    resumed = GroupInfluence(micro, k=16, preconditioner="adam", domains=DOMAINS, optimizer=optimizer)
    resumed.load_state_dict(online.state_dict())
    np.testing.assert_allclose(resumed.influence(targets).values, expected.values, rtol=1e-5)


def test_online_adam_skips_steps_before_the_first_optimizer_step(micro):
    optimizer = torch.optim.AdamW(micro.parameters(), lr=1e-3)
    gi = GroupInfluence(micro, k=8, preconditioner="adam", domains=DOMAINS, optimizer=optimizer)
    batch = mixed([batches(kind, 1, seed=7, domain=d) for d, kind in enumerate(DOMAINS)], 0)
    for expected_steps in (0, 1):
        with gi.observe(batch):
            (per_token_loss(micro, batch).sum() / loss_mask(batch).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert gi.steps == expected_steps
    assert np.isfinite(gi.influence(_groups()[1]).values).all()


def test_adam_errors_name_the_fix(micro):
    domains, targets = _groups()
    with pytest.raises(ConfigError, match="bind_optimizer"):
        GroupInfluence(micro, k=8, preconditioner="adam").compute(domains, targets)
    with pytest.raises(ConfigError, match="Adam-family.*'blocks.0.attn.qkv'"):
        GroupInfluence(
            micro, k=8, preconditioner="adam", optimizer=torch.optim.SGD(micro.parameters(), lr=0.1)
        )
    head_only = torch.optim.AdamW(micro.lm_head.parameters())
    with pytest.raises(ConfigError, match="'blocks.0.attn.qkv' is in none of the optimizer's param groups"):
        GroupInfluence(micro, k=8, preconditioner="adam", optimizer=head_only)
    fresh = torch.optim.AdamW(micro.parameters())
    with pytest.raises(ConfigError, match="after the first `optimizer.step"):
        GroupInfluence(micro, k=8, preconditioner="adam", optimizer=fresh).compute(domains, targets)
    adamax = torch.optim.Adamax(micro.parameters())
    _step(micro, adamax)
    with pytest.raises(ConfigError, match="no `exp_avg_sq` for tracked layer 'blocks.0.attn.qkv'"):
        GroupInfluence(micro, k=8, preconditioner="adam", optimizer=adamax).compute(domains, targets)
    optimizer = _adamw(micro, steps=1)
    gi = GroupInfluence(micro, k=8, preconditioner="adam", optimizer=optimizer)
    weight = micro.blocks[1].mlp.fc.weight
    optimizer.state[weight]["exp_avg_sq"] = optimizer.state[weight]["exp_avg_sq"].reshape(-1)
    with pytest.raises(ConfigError, match="'blocks.1.mlp.fc' has shape"):
        gi.compute(domains, targets)
    # Other preconditioners take an optimizer and ignore it.
    GroupInfluence(micro, k=8, preconditioner="kfac", optimizer=torch.optim.SGD(micro.parameters(), lr=0.1))


def _step(model, optimizer) -> None:
    batch = batches("alpha", 1, seed=5)[0]
    (per_token_loss(model, batch).sum() / loss_mask(batch).sum()).backward()
    optimizer.step()
    optimizer.zero_grad()
