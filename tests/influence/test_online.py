"""Online mode: statistics from the training backward agree with observation mode, decay, scale and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from influence_cases import batches, mixed, with_masks

from tikmix_loader.errors import ConfigError, DomainError, StateError
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.models import per_token_loss

DOMAINS = ("alpha", "digits", "random")


def _per_domain(n: int = 2) -> list[list[dict]]:
    groups = [batches(kind, n, seed=20 + d, domain=d) for d, kind in enumerate(DOMAINS)]
    groups[0] = [with_masks(b) for b in groups[0]]
    return groups


def _targets() -> dict:
    return {"alpha_val": batches("alpha", 1, seed=31), "digits_val": batches("digits", 1, seed=32)}


def _train_step(model, gi, batch, *, loss_scale=None, scale_loss=1.0):
    """One ordinary training backward (mean over the batch's loss tokens), observed by ``gi``."""
    with gi.observe(batch, loss_scale=loss_scale):
        loss = per_token_loss(model, batch)
        loss = loss.sum() / (batch["labels"] != -100).sum() * scale_loss
        loss.backward()


@pytest.mark.parametrize("preconditioner", ["identity", "kfac"])
def test_online_equals_observation_mode_on_a_frozen_model(micro, preconditioner):
    groups = _per_domain()
    online = GroupInfluence(micro, k=16, preconditioner=preconditioner, domains=DOMAINS)
    for i in range(2):
        _train_step(micro, online, mixed(groups, i))
    S_online = online.influence(_targets())
    offline = GroupInfluence(micro, k=16, preconditioner=preconditioner)
    S_offline = offline.compute(dict(zip(DOMAINS, groups, strict=True)), _targets())
    np.testing.assert_allclose(
        S_online.values, S_offline.values, rtol=1e-5, atol=1e-9 * np.abs(S_offline.values).max()
    )
    np.testing.assert_array_equal(S_online.domain_tokens, S_offline.domain_tokens)
    assert S_online.processed_tokens == sum(b["input_ids"].numel() for g in _targets().values() for b in g)


def test_online_ekfac_second_decision_equals_observation_ekfac(micro):
    """The first decision fixes the eigenbasis; the correction measured in it on the same data matches."""
    groups = _per_domain()
    online = GroupInfluence(micro, k=16, preconditioner="ekfac", domains=DOMAINS)
    for i in range(2):
        _train_step(micro, online, mixed(groups, i))
    first = online.influence(_targets())
    for i in range(2):
        _train_step(micro, online, mixed(groups, i))
    second = online.influence(_targets())
    offline = GroupInfluence(micro, k=16, preconditioner="ekfac").compute(
        dict(zip(DOMAINS, groups, strict=True)), _targets()
    )
    np.testing.assert_allclose(second.values, offline.values, rtol=1e-4)
    assert np.isfinite(first.values).all() and not np.allclose(first.values, second.values, rtol=1e-3)


def test_loss_scale_recovers_the_summed_loss_gradient(micro):
    groups = _per_domain(1)
    batch = mixed(groups, 0)
    count = int((batch["labels"] != -100).sum())
    results = []
    for loss_scale, scale_loss in ((None, 1.0), (1.0, float(count)), (1.0 / (4 * count), 0.25)):
        gi = GroupInfluence(micro, k=8, preconditioner="kfac", domains=DOMAINS)
        _train_step(micro, gi, batch, loss_scale=loss_scale, scale_loss=scale_loss)
        results.append(gi.influence(_targets()).values)
        micro.zero_grad(set_to_none=True)
    # atol: float32 rounding of the differently scaled losses, amplified by K-FAC's inverse on small entries.
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-5, atol=1e-6)


def test_half_life_weights_older_steps_down(micro):
    first, second = batches("alpha", 1, seed=41)[0], batches("alpha", 1, seed=42, batch_size=2)[0]
    targets = _targets()

    def single(batch):
        gi = GroupInfluence(micro, k=None, preconditioner="identity", domains=["alpha"])
        _train_step(micro, gi, batch)
        return gi.influence(targets).values[:, 0]

    gi = GroupInfluence(micro, k=None, preconditioner="identity", domains=["alpha"], half_life=1)
    _train_step(micro, gi, first)
    _train_step(micro, gi, second)
    ema = gi.influence(targets)
    n1, n2 = first["labels"].numel(), second["labels"].numel()
    expected = (0.5 * n1 * single(first) + n2 * single(second)) / (0.5 * n1 + n2)
    np.testing.assert_allclose(ema.values[:, 0], expected, rtol=1e-5)
    assert ema.domain_tokens.tolist() == [0.5 * n1 + n2]


def test_observing_and_deciding_leave_training_gradients_alone(micro):
    batch = mixed(_per_domain(1), 0)
    loss = per_token_loss(micro, batch).sum() / (batch["labels"] != -100).sum()
    loss.backward()
    plain = {name: p.grad.clone() for name, p in micro.named_parameters()}
    micro.zero_grad(set_to_none=True)
    gi = GroupInfluence(micro, k=8, preconditioner="ekfac", domains=DOMAINS)
    _train_step(micro, gi, batch)
    gi.influence(_targets())  # the decision-time target passes leave the training gradients alone too
    for name, param in micro.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=0, atol=0)


def test_state_dict_resume_matches_uninterrupted_run(micro, tmp_path):
    groups = _per_domain(3)
    kwargs = dict(k=8, preconditioner="ekfac", domains=DOMAINS, half_life=2)
    straight = GroupInfluence(micro, **kwargs)
    resumed = GroupInfluence(micro, **kwargs)
    for i in range(2):
        _train_step(micro, straight, mixed(groups, i))
        _train_step(micro, resumed, mixed(groups, i))
    straight.influence(_targets())
    resumed.influence(_targets())
    torch.save(resumed.state_dict(), tmp_path / "gi.pt")
    restored = GroupInfluence(micro, **kwargs)
    restored.load_state_dict(torch.load(tmp_path / "gi.pt"))
    assert restored.steps == 2
    _train_step(micro, straight, mixed(groups, 2))
    _train_step(micro, restored, mixed(groups, 2))
    np.testing.assert_array_equal(
        restored.influence(_targets()).values, straight.influence(_targets()).values
    )


def test_load_state_dict_rejects_other_settings(micro):
    gi = GroupInfluence(micro, k=8, domains=DOMAINS)
    _train_step(micro, gi, mixed(_per_domain(1), 0))
    state = gi.state_dict()
    with pytest.raises(StateError, match=r"k: saved 8 != current 16"):
        GroupInfluence(micro, k=16, domains=DOMAINS).load_state_dict(state)
    with pytest.raises(StateError, match=r"saved `domains`"):
        GroupInfluence(micro, k=8, domains=("alpha", "digits")).load_state_dict(state)
    with pytest.raises(StateError, match=r"version"):
        GroupInfluence(micro, k=8, domains=DOMAINS).load_state_dict({**state, "version": 99})


def test_online_errors_name_the_fix(micro):
    batch = mixed(_per_domain(1), 0)
    with pytest.raises(ConfigError, match=r"domains=loader.domain_names"):
        with GroupInfluence(micro, k=8).observe(batch):
            pass
    gi = GroupInfluence(micro, k=8, domains=DOMAINS[:2])
    with pytest.raises(DomainError, match=r"span \[0, 2\] but there are 2 domains"):
        with gi.observe(batch):
            pass
    gi = GroupInfluence(micro, k=8, domains=DOMAINS)
    with pytest.raises(ConfigError, match=r"needs `labels` \[B, T\] and `domain` \[B\]"):
        with gi.observe({"input_ids": batch["input_ids"]}):
            pass
    with pytest.raises(ConfigError, match=r"`loss_scale` must be a positive float"):
        with gi.observe(batch, loss_scale=0.0):
            pass
    with pytest.raises(StateError, match=r"no backward reached a tracked layer"):
        with gi.observe(batch):
            per_token_loss(micro, batch)
    with gi.observe(batch):
        per_token_loss(micro, batch).mean().backward()
        late = per_token_loss(micro, batch).mean()
    with pytest.raises(StateError, match=r"after its observe\(\) block ended"):
        late.backward()
    with pytest.raises(StateError, match=r"no `observe` step yet"):
        GroupInfluence(micro, k=8, domains=DOMAINS).influence(_targets())


def test_unobserved_domains_get_zero_influence_and_zero_tokens(micro):
    gi = GroupInfluence(micro, k=8, preconditioner="kfac", domains=DOMAINS)
    _train_step(micro, gi, batches("digits", 1, seed=51, domain=1)[0])
    S = gi.influence(_targets())
    assert S.domain_tokens.tolist() == [0.0, 4 * 32, 0.0]
    assert np.all(S.values[:, [0, 2]] == 0) and np.all(S.values[:, 1] != 0)
    assert gi.steps == 1
    gi.reset()
    assert gi.steps == 0 and gi.state_dict()["statistics"] is None
