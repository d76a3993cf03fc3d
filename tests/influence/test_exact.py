"""Exact influence: with k=None the engine matches brute-force autograd for every preconditioner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from influence_cases import batches, with_masks

from tikmix_loader.influence import GroupInfluence
from tikmix_loader.influence.reference import exact_influence


def _groups():
    domains = {
        "alpha": [with_masks(b) for b in batches("alpha", 2, seed=1)],
        "digits": batches("digits", 1, seed=2),
        "random": batches("random", 2, seed=3, batch_size=3),
    }
    targets = {
        "alpha_val": batches("alpha", 1, seed=11),
        "digits_val": [with_masks(batches("digits", 1, seed=12)[0])],
    }
    return domains, targets


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    scale = np.abs(expected).max()
    worst = np.abs(actual - expected).max()
    assert worst <= rtol * scale, (
        f"max |diff| {worst:.3e} > {rtol} * max |S| {scale:.3e}\n{actual}\n{expected}"
    )


@pytest.mark.parametrize("preconditioner", ["identity", "kfac", "ekfac"])
def test_unprojected_influence_equals_brute_force(micro, preconditioner):
    domains, targets = _groups()
    gi = GroupInfluence(micro, k=None, preconditioner=preconditioner, damping=0.1)
    S = gi.compute(domains, targets)
    expected = exact_influence(
        micro, domains, targets, layers=gi.layer_names, preconditioner=preconditioner, damping=0.1
    )
    assert S.values.shape == (2, 3) and S.values.dtype == np.float64
    assert S.targets == ("alpha_val", "digits_val") and S.domains == ("alpha", "digits", "random")
    _assert_close(S.values, expected, rtol=2e-4 if preconditioner == "identity" else 2e-3)
    if preconditioner != "identity":  # it really differs from identity, so the comparison tests its formula
        plain = exact_influence(micro, domains, targets, layers=gi.layer_names)
        assert not np.allclose(expected, plain, rtol=0.05)


def test_token_counts_follow_the_loss_mask(micro):
    domains, targets = _groups()
    S = GroupInfluence(micro, k=None, preconditioner="identity").compute(domains, targets)
    counted = lambda group: sum(int((b["labels"] != -100).sum()) for b in group)
    assert S.domain_tokens.tolist() == [counted(domains[name]) for name in S.domains]
    assert S.target_tokens.tolist() == [counted(targets[name]) for name in S.targets]
    assert S.processed_tokens == sum(
        b["input_ids"].numel() for g in (*domains.values(), *targets.values()) for b in g
    )


def test_layer_subset_matches_brute_force_over_that_subset(micro):
    domains, targets = _groups()
    gi = GroupInfluence(
        micro, k=None, preconditioner="kfac", layers=["blocks.1.*", "lm_head"], exclude=["*.attn.proj"]
    )
    assert gi.layer_names == ["blocks.1.attn.qkv", "blocks.1.mlp.fc", "blocks.1.mlp.proj", "lm_head"]
    S = gi.compute(domains, targets)
    expected = exact_influence(micro, domains, targets, layers=gi.layer_names, preconditioner="kfac")
    _assert_close(S.values, expected, rtol=2e-3)


def test_compute_leaves_grads_optimizer_and_modes_untouched(micro):
    domains, targets = _groups()
    optimizer = torch.optim.Adam(micro.parameters(), lr=1e-3)
    micro.blocks[0].mlp.fc.weight.grad = torch.ones_like(micro.blocks[0].mlp.fc.weight)
    micro.blocks[1].attn.qkv.weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in micro.named_parameters()}
    micro.train()
    GroupInfluence(micro, k=8, preconditioner="ekfac").compute(domains, targets)
    for name, param in micro.named_parameters():
        assert torch.equal(param, before[name]), name
        if name == "blocks.0.mlp.fc.weight":
            assert torch.equal(param.grad, torch.ones_like(param))
        else:
            assert param.grad is None, name
    assert optimizer.state_dict()["state"] == {}
    assert micro.training and not micro.blocks[1].attn.qkv.weight.requires_grad


def test_frozen_model_still_gets_influence(micro):
    domains, targets = _groups()
    reference = GroupInfluence(micro, k=None, preconditioner="identity").compute(domains, targets).values
    for param in micro.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        frozen = GroupInfluence(micro, k=None, preconditioner="identity").compute(domains, targets).values
    np.testing.assert_allclose(frozen, reference, rtol=1e-6)
    assert not any(p.requires_grad for p in micro.parameters())
