"""Benchmark: how far online (EMA) Group Influence is from a fresh measurement at the same checkpoint.

Online TiKMiX-D decides from an exponential moving average of projected training gradients, taken at earlier
parameters. This trains online TiKMiX-D exactly as ``tikmix experiment --methods tikmix-d`` does and, at
every decision, also measures ``S`` twice from fresh observation passes at the current parameters
(``--samples`` per domain, independent draws, the same targets and projections). It compares:

* ``online vs fresh``: the online matrix against the first fresh one (the quantity under study);
* ``fresh vs fresh``: the two fresh matrices against each other (the named baseline: sampling noise alone).

Per decision: Pearson correlation of the matrix entries (the solver is scale-free per row, so scale does not
matter), how often the diagonal (a domain on its own target) is negative, and the L1 distance between the
TiKMiX-D mixtures solved from each matrix (same prior, same options). Training follows the online
decisions, so the run is the online method's own trajectory. If online-vs-fresh disagrees much more than
fresh-vs-fresh, the online estimate is biased (stale gradients or preconditioner), not just noisy.

Takes the experiment's flags (``--seeds``, ``--steps``, ``--half-life``, ``--k``...); the default is its
tuning scale, 500 steps x 16 on seeds 0 1 2. Usage::

    .venv/bin/python benchmarks/bench_influence_drift.py --corpus corpus [--samples 64] [--threads 1] \
        [--json out/drift.json] [--half-life 200 --every 100 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform

import numpy as np
import torch

from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.experiment import (
    ExperimentConfig,
    add_config_arguments,
    apply_threads,
    config_from_args,
    load_splits,
    train_method,
)
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.mixing import MixingContext, MixtureSolution


class DriftProbe:
    """A TiKMiX-D mixer that, at each decision, also measures fresh influence and records the comparison;
    it returns the online decision, so training is unchanged."""

    def __init__(
        self,
        mixer,
        fresh: GroupInfluence,
        online: GroupInfluence,
        loader: MixtureLoader,
        targets: dict,
        *,
        samples: int,
        batch_size: int,
    ):
        self.name = mixer.name  # what the ledger records
        self.mixer, self.fresh, self.online, self.loader, self.targets = mixer, fresh, online, loader, targets
        self.samples, self.batch_size = samples, batch_size
        self.records: list[dict] = []

    def _measure(self, draw: int):
        if self.online.optimizer is not None:  # bound before the first step; "adam" reads its state
            self.fresh.bind_optimizer(self.online.optimizer)
        batches = {
            name: self.loader.sample_batches(
                name, self.samples, batch_size=self.batch_size, seed=10_000 * draw + self.loader.batches_seen
            )
            for name in self.loader.domain_names
        }
        return self.fresh.compute(domains=batches, targets=self.targets)

    def propose(self, context: MixingContext) -> MixtureSolution:
        online = self.mixer.propose(context)
        fresh = [dataclasses.replace(context, influence=self._measure(draw)) for draw in (1, 2)]
        solved = [self.mixer.propose(fresh_context).weights for fresh_context in fresh]
        # The context holds S as [targets, domains] in domain order; target b is domain b's val split.
        matrices = [np.asarray(c.influence) for c in (context, *fresh)]
        self.records.append(
            {
                "step": context.step,
                "corr_online_fresh": _corr(matrices[0], matrices[1]),
                "corr_fresh_fresh": _corr(matrices[1], matrices[2]),
                "l1_online_fresh": float(np.abs(online.weights - solved[0]).sum()),
                "l1_fresh_fresh": float(np.abs(solved[0] - solved[1]).sum()),
                "negative_diagonal_online": int((np.diag(matrices[0]) < 0).sum()),
                "negative_diagonal_fresh": int((np.diag(matrices[1]) < 0).sum()),
                "diagonal_share_online": _diagonal_share(matrices[0]),
                "diagonal_share_fresh": _diagonal_share(matrices[1]),
                "l1_online_prior": float(np.abs(online.weights - context.w_prior).sum()),
                "l1_fresh_prior": float(np.abs(solved[0] - context.w_prior).sum()),
                "weights_prior": context.w_prior.tolist(),
                "weights_online": online.weights.tolist(),
                "weights_fresh": [weights.tolist() for weights in solved],
                "influence_online": matrices[0].tolist(),
                "influence_fresh": [matrix.tolist() for matrix in matrices[1:]],
            }
        )
        return online


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _diagonal_share(S: np.ndarray) -> float:
    """Mean over targets of S[b, b] / sum_d |S[b, d]|: how much a domain's own data dominates its target."""
    return float(np.mean(np.diag(S) / np.abs(S).sum(axis=1)))


def run_seed(config: ExperimentConfig, corpus: str, seed: int, *, samples: int, progress: bool) -> list[dict]:
    """Online TiKMiX-D on one seed, trained by ``train_method`` itself, with the probe at every decision."""
    splits = load_splits(corpus)
    probes = []

    def wrap(mixer, *, model, loader, targets, influence):
        options = {"k": config.influence.k, "preconditioner": config.influence.preconditioner, "seed": seed}
        fresh = GroupInfluence(model, **options)
        probes.append(
            DriftProbe(
                mixer,
                fresh,
                influence,
                loader,
                targets,
                samples=samples,
                batch_size=config.influence.target_batch_size,
            )
        )
        return probes[-1]

    train_method(
        "tikmix-d",
        seed,
        config=config,
        train_domains=splits.train,
        val_domains=splits.val,
        progress=progress,
        wrap_mixer=wrap,
    )
    return probes[0].records


ROWS = (  # label, online key, fresh key (the baseline), statistic over decisions
    (
        "corr of S entries with fresh draw 1 (fresh: draw 2)",
        "corr_online_fresh",
        "corr_fresh_fresh",
        np.median,
    ),
    ("L1 of the mixture to fresh draw 1's (fresh: draw 2's)", "l1_online_fresh", "l1_fresh_fresh", np.median),
    ("L1 of the mixture to the prior", "l1_online_prior", "l1_fresh_prior", np.median),
    ("diagonal share S[b,b] / sum_d abs(S[b,d])", "diagonal_share_online", "diagonal_share_fresh", np.median),
    (
        "negative diagonal entries per decision",
        "negative_diagonal_online",
        "negative_diagonal_fresh",
        np.mean,
    ),
)


def report(records: list[dict]) -> str:
    """The markdown table: each statistic for the online estimate and for a fresh one, and their ratio."""
    lines = ["| over decisions | online | fresh (baseline) | online / fresh |", "|---|---|---|---|"]
    for label, online_key, fresh_key, statistic in ROWS:
        online, fresh = (float(statistic([r[key] for r in records])) for key in (online_key, fresh_key))
        ratio = f"{online / fresh:.2f}" if abs(fresh) > 1e-9 else "-"
        lines.append(f"| {label} ({statistic.__name__}) | {online:.3f} | {fresh:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="corpus")
    parser.add_argument("--samples", type=int, default=64, help="fresh samples per domain per measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write every decision's record here")
    parser.add_argument("--no-progress", action="store_true")
    # The experiment's own flags (--seeds, --steps, --half-life, --k...), defaulting to its tuning scale.
    add_config_arguments(
        parser, ExperimentConfig(steps=500, batch_size=16, seeds=(0, 1, 2)), skip=("methods",)
    )
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    config = dataclasses.replace(config_from_args(args), methods=("tikmix-d",))
    records = []
    for seed in config.seeds:
        for record in run_seed(
            config, args.corpus, seed, samples=args.samples, progress=not args.no_progress
        ):
            records.append({"seed": seed, **record})
    print(
        f"{len(records)} decisions, seeds {list(config.seeds)}, {config.steps} steps x {config.batch_size}, "
        f"half-life {config.tikmix_d.half_life}, every {config.every}, {args.samples} fresh samples/domain; "
        f"torch {torch.__version__}, {platform.machine()}, {datetime.date.today()}"
    )
    print(report(records))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"config": config.to_dict(), "samples": args.samples, "records": records}, handle, indent=1
            )


if __name__ == "__main__":
    main()
