"""Leave-one-domain-out: every domain held out in turn, and the paired differences pooled over them.

Each hold-out is an ordinary experiment (``--hold-out NAME``, in ``OUT/hold-out-NAME/``). A pair is one
(hold-out, seed): a method's and a baseline's held-out test loss from runs with the same seed and the same
held-out domain. The pooled statistics are ``paired_differences`` over all pairs (mean, standard error
``std(ddof=1) / sqrt(n)`` and the paired t-test, which treat the pairs as independent; hold-outs differ in
difficulty, but the pairing removes each hold-out's level), and per hold-out over its seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tikmix_loader.errors import ConfigError
from tikmix_loader.experiment.config import ExperimentConfig
from tikmix_loader.experiment.corpus_splits import load_splits
from tikmix_loader.experiment.protocol import run_experiment
from tikmix_loader.experiment.results import json_safe
from tikmix_loader.experiment.stats import BASELINE, paired_differences, plus_minus

LOO_FILE = "leave_one_out.json"
LOO_TABLE = "leave_one_out.md"
# The baselines every method's pooled differences are taken against, when they ran.
LOO_BASELINES = (BASELINE, "natural", "regmix")


def pool_leave_one_out(parts: Mapping[str, dict], baselines=LOO_BASELINES) -> dict:
    """Pool the experiments in ``parts`` ({held-out domain: ``results.json`` content}).

    Returns:
        dict: ``mode`` ("leave-one-out"), ``hold_outs``, ``seeds``, ``pairs`` ([hold-out, seed] in the order
        of every ``diffs`` list), and ``methods`` {name: ``test_loss`` (mean, over pairs), ``decision_flops``
        and ``train_flops`` (means over hold-outs), ``flops_vs_regmix`` (``decision_flops`` over RegMix's,
        when RegMix ran), ``vs_<baseline>`` (pooled ``paired_differences``, for every baseline in
        ``baselines`` that ran, but the method itself) and ``per_hold_out`` {hold-out: {``test_loss``,
        ``vs_<baseline>``}}}.

    Raises:
        ConfigError: the parts ran different methods or seeds, or no part was given.
    """
    if not parts:
        raise ConfigError("pool_leave_one_out: no hold-out to pool.")
    hold_outs = list(parts)
    first = parts[hold_outs[0]]
    for name, results in parts.items():
        if list(results["methods"]) != list(first["methods"]) or results["seeds"] != first["seeds"]:
            raise ConfigError(
                f"pool_leave_one_out: hold-out {name!r} ran methods {list(results['methods'])} on seeds "
                f"{results['seeds']}, {hold_outs[0]!r} ran {list(first['methods'])} on {first['seeds']}."
            )
    seeds = list(first["seeds"])
    pairs = [[name, seed] for name in hold_outs for seed in seeds]

    def losses(method: str, name: str) -> list[float]:
        return parts[name]["methods"][method]["avg_test_loss"]

    methods = {}
    for method in first["methods"]:
        pooled = [loss for name in hold_outs for loss in losses(method, name)]
        row = {
            "test_loss": float(np.mean(pooled)),
            "decision_flops": float(
                np.mean([parts[n]["methods"][method]["decision_flops"] for n in hold_outs])
            ),
            "train_flops": float(np.mean([parts[n]["methods"][method]["train_flops"] for n in hold_outs])),
            "per_hold_out": {name: {"test_loss": float(np.mean(losses(method, name)))} for name in hold_outs},
        }
        for baseline in baselines:
            if baseline == method or baseline not in first["methods"]:
                continue
            base = [loss for name in hold_outs for loss in losses(baseline, name)]
            row[f"vs_{baseline}"] = paired_differences(pooled, base)
            for name in hold_outs:
                row["per_hold_out"][name][f"vs_{baseline}"] = paired_differences(
                    losses(method, name), losses(baseline, name)
                )
        methods[method] = row
    if "regmix" in methods:
        for row in methods.values():
            row["flops_vs_regmix"] = row["decision_flops"] / methods["regmix"]["decision_flops"]
    return {
        "mode": "leave-one-out",
        "hold_outs": hold_outs,
        "seeds": seeds,
        "pairs": pairs,
        "methods": methods,
    }


def _diff_cell(row: dict, baseline: str) -> str:
    diff = row.get(f"vs_{baseline}")
    return "—" if diff is None else f"{plus_minus(diff['mean'], diff['se'])} ({diff['wins']}/{diff['n']})"


def loo_markdown(pooled: dict) -> str:
    """The pooled table (Δ = method - baseline over (hold-out, seed) pairs, ± SE, (wins/pairs); decision
    FLOPs, over RegMix's when it ran) and one row per hold-out and method (Δ over its seeds)."""
    methods = pooled["methods"]
    baselines = [b for b in LOO_BASELINES if any(f"vs_{b}" in row for row in methods.values())]
    with_regmix = "regmix" in methods
    diff_headers = " | ".join(f"Δ vs {b} (± SE) (wins)" for b in baselines)
    lines = [
        f"| method | held-out test loss | {diff_headers} | decision FLOPs | decision / train FLOPs |"
        + (" decision / RegMix's |" if with_regmix else ""),
        "|" + "---|" * (len(baselines) + 4 + with_regmix),
    ]
    for name, row in methods.items():
        cells = [name, f"{row['test_loss']:.4f}", *(_diff_cell(row, b) for b in baselines)]
        cells += [f"{row['decision_flops']:.3g}", f"{row['decision_flops'] / row['train_flops']:.3f}"]
        cells += [f"{row['flops_vs_regmix']:.3f}"] if with_regmix else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"| hold-out | method | test loss | {diff_headers} |", "|" + "---|" * (len(baselines) + 3)]
    for hold_out in pooled["hold_outs"]:
        for name, row in methods.items():
            cell = row["per_hold_out"][hold_out]
            diffs = " | ".join(_diff_cell(cell, b) for b in baselines)
            lines.append(f"| {hold_out} | {name} | {cell['test_loss']:.4f} | {diffs} |")
    lines += [
        "",
        f"Hold-outs: {pooled['hold_outs']}; seeds: {pooled['seeds']}; pairs = hold-outs x seeds. Lower is "
        "better; wins = pairs where the method beats the baseline.",
    ]
    return "\n".join(lines) + "\n"


def run_leave_one_out(
    config: ExperimentConfig, corpus: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True
) -> dict:
    """Hold out every domain of ``corpus`` in turn (``OUT/hold-out-NAME/``), then pool; writes
    ``leave_one_out.json`` and ``leave_one_out.md`` to ``out`` after every hold-out.

    Raises:
        ConfigError: ``config`` already sets ``hold_out`` or ``targets``.
    """
    if config.hold_out is not None or config.targets is not None:
        raise ConfigError("--leave-one-out holds out every domain itself; drop --hold-out and --targets.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name in load_splits(corpus).names:
        held_out = dataclasses.replace(config, hold_out=name)
        parts[name] = run_experiment(held_out, corpus, out / f"hold-out-{name}", progress=progress)
        pooled = {**pool_leave_one_out(parts), "config": config.to_dict(), "corpus": str(corpus)}
        (out / LOO_FILE).write_text(json.dumps(json_safe(pooled), indent=1) + "\n")
        (out / LOO_TABLE).write_text(loo_markdown(pooled))
    return pooled
