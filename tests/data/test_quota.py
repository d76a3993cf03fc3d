"""Property tests of the largest-remainder quota with carried error."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tikmix_loader.data.quota import allocate_quota

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
def test_zero_weight_domains_get_nothing(raw, zero, total):
    weights = np.asarray(raw)
    if len(weights) > 1:
        dead = zero.draw(st.sets(st.integers(0, len(weights) - 1), max_size=len(weights) - 1))
        weights[list(dead)] = 0
    weights = weights / weights.sum()
    carry = np.random.default_rng(0).uniform(-0.9, 0.9, size=len(weights))
    quota, new_carry = allocate_quota(weights, carry, total)
    assert quota.sum() == total
    assert np.all(quota[weights == 0] == 0)
    assert np.array_equal(new_carry[weights == 0], carry[weights == 0])


def test_ties_go_to_the_lower_index_deterministically():
    quota, _ = allocate_quota(np.full(3, 1 / 3), np.zeros(3), 4)
    assert quota.tolist() == [2, 1, 1]
