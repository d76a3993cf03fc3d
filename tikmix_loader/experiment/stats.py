"""Statistics of an experiment: per-method means, paired differences against the baseline, the table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from tikmix_loader.errors import ConfigError

BASELINE = "stratified"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def paired_differences(values: Sequence[float], baseline: Sequence[float]) -> dict:
    """Per-pair ``values - baseline``: their mean, standard error, paired t-test p-value and wins.

    Args:
        values (Sequence[float]): A method's score per seed (lower is better).
        baseline (Sequence[float]): The baseline's score for the same seeds, in the same order.

    Returns:
        dict: ``diffs`` (list), ``mean``, ``se`` (``scipy.stats.sem``: ``std(ddof=1) / sqrt(n)``; None for
        one pair), ``p_value`` (two-sided ``scipy.stats.ttest_rel``; None for one pair or no spread),
        ``wins`` (pairs where the method is lower), ``n``.

    Raises:
        ConfigError: the two lists differ in length or are empty.
    """
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ConfigError(
            f"paired_differences needs two equally long, non-empty lists (one score per seed); got {a.shape} "
            f"and {b.shape}."
        )
    diffs = a - b
    n = len(diffs)
    se = p_value = None
    if n > 1:
        se = float(stats.sem(diffs))
        if se > 0:
            p_value = float(stats.ttest_rel(a, b).pvalue)
    return {
        "diffs": diffs.tolist(),
        "mean": float(diffs.mean()),
        "se": se,
        "p_value": p_value if p_value is None or math.isfinite(p_value) else None,
        "wins": int((diffs < 0).sum()),
        "n": n,
    }


def summarize(methods: Mapping[str, dict], baseline: str = BASELINE) -> dict:
    """Per method: mean/std of the average and worst test loss, and paired differences against ``baseline``
    (when it was run) over the seeds both share."""
    summary = {}
    base = methods.get(baseline)
    for name, entry in methods.items():
        avg_mean, avg_std = mean_std(entry["avg_test_loss"])
        worst_mean, worst_std = mean_std(entry["worst_test_loss"])
        row = {
            "avg_test_loss": {"mean": avg_mean, "std": avg_std},
            "worst_test_loss": {"mean": worst_mean, "std": worst_std},
            "decision_flops": entry["decision_flops"],
            "train_flops": entry["train_flops"],
            "wall_seconds": float(np.mean(entry["wall_seconds"])),
        }
        if base is not None and name != baseline:
            count = min(len(entry["avg_test_loss"]), len(base["avg_test_loss"]))
            for key in ("avg_test_loss", "worst_test_loss"):
                row[f"{key}_vs_{baseline}"] = paired_differences(entry[key][:count], base[key][:count])
        summary[name] = row
    return summary


def plus_minus(mean: float, spread: float | None, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def markdown_table(
    summary: Mapping[str, dict], *, baseline: str = BASELINE, seeds: Sequence[int] = ()
) -> str:
    """The summary as a markdown table (losses in nats/token; Δ = method - baseline, ± its standard error)."""
    header = (
        f"| method | avg test loss (mean ± std) | Δ avg vs {baseline} (± SE) | wins | worst-domain loss | "
        f"Δ worst (± SE) | decision FLOPs | decision / train FLOPs | wall s/run |"
    )
    lines = [header, "|" + "---|" * 9]
    for name, row in summary.items():
        avg, worst = row["avg_test_loss"], row["worst_test_loss"]
        diff_avg = row.get(f"avg_test_loss_vs_{baseline}")
        diff_worst = row.get(f"worst_test_loss_vs_{baseline}")
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    plus_minus(avg["mean"], avg["std"]),
                    "—" if diff_avg is None else plus_minus(diff_avg["mean"], diff_avg["se"]),
                    "—" if diff_avg is None else f"{diff_avg['wins']}/{diff_avg['n']}",
                    plus_minus(worst["mean"], worst["std"]),
                    "—" if diff_worst is None else plus_minus(diff_worst["mean"], diff_worst["se"]),
                    f"{row['decision_flops']:.3g}",
                    f"{row['decision_flops'] / row['train_flops']:.3f}",
                    f"{row['wall_seconds']:.0f}",
                ]
            )
            + " |"
        )
    if seeds:
        lines.append("")
        lines.append(
            f"Seeds: {list(seeds)}. Lower is better; wins = seeds where the method beats {baseline}."
        )
    return "\n".join(lines) + "\n"
