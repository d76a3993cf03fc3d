"""Property tests of the largest-remainder quota with carried error."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tikmix_loader._bench_commands import _repo_benchmark
from tikmix_loader.data.quota import allocate_quota

reference_targets = _repo_benchmark("fuzz_quota").reference_targets  # the fuzz's rule, so the two agree

weight_vectors = st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=1, max_size=12)


def _normalise(values):
    values = np.asarray(values, dtype=np.float64)
    return values / values.sum()


@settings(max_examples=200, deadline=None)
@given(
    history=st.lists(st.tuples(weight_vectors, st.integers(1, 40)), min_size=1, max_size=30),
    total=st.integers(1, 97),
)
def test_cumulative_counts_stay_within_one_sample_of_the_weights(history, total):
    num_domains = len(history[0][0])
    carry = np.zeros(num_domains)
    realized = np.zeros(num_domains)
    implied = np.zeros(num_domains)
    for raw, batches in history:
        weights = _normalise((list(raw) * num_domains)[:num_domains])
        for _ in range(batches):
            quota, carry = allocate_quota(weights, carry, total)
            assert quota.sum() == total and (quota >= 0).all()
            realized += quota
            implied += weights * total
            assert np.all(np.abs(realized - implied) < 1 + 1e-9)
            assert abs(carry.sum()) < 1e-6


@settings(max_examples=100, deadline=None)
@given(raw=weight_vectors, zero=st.data(), total=st.integers(1, 64))
def test_zero_weight_domains_get_nothing_and_release_their_carry(raw, zero, total):
    weights = np.asarray(raw)
    if len(weights) > 1:
        dead = zero.draw(st.sets(st.integers(0, len(weights) - 1), max_size=len(weights) - 1))
        weights[list(dead)] = 0
    weights = weights / weights.sum()
    carry = np.random.default_rng(0).uniform(-0.9, 0.9, size=len(weights))
    carry -= carry.mean()
    quota, new_carry = allocate_quota(weights, carry, total)
    assert quota.sum() == total
    assert np.all(quota[weights == 0] == 0)
    assert np.all(new_carry[weights == 0] == 0)
    assert new_carry.sum() == pytest.approx(carry.sum(), abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.lists(st.sampled_from([0.0, 0.0, 1e-3, 0.2, 0.5, 1.0]), min_size=2, max_size=8),
            st.integers(1, 12),
        ),
        min_size=1,
        max_size=25,
    ),
    total=st.integers(1, 40),
)
def test_counts_stay_within_one_sample_of_their_targets_whatever_weights_are_zero(history, total):
    # Before the carry of zero-weight domains was released this failed (error up to ~1.5 samples).
    num_domains = len(history[0][0])
    carry, realized, targets = np.zeros(num_domains), np.zeros(num_domains), np.zeros(num_domains)
    for raw, batches in history:
        weights = np.asarray((list(raw) * num_domains)[:num_domains])
        if weights.sum() == 0:
            continue
        weights = weights / weights.sum()
        for _ in range(batches):
            quota, carry = allocate_quota(weights, carry, total)
            assert np.all(quota[weights == 0] == 0)
            realized += quota
            targets = reference_targets(targets, realized - quota, weights, total)
            assert np.all(np.abs(realized - targets) < 1 + 1e-9), (realized, targets)
            assert np.allclose(targets - realized, carry)


def test_ties_go_to_the_lower_index_deterministically():
    quota, _ = allocate_quota(np.full(3, 1 / 3), np.zeros(3), 4)
    assert quota.tolist() == [2, 1, 1]


def test_over_served_domains_release_their_surplus_when_claims_exceed_the_batch():
    # Found by the property test above: 8 domains, 1 sample per batch; domains 0, 2, 4, 6 share the first
    # 2 batches, then get weight ~0.001 while 1, 3, 5, 7 get ~0.25. Two of the first four were served ahead
    # of their targets, and before the release one of the others ended owed 1.24 samples.
    history = [([0.001, 0.0] * 4, 2), ([0.001, 0.2] * 4, 5)]
    carry, realized, targets = np.zeros(8), np.zeros(8), np.zeros(8)
    errors = []
    for raw, batches in history:
        weights = _normalise(raw)
        for _ in range(batches):
            quota, carry = allocate_quota(weights, carry, 1)
            realized += quota
            targets = reference_targets(targets, realized - quota, weights, 1)
            errors.append(np.abs(realized - targets).max())
            assert np.allclose(targets - realized, carry)
    assert max(errors) < 1


def test_quotas_and_carries_are_bit_identical_to_the_numpy_implementation():
    # allocate_quota moved from numpy arrays to Python floats (fewer calls per planned batch); the stream
    # depends on every quota, so a digest of a long history (1-13 domains, zero and tiny weights that change
    # every other batch, batches of 1-3 samples half the time; it takes the surplus release twice), recorded
    # with the numpy implementation (commit 788a520), must not change.
    rng = np.random.default_rng(12)
    digest = hashlib.sha256()
    for _ in range(300):
        num_domains, total = int(rng.integers(1, 14)), int(rng.integers(1, 300))
        if rng.random() < 0.5:
            total = int(rng.integers(1, 4))
        carry = np.zeros(num_domains)
        for step in range(40):
            if step % 2 == 0:
                weights = np.where(rng.random(num_domains) < 0.5, 1e-3, rng.random(num_domains))
                weights[rng.random(num_domains) < 0.2] = 0.0
                weights[int(rng.integers(num_domains))] += 1e-3  # at least one weighted domain
                weights = weights / weights.sum()
            quota, carry = allocate_quota(weights, carry, total)
            assert quota.dtype == np.int64 and carry.dtype == np.float64
            digest.update(quota.tobytes())
            digest.update(carry.tobytes())
    assert digest.hexdigest() == "09e43d6b887500a710245199cd170b8ae45aaf2220fdba75da7f12192ae80e20"
