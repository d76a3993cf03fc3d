"""ODM: the EXP3 update on per-domain training loss."""

import numpy as np
import pytest
from testkit.resume import assert_resumes_exactly

from tikmix_loader.errors import ConfigError
from tikmix_loader.mixing import MixingContext, ODMMixer
from tikmix_loader.mixing.odm import exploration_rate

DOMAINS = ("code", "web", "math")


EVERY = 10  # training steps between decisions


def context(w_prior, losses, step=EVERY - 1):
    return MixingContext(domains=DOMAINS, w_prior=w_prior, domain_losses=losses, step=step)


def run(mixer, losses_per_step, w_prior=(1 / 3, 1 / 3, 1 / 3)):
    out = []
    for losses in losses_per_step:
        step = (mixer.update + 1) * EVERY - 1
        out.append(mixer.propose(context(w_prior, losses, step)).weights)
        w_prior = out[-1]
    return out


def test_weight_moves_to_the_high_loss_domain():
    weights = run(ODMMixer(), [[1.0, 1.0, 4.0]] * 30)
    assert weights[-1][2] == max(weights[-1]) and weights[-1][2] > 0.36
    assert weights[-1][2] > weights[0][2]
    assert np.all(np.array(weights) >= exploration_rate(3, 30 * EVERY) - 1e-12)  # exploration floor
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0)


def test_first_update_before_any_loss_is_uniform():
    np.testing.assert_allclose(ODMMixer().propose(context([0.6, 0.2, 0.2], None)).weights, 1 / 3)


def test_unobserved_domains_keep_their_estimate():
    mixer = ODMMixer()
    run(mixer, [[1.0, 2.0, 3.0]] * 3)
    rewards = mixer.rewards.copy()
    run(mixer, [[np.nan, np.nan, 3.0]], w_prior=mixer.policy)
    assert mixer.rewards[:2].tolist() == rewards[:2].tolist() and mixer.rewards[2] != rewards[2]


def test_state_round_trip_resumes_exactly():
    rng = np.random.default_rng(0)
    steps = [rng.uniform(1, 4, 3).tolist() for _ in range(8)]
    assert set(ODMMixer().state_dict()) == {
        "mixer",
        "config",
        "domains",
        "update",
        "batches",
        "rewards",
        "policy",
    }
    assert_resumes_exactly(
        lambda: ODMMixer(smoothing=0.8),
        lambda mixer, i: mixer.propose(context((1 / 3, 1 / 3, 1 / 3), steps[i], EVERY * i)).weights.tolist(),
        total=len(steps),
        midpoints=[0, 1, 4],
    )


def test_changed_domains_and_bad_options_raise():
    mixer = ODMMixer()
    mixer.propose(context([1, 1, 1], [1.0, 1.0, 1.0]))
    with pytest.raises(ConfigError, match="was started on domains"):
        mixer.propose(MixingContext(domains=("a", "b"), w_prior=[1, 1]))
    with pytest.raises(ConfigError, match="`smoothing` must be in"):
        ODMMixer(smoothing=1.0)


def test_exploration_rate_schedule():
    assert exploration_rate(4, 0) == 0.25
    assert exploration_rate(4, 100) == pytest.approx(np.sqrt(np.log(4) / 400))


def test_exploration_follows_training_batches_not_decisions():
    # Two decisions 100 steps apart: eps is already below 1/K, so the policy leaves uniform at once.
    mixer = ODMMixer()
    mixer.propose(context([1 / 3] * 3, None, step=99))
    weights = mixer.propose(context(mixer.policy, [1.0, 1.0, 4.0], step=199)).weights
    assert mixer.batches == 200 and weights[2] > 1 / 3 + 0.01
    # Counting decisions instead (t = 2) would give eps = 1/K and exactly uniform weights.
    assert exploration_rate(3, 2) == pytest.approx(1 / 3)
