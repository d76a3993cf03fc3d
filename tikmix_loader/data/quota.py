"""Per-batch domain quotas by largest remainder, carrying the rounding error from batch to batch."""

from __future__ import annotations

import numpy as np


def allocate_quota(weights: np.ndarray, carry: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``total`` samples among domains in proportion to ``weights``, carrying rounding error.

    ``carry[d]`` is what domain ``d`` is still owed (target minus samples served; positive when
    under-served). A domain with weight 0 gets nothing, and its carry is released: it is shared among the
    weighted domains in proportion to their weights and the domain's own carry becomes 0. Each weighted
    domain is then owed ``x_d = w_d * (total + released) + carry_d``; it gets ``floor(x_d)`` (never below 0),
    and the samples left over go one each to the domains with the largest fractional parts, ties to the
    lower index (Hamilton's largest-remainder method). The new carry is ``x_d - quota_d``.

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
    weights = np.asarray(weights, dtype=np.float64)
    active = weights > 0
    released = float(np.sum(carry, where=~active))
    owed = np.where(active, weights * (total + released) + carry, 0.0)
    quota = np.where(active, np.maximum(np.floor(owed), 0.0), 0.0).astype(np.int64)
    leftover = total - int(quota.sum())
    # Stable order: largest fractional part first, then lower domain index.
    fractions = np.where(active, owed - quota, -np.inf)
    order = np.lexsort((np.arange(len(weights)), -fractions))
    order = order[active[order]]
    if leftover > 0:
        for step in range(leftover):
            quota[order[step % len(order)]] += 1
    elif leftover < 0:
        for domain in order[::-1]:
            if leftover == 0:
                break
            take = min(int(quota[domain]), -leftover)
            quota[domain] -= take
            leftover += take
    new_carry = np.where(active, owed - quota, 0.0)
    return quota, new_carry
