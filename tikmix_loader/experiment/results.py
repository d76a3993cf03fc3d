"""The experiment's results: per-seed entries, ``results.json`` and ``results.md``, merging parts."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tikmix_loader.errors import ConfigError
from tikmix_loader.experiment.config import FLAGS, ExperimentConfig
from tikmix_loader.experiment.methods import METHOD_BUILDERS
from tikmix_loader.experiment.stats import markdown_table, summarize

if TYPE_CHECKING:
    from tikmix_loader.experiment.runs import MethodRun

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
# A method's results entry holds one value per seed under each of these keys (and under each domain of
# ``test_loss``).
PER_SEED_KEYS = (
    "avg_test_loss",
    "worst_test_loss",
    "decision_flops_per_seed",
    "final_weights",
    "initial_weights",
    "wall_seconds",
    "train_loss",
    "decisions",
    "ledgers",
)


def empty_entry(names: list[str]) -> dict:
    """A method's results entry before its first seed; ``names`` are the scored domains."""
    entry = {key: [] for key in PER_SEED_KEYS}
    entry.update(test_loss={name: [] for name in names}, decision_flops=0.0, train_flops=0.0)
    return entry


def record_run(
    entry: dict, run: MethodRun, test: dict[str, float], decision_flops: float, seconds: float
) -> None:
    """Append one seed's run and its test losses ``{domain: loss}`` to the method's ``entry``."""
    losses = list(test.values())
    entry["avg_test_loss"].append(float(np.mean(losses)))
    entry["worst_test_loss"].append(float(np.max(losses)))
    for name, value in test.items():
        entry["test_loss"][name].append(value)
    entry["final_weights"].append(list(run.result.weights.values()))
    entry["initial_weights"].append(list(run.initial_weights.values()))
    entry["decision_flops_per_seed"].append(decision_flops)
    entry["decision_flops"] = float(np.mean(entry["decision_flops_per_seed"]))
    entry["train_flops"] = run.train_flops
    entry["wall_seconds"].append(seconds)
    entry["train_loss"].append([round(value, 5) for value in run.result.losses])
    entry["decisions"].append(run.result.decisions)
    entry["ledgers"].append(None if run.ledger is None else str(run.ledger))


def json_safe(value):
    """``value`` with NaN and infinity as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_results(results: dict, out: Path) -> None:
    """Write ``results.json`` (NaN and infinity as null) and the markdown table ``results.md`` to ``out``."""
    (out / RESULTS_FILE).write_text(json.dumps(json_safe(results), indent=1) + "\n")
    (out / TABLE_FILE).write_text(markdown_table(results["summary"], seeds=results["seeds"]))


def read_results(part: str | os.PathLike) -> tuple[Path, dict]:
    """The path and content of ``results.json`` in the directory ``part``.

    Raises:
        ConfigError: the file is missing or not JSON, naming it.
    """
    path = Path(part) / RESULTS_FILE
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"Cannot read the experiment results {path}: {error}") from error


def merge_results(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Combine the results of one protocol run in parts (parallel processes or machines, split by
    ``--methods``, by ``--seeds``, or both) into ``out``; trains nothing, rewrites ``results.json`` and
    ``results.md`` there.

    Every (method, seed) run must come from exactly one part, and every method must end up with every seed
    that any part completed, so the paired differences stay paired. The parts must agree on the corpus,
    device and every shared config option; an option that configures only some methods (its ``used_by``
    in ``FLAGS``) is compared only between the parts that run one of them, and the merged config takes it
    from those parts. An option missing from an older part's file is read with its default. RegMix may come
    from one part only, or from parts that ran the same proxy sweep. Statistics are recomputed over the union.

    Raises:
        ConfigError: an unreadable part, a (method, seed) run present in two parts, a method missing seeds,
            different RegMix sweeps, or parts that differ, naming the parts and the options.
    """
    loaded = [read_results(part) for part in parts]
    if not loaded:
        raise ConfigError("merge_results: give at least one experiment directory to merge.")
    names = [str(path) for path, _ in loaded]
    merged_config = _merged_config(loaded)
    seeds = sorted({seed for _, results in loaded for seed in results["seeds"]})
    runs: dict[str, dict[int, tuple[Path, dict]]] = {}
    for path, results in loaded:
        for name, entry in results["methods"].items():
            for index, seed in enumerate(results["seeds"]):
                if seed in runs.setdefault(name, {}):
                    raise ConfigError(
                        f"Cannot merge {path}: method {name!r} seed {seed} is also in {runs[name][seed][0]}."
                    )
                runs[name][seed] = (path, _seed_slice(entry, index))
    methods = {}
    for name in (name for name in METHOD_BUILDERS if name in runs):
        missing = sorted(set(seeds) - set(runs[name]))
        if missing:
            raise ConfigError(
                f"Cannot merge {names}: method {name!r} has no run for seeds {missing}, which other parts "
                "completed; run them too, or leave those parts out."
            )
        methods[name] = _join_seeds([runs[name][seed][1] for seed in seeds])
    sweeps = [r["regmix"] for _, r in loaded if r.get("regmix") and "regmix" in r["methods"]]
    if any(sweep["weights"] != sweeps[0]["weights"] for sweep in sweeps):
        raise ConfigError(
            f"Cannot merge {names}: their RegMix runs used different proxy sweeps (each part sweeps once, "
            "seeded by its first seed); run RegMix in one part."
        )
    merged = {
        **loaded[0][1],
        "config": {**merged_config, "methods": list(methods), "seeds": seeds},
        "seeds": seeds,
        "methods": methods,
        "regmix": sweeps[0] if sweeps else None,
        "summary": summarize(methods),
        "wall_seconds": sum(results["wall_seconds"] for _, results in loaded),
        "merged_from": names,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(merged, out)
    return merged


def _merged_config(loaded: list[tuple[Path, dict]]) -> dict:
    """The parts' common config: each option from the parts that run a method it configures, which must
    agree (as must the corpus and device); ``methods`` and ``seeds`` are the merge's own business."""
    differing = [key for key in ("corpus", "device") if any(r[key] != loaded[0][1][key] for _, r in loaded)]
    configs = [(set(r["methods"]), ExperimentConfig.from_flat(**r["config"]).to_dict()) for _, r in loaded]
    merged = {}
    for flag in FLAGS:
        used_by = set(flag.used_by or METHOD_BUILDERS)
        values = [config[flag.name] for ran, config in configs if ran & used_by] or [configs[0][1][flag.name]]
        if flag.name not in ("methods", "seeds") and any(value != values[0] for value in values):
            differing.append(flag.name)
        merged[flag.name] = values[0]
    if differing:
        raise ConfigError(f"Cannot merge {[str(path) for path, _ in loaded]}: they differ in {differing}.")
    return merged


def _seed_slice(entry: dict, index: int) -> dict:
    """One seed's run out of a method's results entry."""
    run = {key: entry[key][index] for key in PER_SEED_KEYS}
    run["test_loss"] = {name: values[index] for name, values in entry["test_loss"].items()}
    run["train_flops"] = entry["train_flops"]
    return run


def _join_seeds(runs: list[dict]) -> dict:
    """A method's results entry from its per-seed runs, in seed order (the inverse of ``_seed_slice``)."""
    entry = {key: [run[key] for run in runs] for key in PER_SEED_KEYS}
    entry["test_loss"] = {name: [run["test_loss"][name] for run in runs] for name in runs[0]["test_loss"]}
    entry["decision_flops"] = float(np.mean(entry["decision_flops_per_seed"]))
    entry["train_flops"] = runs[0]["train_flops"]
    return entry
