"""Quota fuzz: the largest gap between a domain's served samples and its target over random weight histories.

Each history draws a domain count (2-8), a global batch size (1-256) and 200 batches of weights that change
at random steps, with each weight 0 at a rate of 30% (at least one stays positive). ``MixturePlanner`` plans
every batch; we add up the quotas it serves and compare them with two targets:

- ``target`` (what the README promises): ``sum_t w_d(t) * global_batch``, except that when a domain's
  weight drops to 0 the fraction of a sample it is still owed (or owes) is written off and shared among the
  weighted domains by weight (``reference_targets``). The promise is ``|served - target| < 1``.
- ``naive``: ``sum_t w_d(t) * global_batch`` with no write-off. No allocation can keep this within one
  sample once several domains leave with same-signed fractions (served and target counts both sum to the
  batches' total, so their surplus is another domain's deficit); it is reported to show why the promise
  is stated with the write-off.

Run: ``python benchmarks/fuzz_quota.py`` (3,000 histories x 200 batches; about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def reference_targets(targets: np.ndarray, served: np.ndarray, weights: np.ndarray, total: int) -> np.ndarray:
    """The targets after one more batch of ``total`` samples under ``weights``, by the documented rule.

    Independent of the planner's carry: each domain's target grows by ``w_d * total``, and a domain with
    weight 0 gives up what it is still owed (target minus ``served``, the counts before this batch), which
    the weighted domains share in proportion to their weights. When the whole samples the domains are then
    owed exceed ``total``, every domain served ahead of its target gives up that surplus the same way.

    Args:
        targets (np.ndarray): Targets before the batch, float ``[num_domains]``.
        served (np.ndarray): Samples served before the batch, ``[num_domains]``.
        weights (np.ndarray): The batch's normalised weights, ``[num_domains]``.
        total (int): Samples in the global batch.
    """
    idle = weights == 0
    released = float(np.sum(targets[idle] - served[idle]))
    targets = np.where(idle, served, targets + weights * (total + released))
    owed = targets - served
    if np.floor(owed[owed > 0]).sum() > total:
        # Whole samples owed exceed the batch: domains served ahead of their targets give up the surplus,
        # shared by the rest in proportion to their weights, until none is ahead.
        active = ~idle
        while (ahead := active & (targets < served)).any():
            surplus = float(np.sum(targets[ahead] - served[ahead]))
            targets[ahead] = served[ahead]
            active &= ~ahead
            targets[active] += weights[active] / weights[active].sum() * surplus
    return targets


def random_history(rng: np.random.Generator, num_domains: int, batches: int) -> list[np.ndarray]:
    """Per-batch weights: redrawn with probability 0.1 per batch, each weight 0 with probability 0.3."""
    history, weights = [], None
    for _ in range(batches):
        if weights is None or rng.random() < 0.1:
            raw = rng.dirichlet(np.ones(num_domains)) * (rng.random(num_domains) > 0.3)
            if raw.sum() == 0:
                raw[rng.integers(num_domains)] = 1.0
            weights = raw / raw.sum()
        history.append(weights)
    return history


def fuzz(histories: int, batches: int, seed: int = 0) -> dict:
    """Largest ``|served - target|`` and ``|served - naive|`` over ``histories`` random histories."""
    from tikmix_loader.data.planner import MixturePlanner

    rng = np.random.default_rng(seed)
    worst, worst_naive = 0.0, 0.0
    for _ in range(histories):
        num_domains, total = int(rng.integers(2, 9)), int(rng.integers(1, 257))
        history = random_history(rng, num_domains, batches)
        planner = MixturePlanner(
            names=[f"d{i}" for i in range(num_domains)],
            samples_per_epoch=np.full(num_domains, 1000),
            global_batch_size=total,
            weights=history[0],
            seed=0,
            exhaustion="repeat",
            max_epochs=np.full(num_domains, np.inf),
        )
        served, targets, naive = np.zeros(num_domains), np.zeros(num_domains), np.zeros(num_domains)
        for weights in history:
            planner.set_weights(weights)
            quota = planner.plan().quota
            targets = reference_targets(targets, served, weights, total)
            naive += weights * total
            served += quota
            worst = max(worst, float(np.abs(served - targets).max()))
            worst_naive = max(worst_naive, float(np.abs(served - naive).max()))
    return {"max_error": worst, "max_naive_error": worst_naive}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = fuzz(args.histories, args.batches, args.seed)
    elapsed = time.perf_counter() - start
    print(f"{args.histories} histories x {args.batches} batches (seed {args.seed}, {elapsed:.0f} s)")
    print(f"max |served - target| = {result['max_error']:.6f} samples (promise: < 1)")
    print(
        f"max |served - naive sum_t w_d(t) x batch| = {result['max_naive_error']:.6f} samples (not promised)"
    )


if __name__ == "__main__":
    main()
