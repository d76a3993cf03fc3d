"""Benchmark: QuaDMix on a corpus with injected noise (issue 13, item 5), and its report.

The recipe (``docs/quadmix.md``, "Experiment"), every step a ``tikmix`` command so that it can also be run by
hand or in parallel parts:

1. ``tikmix corpus build CORPUS --inject-noise 0.2``: the built-in corpus with 20% damaged documents in each
   train split (shuffled words, character noise, repeated boilerplate, fragments) and their labels;
2. ``tikmix score CORPUS/*/train --reference CORPUS/<d>/val ...``: every built-in criterion per document;
3. ``tikmix quadmix search``: proxies, LightGBM, 100k candidates, top-10 mean -> ``OUT/quadmix.json``;
4. ``tikmix experiment --methods uniform-docs topk-... quadmix quadmix+tikmix-d --quadmix-params
   OUT/quadmix.json``: paired seeds, clean test loss averaged over domains.

``--run`` does all four in this process (steps 1-2 only with ``--prepare``); without it the script reads an
experiment directory that already holds ``results.json`` (e.g. parts merged with ``tikmix experiment
--merge``) and prints the report: the paired table against ``uniform-docs``, the share of each noise kind in
the served tokens (and relative to its share of the pool: 1 = blind to quality), how much of each noise
kind the chosen parameters keep within their cut-off, the regression's cross-validated error and the
decision compute, and the issue's goals. Usage::

    python benchmarks/bench_quadmix.py --run --prepare --corpus build/noisy --out build/quadmix \\
        --model micro --steps 400 --batch-size 16 --eval-samples 256 --threads 1
    python benchmarks/bench_quadmix.py --out build/quadmix        # the report of a finished run

(or ``tikmix bench quadmix ...``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tikmix_loader.cli import main as tikmix
from tikmix_loader.data.corpus import noise_labels
from tikmix_loader.data.noise import NOISE_KINDS
from tikmix_loader.experiment import (
    ExperimentConfig,
    add_config_arguments,
    apply_threads,
    config_from_args,
    load_splits,
    run_experiment,
)
from tikmix_loader.experiment.quadmix import SEARCH_FILE
from tikmix_loader.experiment.quality import ScoredDomains, parse_criteria
from tikmix_loader.experiment.stats import markdown_table, summarize
from tikmix_loader.quality.search import read_quadmix_params

METHODS = (
    "uniform-docs",
    "topk-ref_ppl",
    "topk-word_order",
    "topk-repetition",
    "topk-lines",
    "quadmix",
    "quadmix+tikmix-d",
)
CRITERIA = "ref_ppl,word_order,repetition,lines"
BASELINE = "uniform-docs"


def prepare(corpus: Path, rate: float) -> None:
    """Steps 1-2: the noisy corpus and its scores (the reference model is fitted on the val splits)."""
    if tikmix(["corpus", "build", str(corpus), "--inject-noise", str(rate), "--no-progress"]):
        raise SystemExit("corpus build failed")
    trains = sorted(str(path) for path in corpus.glob("*/train"))
    references = [arg for path in sorted(corpus.glob("*/val")) for arg in ("--reference", str(path))]
    if tikmix(["score", *trains, *references, "--no-progress"]):
        raise SystemExit("scoring failed")


def kept_noise(corpus: Path, config: ExperimentConfig, params_file: Path) -> dict[str, float]:
    """Share of each noise kind's documents within the chosen parameters' cut-off (expected copies >= 1),
    over all domains: what an epoch under those parameters still contains."""
    train = load_splits(corpus).train
    copies = ScoredDomains(train, parse_criteria(config.quadmix.criteria)).expected_copies(
        read_quadmix_params(params_file)
    )
    labels = {domain.name: noise_labels(corpus, domain.name) for domain in train}
    kinds = [*((kind, [k]) for k, kind in enumerate(("clean", *NOISE_KINDS))), ("noisy", [1, 2, 3, 4])]
    report = {}
    for kind, codes in kinds:
        inside = sum(int((copies[name][np.isin(labels[name], codes)] >= 1).sum()) for name in labels)
        total = sum(int(np.isin(labels[name], codes).sum()) for name in labels)
        report[kind] = inside / total if total else float("nan")
    return report


def noise_table(results: dict) -> str:
    """Per method: each kind's share of the served tokens (mean over seeds), and all noise relative to its
    share of the pool."""
    header = "| method | " + " | ".join(NOISE_KINDS) + " | all noise | noise served / pool share |"
    lines = [header, "|" + "---|" * (len(NOISE_KINDS) + 3)]
    for name, entry in results["methods"].items():
        reports = [report for report in entry.get("served_noise") or [] if report]
        if not reports:
            continue
        shares = [np.mean([report[kind]["share"] for report in reports]) for kind in (*NOISE_KINDS, "noisy")]
        rate = np.mean([report["noisy"]["rate"] for report in reports])
        lines.append(f"| {name} | " + " | ".join(f"{100 * s:.2f}%" for s in shares) + f" | {rate:.3f} |")
    pool = next(r for e in results["methods"].values() for r in e.get("served_noise") or [] if r)
    lines.append(
        "| (pool) | "
        + " | ".join(f"{100 * pool[kind]['pool']:.2f}%" for kind in (*NOISE_KINDS, "noisy"))
        + " | 1 |"
    )
    return "\n".join(lines) + "\n"


def report(out: Path, corpus: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    config = ExperimentConfig.from_flat(**results["config"])
    summary = summarize(results["methods"], baseline=BASELINE)
    print(markdown_table(summary, baseline=BASELINE, seeds=results["seeds"]))
    print(noise_table(results))
    search = results.get("quadmix") or json.loads((out / SEARCH_FILE).read_text())
    params_file = Path(search.get("source") or out / SEARCH_FILE)
    runs = search["decision_flops"] / summary[BASELINE]["train_flops"]
    print(
        f"QuaDMix search: {search['num_proxies']} proxies of {search['proxy_steps']} steps, "
        f"{search['decision_flops']:.3g} FLOPs ({runs:.2f} x one training run); regression out-of-fold "
        f"Spearman {search['cv_spearman']}, RMSE {search['cv_rmse']:.4f} nats (proxy losses: std "
        f"{search['proxy_loss_std']:.4f}, range {min(search['proxy_losses']):.4f}-"
        f"{max(search['proxy_losses']):.4f}); predicted {search['predicted_loss']:.4f}"
    )
    for name, params in search["params"].items():
        print(f"  {name}: implied weight {search['weights'][name]:.3f}, {params}")
    kept = kept_noise(corpus, config, params_file)
    print("Documents within the chosen cut-off: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in kept.items()))
    if "quadmix" in summary:
        diff = summary["quadmix"][f"avg_test_loss_vs_{BASELINE}"]
        met = diff["n"] >= 5 and diff["se"] is not None and -diff["mean"] > 2 * diff["se"]
        rate = np.mean([r["noisy"]["rate"] for r in results["methods"]["quadmix"]["served_noise"]])
        print(
            f"Goal: QuaDMix beats {BASELINE} by > 2 SE over >= 5 seeds: {diff['mean']:+.4f} +- {diff['se']} "
            f"({diff['wins']}/{diff['n']} wins) -> {'met' if met else 'not met'}"
        )
        print(
            f"Goal: QuaDMix serves < 5% of the noisy documents: {100 * kept['noisy']:.1f}% are within its "
            f"cut-off -> {'met' if kept['noisy'] < 0.05 else 'not met'} (noise in its served tokens: "
            f"{rate:.3f} of the pool share)"
        )
    if "quadmix" in summary and "quadmix+tikmix-d" in summary:
        methods = results["methods"]
        pairs = np.subtract(methods["quadmix+tikmix-d"]["avg_test_loss"], methods["quadmix"]["avg_test_loss"])
        se = pairs.std(ddof=1) / np.sqrt(len(pairs)) if len(pairs) > 1 else float("nan")
        print(
            f"Goal: QuaDMix + TiKMiX-D at least as good as QuaDMix: {pairs.mean():+.4f} +- {se:.4f} "
            f"({int((pairs <= 0).sum())}/{len(pairs)} seeds no worse)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ExperimentConfig.from_flat(methods=METHODS, quadmix_criteria=CRITERIA)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=Path("build/noisy"), help="the noisy, scored corpus")
    parser.add_argument("--out", type=Path, default=Path("build/quadmix"), help="experiment directory")
    parser.add_argument("--run", action="store_true", help="search and run the experiment, then report")
    parser.add_argument("--prepare", action="store_true", help="with --run: build and score the corpus first")
    parser.add_argument("--noise", type=float, default=0.2, help="injected noise rate (default: 0.2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_config_arguments(parser, defaults)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    apply_threads(args.threads)
    if args.prepare:
        prepare(args.corpus, args.noise)
    config = config_from_args(args)
    if config.quadmix.params is None:
        search_file = args.out / SEARCH_FILE
        flags = [f"--{flag.replace('_', '-')}={value}" for flag, value in config.to_dict().items()]
        flags = [
            flag for flag in flags if not flag.startswith(("--methods=", "--seeds=", "--quadmix-params="))
        ]
        if tikmix(["quadmix", "search", "--corpus", str(args.corpus), "--out", str(search_file), *flags]):
            raise SystemExit("quadmix search failed")
        config = ExperimentConfig.from_flat(**{**config.to_dict(), "quadmix_params": str(search_file)})
    run_experiment(config, args.corpus, args.out, progress=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run:
        run(args)
    report(args.out, args.corpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
