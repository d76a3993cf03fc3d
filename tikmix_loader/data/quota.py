"""Per-batch domain quotas by largest remainder, carrying the rounding error from batch to batch."""

from __future__ import annotations

import math

import numpy as np


def allocate_quota(weights: np.ndarray, carry: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``total`` samples among domains in proportion to ``weights``, carrying rounding error.

    ``carry[d]`` is what domain ``d`` is still owed (target minus samples served; positive when
    under-served). A domain with weight 0 gets nothing, and its carry is released: it is shared among the
    weighted domains in proportion to their weights and the domain's own carry becomes 0. Each weighted
    domain is then owed ``x_d = w_d * (total + released) + carry_d``; it gets ``floor(x_d)`` (never below 0),
    and the samples left over go one each to the domains with the largest fractional parts, ties to the
    lower index (Hamilton's largest-remainder method). The new carry is ``x_d - quota_d``.

    The same release applies to a weighted domain served ahead of its target (owed a negative amount) when
    the other domains' whole samples owed exceed ``total``: it gets nothing this batch and its surplus is
    shared among the others, so no claim is left unmet by a full sample. Otherwise the stream is untouched.

    Releasing keeps the weighted domains' carries summing to zero, so each stays in (-1, 1) whatever weights
    are zero and for how long: every domain's cumulative count stays within one sample of its target, where
    the target is ``sum_t w_d(t) * total`` plus its share of the fractions released by domains whose weight
    went to 0. (Without the release, a zero-weight domain's frozen carry pushed the others' below -1: the
    counts of all domains add up to the same total as the targets, so one domain's frozen surplus must be
    another's deficit.)

    Args:
        weights (np.ndarray): Non-negative float weights summing to 1, shape ``[num_domains]``.
        carry (np.ndarray): Rounding error carried from the previous batch, shape ``[num_domains]``.
        total (int): Samples in the global batch.

    Returns:
        ``(quota, new_carry)``: int64 counts summing to ``total``, and the float64 carry for the next batch.
    """
    # Python floats and ints, not numpy: a loader plans every global batch on every rank, and numpy calls on
    # arrays of a few domains cost more than the arithmetic. Elementwise IEEE arithmetic gives the same
    # numbers either way; the one float sum whose rounding depends on its order (``released``) is numpy's.
    weights = np.asarray(weights, dtype=np.float64)
    active = (weights > 0).tolist()
    released = 0.0 if all(active) else float(np.sum(carry, where=~np.asarray(active)))
    owed = [
        weight * (total + released) + owed_before if is_active else 0.0
        for weight, owed_before, is_active in zip(weights.tolist(), np.asarray(carry).tolist(), active)
    ]
    if sum(math.floor(value) for value in owed if value > 0) > total:
        active, owed = (
            values.tolist() for values in _release_surplus(weights, np.asarray(active), np.asarray(owed))
        )
    quota = [max(math.floor(value), 0) if is_active else 0 for value, is_active in zip(owed, active)]
    leftover = total - sum(quota)
    # Largest fractional part first, then lower domain index; only weighted domains take or give samples.
    order = sorted(
        (domain for domain, is_active in enumerate(active) if is_active),
        key=lambda domain: (quota[domain] - owed[domain], domain),
    )
    if leftover > 0:
        for step in range(leftover):
            quota[order[step % len(order)]] += 1
    elif leftover < 0:
        for domain in reversed(order):
            if leftover == 0:
                break
            take = min(quota[domain], -leftover)
            quota[domain] -= take
            leftover += take
    new_carry = [value - count if is_active else 0.0 for value, count, is_active in zip(owed, quota, active)]
    return np.array(quota, dtype=np.int64), np.array(new_carry, dtype=np.float64)


def _release_surplus(
    weights: np.ndarray, active: np.ndarray, owed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Forgive over-served domains their surplus when the others are owed more than the batch holds.

    A domain owed a negative amount (served ahead of its target, typically after its weight fell) cannot
    give samples back, so the others' claims add up to more than ``total`` and plain rounding would leave
    one of them owed a full sample or more. Each such domain's surplus is released like a zero-weight
    domain's carry (shared among the rest in proportion to their weights; its own carry becomes 0), until
    no domain is owed a negative amount. The claims then sum to ``total`` again, so largest-remainder
    rounding keeps every carry in (-1, 1).
    """
    active = active.copy()
    owed = owed.copy()
    while True:
        surplus = active & (owed < 0)
        if not surplus.any():
            return active, owed
        released = float(owed[surplus].sum())
        active &= ~surplus
        owed[surplus] = 0.0
        owed[active] += weights[active] / weights[active].sum() * released
